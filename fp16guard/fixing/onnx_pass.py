"""Rewrites of FP32 ONNX graphs that keep them exact in real arithmetic and in FP16 range.

Each pass is a pure function ``f(model, ...) -> (new_model, notes)``: the argument is never
modified, and ``notes`` is a list of :class:`RewriteNote` (what changed, where, and why), the
rows of ``fp16guard fix``'s report. The math lives in :mod:`fp16guard.folding`.

Passes, in the order :func:`fp16guard.fixing.pipeline.fix_target` runs them:

0. :func:`doubles_to_float` and :func:`initializer_inputs_to_constants`, when the model is built
   (:class:`~fp16guard.fixing.targets.OnnxFixTarget`): a float64 model computed in float32, and
   weights that older exporters also list as graph inputs made plain initializers.
1. :func:`constants_to_initializers`: ``Constant`` nodes become initializers (PP-OCRv4's exporter
   keeps every weight in a ``Constant`` node), so the passes below edit one kind of constant.
2. :func:`fold_affine_constants`: per-channel constant ``Mul``/``Div``/``Add``/``Sub`` after a
   ``Conv``/``ConvTranspose`` folded into its weights and bias (PaddlePaddle exports
   ConvTranspose's bias as an ``Add``; PP-LCNetV3 adds a learnable scale and bias after convs).
3. :func:`fold_batchnorms`: a ``BatchNormalization`` that reads a ``Conv``/``ConvTranspose``
   output (and nothing else reads it) is folded into its weights in float64 (seed 000:
   ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``);
   any other BatchNorm becomes ``Mul`` + ``Add`` by a per-channel scale and shift computed in
   float64. Afterwards no tensor holds a running variance.
4. :func:`apply_exponents`: the scale regions of a plan. Every op's constants are rescaled by
   powers of two so that each activation is stored as ``true * 2**-e`` (:mod:`fp16guard.fixing.solver`
   says which ops absorb, carry or refuse a scale); a ``Mul`` by a power of two is inserted only
   where no constant can absorb it.
5. :func:`raise_constants`: constants that FP16 flushes to zero (an epsilon of 1e-10 under a log)
   raised to a value FP16 holds, where the plan consents.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fp16guard.errors import RewriteError
from fp16guard.fixing import laws
from fp16guard.fixing.solver import Rescale, Role, ScaledConstant, ScaleOp, ScaleSolution, reads_scaled
from fp16guard.folding import (
    fold_affine_into_weights,
    fold_batchnorm,
    fp16_exact_steps,
    keeps_fp16_precision,
    pow2,
    raise_small,
)
from fp16guard.control_flow import rename_free_reads
from fp16guard.fp16 import FP16_MAX
from fp16guard.onnx_graph import (
    consumers,
    float64_as_float32,
    free_reads,
    node_reads,
    node_scope,
    subgraphs,
    value_types,
)

FLOAT = TensorProto.FLOAT


@dataclass(frozen=True)
class RewriteNote:
    """One change a rewrite made.

    Attributes:
        kind: ``constant_to_initializer``, ``fold_affine``, ``fold_batchnorm``,
            ``batchnorm_to_affine``, ``scale``, ``rescale_op``, ``raise_constant``, ``saturate_constant``, ``mask_guard``,
            ``fallback_fp32``, ``float64_to_float32``, ``initializer_inputs``
            (docs/fix-schema.md).
        target: the node (or tensor) changed.
        detail: one sentence.
    """

    kind: str
    target: str
    detail: str

    def to_json(self) -> dict:
        """``{"kind", "target", "detail"}``."""
        return {"kind": self.kind, "target": self.target, "detail": self.detail}


#: The ONNX side of the law table (:mod:`fp16guard.fixing.laws`): op type -> row.
LAWS = laws.by_op(laws.ONNX)
#: For TIED ops: float constant inputs that scale with the activations (``None``: all of them); a
#: constant read as data at activation-dependent indices or shapes (an embedding table's Gather, a
#: broadcast Expand) scales with the output. From the law table.
TIED_CONSTANTS: dict[str, tuple[int, ...] | None] = {
    op: scaled for op, scaled in laws.constants(laws.ONNX, "scaled").items() if LAWS[op].role is Role.TIED}
_WEIGHTS, _BIASES, _EPS = (laws.constants(laws.ONNX, part) for part in ("weight", "bias", "eps"))
#: Ops with constant weights that absorb any input and output exponent: op -> (weight input,
#: bias input or None). From the law table.
LINEAR_OPS = {op: (w, _BIASES.get(op)) for op, w in _WEIGHTS.items() if op not in _EPS}
#: Norms: op -> (scale input, bias input or None); their ``epsilon`` attribute scales by ``2**(-2 e_in)``.
NORM_OPS = {op: (w, _BIASES.get(op)) for op, w in _WEIGHTS.items() if op in _EPS}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a unique name (passes and plans refer to nodes by name)."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in used:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            used.add(name)


def _remove_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {t for n in graph.node for t in node_reads(n)} | {o.name for o in graph.output}  # subgraphs' reads too
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


class _Constants:
    """Initializers by name, with copy-on-write replacement (a constant shared by two nodes is
    duplicated before one of them changes it)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.made: dict[tuple[str, str], str] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str) -> np.ndarray:
        """The value of initializer ``name`` (as stored: usually float32)."""
        return self.values[name]

    def replace(self, node: onnx.NodeProto, index: int, value: np.ndarray, suffix: str) -> None:
        """Set ``node.input[index]`` to a constant holding ``value`` (same dtype as before)."""
        old = node.input[index] if index < len(node.input) else ""
        dtype = self.values[old].dtype if old in self.values else np.float32
        key = (old, suffix)
        new = self.made.get(key) if old else None
        cached = new is not None and np.array_equal(self.values[new], np.asarray(value).astype(dtype))
        if not cached:
            new = f"{old}__{suffix}" if old else f"{node.name}__{suffix}"
            while new in self.values:
                new = f"{new}_"
            self.values[new] = np.asarray(value).astype(dtype)
            self.graph.initializer.append(numpy_helper.from_array(self.values[new], new))
            if old:
                self.made[key] = new
        if index < len(node.input):
            node.input[index] = new
        else:
            while len(node.input) < index:
                node.input.append("")
            node.input.append(new)


def doubles_to_float(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """:func:`fp16guard.onnx_graph.float64_as_float32` with its note as a :class:`RewriteNote`
    (``float64_to_float32``); ``model`` itself and no note when nothing is float64."""
    converted, detail = float64_as_float32(model)
    return converted, ([RewriteNote("float64_to_float32", "graph", detail)] if detail else [])


def initializer_inputs_to_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Graph inputs that are also initializers (older exporters, ``keep_initializers_as_inputs=True``)
    become plain initializers: the fix rewrites and stores weights in FP16, so the fixed model cannot
    take them as inputs.

    Args:
        model: an ONNX model (not modified).

    Returns:
        ``(model', notes)``; ``model`` itself and no note when no weight is listed as an input.
    """
    inits = {t.name for t in model.graph.initializer}
    listed = [i.name for i in model.graph.input if i.name in inits]
    if not listed:
        return model, []
    m = _copy(model)
    kept = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(kept)
    m.ir_version = max(m.ir_version, 4)  # IR 3 requires every initializer to be a graph input
    shown = ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")
    return m, [RewriteNote("initializer_inputs", "graph",
                           f"{len(listed)} weight(s) listed as graph inputs too ({shown}) are constants of the fixed "
                           f"model, which takes {', '.join(i.name for i in kept)} only")]


def constants_to_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """``Constant`` nodes holding a tensor become initializers of the same name; unnamed nodes get
    names (``{op_type}_{index}``).

    Args:
        model: an FP32 ``onnx.ModelProto`` (not modified).

    Returns:
        ``(model', notes)``; one note for all moved constants.
    """
    m = _copy(model)
    g = m.graph
    kept, moved = [], 0
    for node in g.node:
        value = None
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    value = numpy_helper.to_array(a.t)
                elif a.name == "value_float":
                    value = np.array(a.f, dtype=np.float32)
                elif a.name == "value_floats":
                    value = np.array(a.floats, dtype=np.float32)
                elif a.name in ("value_int", "value_ints"):
                    value = np.array(helper.get_attribute_value(a), dtype=np.int64)
        if value is None:
            kept.append(node)
            continue
        g.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    del g.node[:]
    g.node.extend(kept)
    folded = _fold_constant_nodes(m)
    _name_nodes(g)
    notes = [RewriteNote("constant_to_initializer", "graph", f"{moved} Constant nodes became initializers")] if moved else []
    if folded:
        notes.append(RewriteNote("constant_to_initializer", "graph",
                                 f"{folded} nodes computed from constants alone (Identity, Cast, Transpose, ...) "
                                 "evaluated into initializers"))
    return m, notes


#: Ops never evaluated ahead of time: random, with subgraphs, or (de)quantizing.
_NOT_FOLDED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan", "SequenceMap",
               # quantized weights stay quantized: a DequantizeLinear of int8 weights stays in the graph (FP32)
               "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
#: Largest constant (elements) a folded node may write.
_FOLD_LIMIT = 1 << 24


def _fold_constant_nodes(m: onnx.ModelProto) -> int:
    """Evaluate, in place, the nodes of ``m``'s main graph whose inputs are all initializers
    (``onnx.reference``), turning their outputs into initializers; the number folded.

    Exporters write shared or tied weights as ``Identity(weight)`` (``torch.onnx`` deduplicates
    equal parameters that way) and transposed or cast weights as ``Transpose``/``Cast`` of an
    initializer; the rewrites below expect a weight to be an initializer.
    """
    from onnx.reference import ReferenceEvaluator

    g = m.graph
    values = {i.name: i for i in g.initializer}
    opsets = list(m.opset_import)
    kept, folded = [], 0
    for node in g.node:
        ins = [x for x in node.input if x]
        if (not ins or node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED
                or not all(x in values for x in ins)):
            kept.append(node)
            continue
        sub = helper.make_model(helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, 0, None)
                                                                        for o in node.output if o],
                                                  [values[x] for x in dict.fromkeys(ins)]),
                                opset_imports=opsets, ir_version=m.ir_version)
        try:
            outs = ReferenceEvaluator(sub).run(None, {})
        except Exception:  # an op the reference runtime lacks: leave the node to the runtime
            kept.append(node)
            continue
        if any(np.asarray(o).size > _FOLD_LIMIT for o in outs):
            kept.append(node)
            continue
        for name, value in zip([o for o in node.output if o], outs):
            values[name] = numpy_helper.from_array(np.asarray(value), name)
            g.initializer.append(values[name])
        folded += 1
    del g.node[:]
    g.node.extend(kept)
    return folded


def _channel_constant(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a ``[C]`` vector if it broadcasts along axis 1 of a rank-``rank`` tensor only."""
    v = np.asarray(value)
    if v.size == 1:
        return np.full(channels, float(v.reshape(-1)[0]))
    shape = list(v.shape)
    while len(shape) < rank:
        shape.insert(0, 1)
    if len(shape) != rank or shape[1] != channels or any(d != 1 for k, d in enumerate(shape) if k != 1):
        return None
    return v.reshape(-1).astype(np.float64)


def _out_channels(node: onnx.NodeProto, weight: np.ndarray) -> tuple[int, int] | None:
    """(output channels, channel axis of the weight) of a Conv/ConvTranspose, or None when a
    per-channel fold is not a plain axis scaling (grouped ConvTranspose)."""
    if node.op_type == "Conv":
        return weight.shape[0], 0
    if _attr(node, "group", 1) != 1:
        return None
    return weight.shape[1], 1


def _next_affine_op(out: str, readers: Mapping[str, list[onnx.NodeProto]], outputs: set[str], consts: _Constants,
                    scales: bool) -> tuple[onnx.NodeProto, str] | None:
    """The op that :func:`fold_affine_constants` can fold after the tensor ``out``, and the name of its
    constant operand; None when there is none.

    That op must be the only reader of ``out`` (which is no graph output) and an ``Add``/``Sub`` (or
    ``Mul``/``Div`` when ``scales``) of ``out`` and a constant (the constant first only for
    ``Mul``/``Add``).

    Args:
        readers: :func:`~fp16guard.onnx_graph.consumers` of the graph; outputs: graph output names.
    """
    users = readers.get(out, [])
    kinds = ("Mul", "Div", "Add", "Sub") if scales else ("Add", "Sub")
    if len(users) != 1 or out in outputs or users[0].op_type not in kinds:
        return None
    op = users[0]
    if op.input[0] == out and op.input[1] in consts:
        return op, op.input[1]
    if op.input[1] == out and op.input[0] in consts and op.op_type in ("Mul", "Add"):
        return op, op.input[0]
    return None


def fold_affine_constants(model: onnx.ModelProto, *, scales: bool = False) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Fold per-channel constant ``Mul``/``Div``/``Add``/``Sub`` that follow a ``Conv`` or
    ``ConvTranspose`` into its weights and bias, as long as each is the only reader of the previous
    output: ``(W x + b) * c + d`` becomes ``(c W) x + (c b + d)``.

    PaddlePaddle exports ConvTranspose's bias as an ``Add``, and PP-LCNetV3 follows convs with a
    learnable scale and bias (``Mul``, ``Add``); folding them saves ops and FP16 roundings.
    Constants must broadcast along the channel axis only (``[C,1,1]``, ``[1,C,1,1]`` or a scalar).

    By default only constant ``Add``/``Sub`` (biases) are folded. ``scales=True`` folds ``Mul``/``Div``
    too; on PP-OCRv4 det that *lowered* the strict-FP16 mask IoU on ``coffee`` from 0.993 to 0.941
    (FP32 agreement unchanged), so it is off: moving a scale into the weights changes where FP16
    rounds, and that model's output is sensitive to it.

    Args:
        model: FP32 model whose constants are initializers (:func:`constants_to_initializers`).
        scales: also fold constant multiplications and divisions.

    Returns:
        ``(model', notes)``; each folded op disappears and the conv writes its output tensor.
    """
    m = _copy(model)
    g = m.graph
    consts = _Constants(g)
    readers = consumers(g)
    outputs = {o.name for o in g.output}
    drop: set[str] = set()
    notes = []
    for node in g.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.input[1] not in consts:
            continue
        w0 = consts.get(node.input[1])
        oc = _out_channels(node, w0)
        if oc is None:
            continue
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if has_bias and node.input[2] not in consts:
            continue  # a bias computed in the graph: nothing to fold into
        w = w0.astype(np.float64)
        b = consts.get(node.input[2]).astype(np.float64) if has_bias else np.zeros(oc[0])
        folded = []
        while True:
            found = _next_affine_op(node.output[0], readers, outputs, consts, scales)
            if found is None:
                break
            op, other = found
            c = _channel_constant(consts.get(other), oc[0], w.ndim)
            if c is None or (op.op_type == "Div" and np.any(c == 0)):
                break
            shape = [1] * w.ndim
            shape[oc[1]] = oc[0]
            if op.op_type in ("Mul", "Div"):
                f = c if op.op_type == "Mul" else 1.0 / c
                if not keeps_fp16_precision(w0, w * f.reshape(shape)):
                    break
                w, b = w * f.reshape(shape), b * f
            else:
                b = b + c if op.op_type == "Add" else b - c
            node.output[0] = op.output[0]
            drop.add(op.name)
            folded.append(op.name)
        if folded:
            consts.replace(node, 1, w, "affine")
            consts.replace(node, 2, b, "affine")
            notes.append(RewriteNote("fold_affine", node.name, f"{', '.join(folded)} folded into its weights and bias"))
    keep = [n for n in g.node if n.name not in drop]
    del g.node[:]
    g.node.extend(keep)
    _remove_unused_initializers(g)
    return m, notes


def fold_batchnorms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Fold every inference ``BatchNormalization`` away (see the module docstring).

    Args:
        model: FP32 model whose constants are initializers.

    Returns:
        ``(model', notes)``.

    Raises:
        RewriteError: a BatchNorm whose statistics are not constants (training mode).
    """
    m = _copy(model)
    g = m.graph
    consts = _Constants(g)
    readers = consumers(g)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    ranks = {}
    for vi in [*onnx.shape_inference.infer_shapes(m).graph.value_info, *g.input]:
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    drop: set[str] = set()
    replace: dict[str, list[onnx.NodeProto]] = {}
    notes = []
    for bn in g.node:
        if bn.op_type != "BatchNormalization":
            continue
        if len(bn.output) > 1 and any(bn.output[1:]) or _attr(bn, "training_mode", 0):
            raise RewriteError(f"{bn.name}: BatchNormalization in training mode cannot be folded; export in eval mode")
        if not all(t in consts for t in bn.input[1:5]):
            raise RewriteError(f"{bn.name}: BatchNormalization statistics are not constants")
        scale, shift = fold_batchnorm(*(consts.get(t) for t in bn.input[1:5]), float(_attr(bn, "epsilon", 1e-5)))
        src = bn.input[0]
        conv = producer.get(src)
        constant_bias = conv is not None and (len(conv.input) < 3 or not conv.input[2] or conv.input[2] in consts)
        if (conv is not None and conv.op_type in ("Conv", "ConvTranspose") and conv.input[1] in consts
                and constant_bias and len(readers.get(src, [])) == 1 and src not in outputs):
            w = consts.get(conv.input[1])
            oc = _out_channels(conv, w)
            b = consts.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
            w2, b2 = (fold_affine_into_weights(w, b, scale, shift, channel_axis=oc[1])
                      if oc is not None and oc[0] == scale.size else (None, None))
            if w2 is not None and keeps_fp16_precision(w, w2):
                consts.replace(conv, 1, w2, "bnfold")
                consts.replace(conv, 2, b2, "bnfold")
                conv.output[0] = bn.output[0]
                drop.add(bn.name)
                notes.append(RewriteNote("fold_batchnorm", bn.name, f"folded into {conv.name} in float64 "
                                         f"(running variance amax {float(np.max(consts.get(bn.input[4]))):.4g})"))
                continue
        rank = ranks.get(src, 4)
        shape = [scale.size] + [1] * max(rank - 2, 0)
        s_name, t_name = f"{bn.name}__scale", f"{bn.name}__shift"
        g.initializer.extend([numpy_helper.from_array(scale.reshape(shape).astype(np.float32), s_name),
                              numpy_helper.from_array(shift.reshape(shape).astype(np.float32), t_name)])
        mid = f"{bn.output[0]}__scaled"
        replace[bn.name] = [helper.make_node("Mul", [src, s_name], [mid], name=f"{bn.name}__mul"),
                            helper.make_node("Add", [mid, t_name], [bn.output[0]], name=f"{bn.name}__add")]
        why = ("folding would make the conv's FP16 weights subnormal" if conv is not None and
               conv.op_type in ("Conv", "ConvTranspose") else "no conv to fold into")
        notes.append(RewriteNote("batchnorm_to_affine", bn.name, f"{why}: per-channel Mul + Add with scale "
                                 f"and shift computed in float64"))
    new_nodes = []
    for n in g.node:
        if n.name in drop:
            continue
        new_nodes += replace.get(n.name, [n])
    del g.node[:]
    g.node.extend(new_nodes)
    _remove_unused_initializers(g)
    return m, notes


def scale_ops(model: onnx.ModelProto) -> list[ScaleOp]:
    """The graph as :func:`fp16guard.scaling.solve` sees it: each node's :class:`Role` and its
    float activation inputs and outputs (constants and integer tensors left out).

    Args:
        model: FP32 model whose constants are initializers and whose nodes are named.
    """
    g = model.graph
    consts = {i.name for i in g.initializer}
    types = value_types(model)
    is_float = {n for n, t in types.items() if t in (FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)}
    # values computed from constants alone are constants too
    for node in g.node:
        if node.input and all(not t or t in consts for t in node_reads(node)):
            consts.update(node.output)
    values = {i.name: i for i in g.initializer}
    # float constants the graph computes at run time (a DequantizeLinear of int8 weights): the passes
    # rescale initializers only, so a node reading one keeps its true values (a barrier)
    computed = {t for t in consts if t not in values and t in is_float}
    ops = []
    arrays: dict[str, ScaledConstant] = {}
    for node in g.node:
        if all(o in consts for o in node.output) and node.output:
            continue
        acts = tuple(t for t in node.input if t and t not in consts and t in is_float
                     and node.op_type not in SCALE_BLIND_OPS)
        if subgraphs(node):  # If/Loop/Scan: a barrier, whose subgraphs also read outer values by name
            acts += tuple(t for t in node_reads(node) if t not in node.input and t not in consts and t in is_float)
        outs = tuple(o for o in node.output if o and o in is_float)
        role, degree = _role(node, acts, values, types)
        if computed.intersection(node.input) and node.op_type not in SCALE_BLIND_OPS or subgraphs(node):
            role, degree = Role.BARRIER, Fraction(1)
        ops.append(ScaleOp(node.name, role, acts, outs, node_scope(node), degree,
                           _scaled_constants(node, role, acts, values, arrays)))
    return ops


def _scaled_constants(node: onnx.NodeProto, role: Role, acts: tuple[str, ...], values: Mapping[str, onnx.TensorProto],
                      arrays: dict[str, ScaledConstant]) -> tuple[ScaledConstant, ...]:
    """The constants :func:`apply_exponents` folds exponents into for ``node`` (as :func:`_scale_op_constants`
    picks them), as the solver checks them (:class:`~fp16guard.fixing.solver.ScaledConstant`);
    ``arrays`` caches them by (initializer, coefficients)."""
    t = node.op_type

    def init(k: int, in_coef: int, out_coef: int, additive: bool = False, summed: bool = False) -> list[ScaledConstant]:
        """Input ``k`` of ``node`` when it is a float initializer."""
        name = node.input[k] if k is not None and k < len(node.input) else ""
        if name not in values or values[name].data_type not in (FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            return []
        key = f"{name}|{in_coef}|{out_coef}|{additive}|{summed}"
        if key not in arrays:
            arrays[key] = ScaledConstant.of(name, numpy_helper.to_array(values[name]), in_coef, out_coef, additive,
                                            summed)
        return [arrays[key]]

    out: list[ScaledConstant] = []
    if role is Role.LINEAR and t in NORM_OPS:
        out += init(NORM_OPS[t][0], 0, -1) + init(NORM_OPS[t][1], 0, -1, True)
        out.append(ScaledConstant.of(f"{node.name}.epsilon", float(_attr(node, "epsilon", 1e-5)), -2, 0, True))
    elif role is Role.LINEAR and t in LINEAR_OPS:
        w, b = LINEAR_OPS[t]
        out += init(0 if t == "MatMul" and node.input[0] in values else w, 1, -1, summed=True) + init(b, 0, -1, True)
    elif role is Role.LINEAR and t in ("Mul", "Div"):
        k = [i for i, x in enumerate(node.input) if x not in acts][:1]
        out += init(k[0], 1, -1) if t == "Mul" and k else init(k[0], -1, 1) if k else []
    elif role is Role.BOUNDED and t == "HardSigmoid":
        out.append(ScaledConstant.of(f"{node.name}.alpha", float(_attr(node, "alpha", 0.2)), 1, 0))
    elif role is Role.TIED and t in TIED_CONSTANTS:
        wanted, additive = TIED_CONSTANTS[t], t in ("Add", "Sub", "Sum", "Mean")
        for k, x in enumerate(node.input):
            if x and x not in acts and (wanted is None or k in wanted):
                out += init(k, 0, -1, additive)
        for a in ("min", "max") if t == "Clip" else ():
            if _attr(node, a) is not None:
                out.append(ScaledConstant.of(f"{node.name}.{a}", float(_attr(node, a)), 0, -1))
    return tuple(out)


#: Ops whose outputs do not depend on their inputs' values, only on their shapes: they read a
#: scaled tensor as well as the true one.
SCALE_BLIND_OPS = laws.ops_where(laws.ONNX, blind=True)


class _View:
    """A node as the law table's predicates read it (:class:`fp16guard.fixing.laws.OpView`)."""

    frontend = laws.ONNX

    def __init__(self, node: onnx.NodeProto, acts: tuple[str, ...], values: Mapping[str, onnx.TensorProto],
                 types: Mapping[str, int]):
        self.node, self.acts, self.values, self.types = node, acts, values, types
        self.reads = len(acts)

    def _input(self, i: int) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def is_act(self, i: int) -> bool:
        """See :meth:`~fp16guard.fixing.laws.OpView.is_act`."""
        return bool(self._input(i)) and self._input(i) in self.acts

    def is_const(self, i: int) -> bool:
        """An initializer (the passes rescale initializers only)."""
        return self._input(i) in self.values

    def absent(self, i: int) -> bool:
        """See :meth:`~fp16guard.fixing.laws.OpView.absent`."""
        return not self._input(i)

    def scalar(self, i: int) -> float | None:
        """See :meth:`~fp16guard.fixing.laws.OpView.scalar`."""
        if not self.is_const(i):
            return None
        c = numpy_helper.to_array(self.values[self._input(i)])
        return float(c.reshape(-1)[0]) if c.size == 1 else None

    def attr(self, name: str):
        """See :meth:`~fp16guard.fixing.laws.OpView.attr`."""
        value = _attr(self.node, name)
        return value.decode() if isinstance(value, bytes) else value

    def is_float_dtype(self, dtype) -> bool:
        """See :meth:`~fp16guard.fixing.laws.OpView.is_float_dtype`."""
        return dtype in (FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)

    def writes_float(self) -> bool | None:
        """See :meth:`~fp16guard.fixing.laws.OpView.writes_float`."""
        t = self.types.get(self.node.output[0]) if self.node.output else None
        return None if not t else self.is_float_dtype(t)


def _role(node: onnx.NodeProto, acts: tuple[str, ...], values: Mapping[str, onnx.TensorProto],
          types: Mapping[str, int]) -> tuple[Role, Fraction]:
    """The node's role and power degree: one lookup in the law table (:func:`fp16guard.fixing.laws.role_of`);
    an op of another domain, or one the table lacks, is a barrier."""
    if node.domain not in ("", "ai.onnx"):
        return Role.BARRIER, Fraction(1)
    return laws.role_of(LAWS.get(node.op_type), _View(node, acts, values, types))


def _input_exponent(op: ScaleOp, exponents: Mapping[str, int]) -> int:
    """Exponent of ``op``'s first activation input (0 when it has none or none was assigned)."""
    return exponents.get(op.inputs[0], 0) if op.inputs else 0


def _scale_weights(node: onnx.NodeProto, consts: _Constants, e_in: int, e_out: int) -> None:
    """Rescale the weight and bias of a linear op (``W *= 2**(e_in - e_out)``, ``b *= 2**-e_out``) or
    of a norm (``scale, B *= 2**-e_out``, ``epsilon *= 2**(-2 e_in)``).

    Args:
        node: a node of :data:`LINEAR_OPS` or :data:`NORM_OPS` (edited in place).
        consts: the graph's initializers.
        e_in: exponent of the activation input; e_out: exponent of the output.
    """
    t = node.op_type
    if t in NORM_OPS:
        w_idx, b_idx = NORM_OPS[t]
        w_exp, b_exp = -e_out, -e_out
        if e_in:
            _set_attr(node, "epsilon", float(_attr(node, "epsilon", 1e-5)) * pow2(-2 * e_in))
    else:
        w_idx, b_idx = LINEAR_OPS[t]
        w_exp, b_exp = e_in - e_out, -e_out
        if t == "MatMul" and node.input[0] in consts:
            w_idx = 0
    if w_exp:
        consts.replace(node, w_idx, consts.get(node.input[w_idx]).astype(np.float64) * pow2(w_exp), f"x2^{w_exp}")
    if b_idx is not None and b_exp and len(node.input) > b_idx and node.input[b_idx]:
        consts.replace(node, b_idx, consts.get(node.input[b_idx]).astype(np.float64) * pow2(b_exp), f"x2^{b_exp}")


def _scale_mul_div_constant(node: onnx.NodeProto, op: ScaleOp, consts: _Constants, e_in: int, e_out: int) -> None:
    """Rescale the constant operand of a ``Mul`` (``c *= 2**(e_in - e_out)``) or ``Div``
    (``c *= 2**(e_out - e_in)``) whose other operand is the activation ``op.inputs[0]``."""
    t = node.op_type
    k = [i for i, x in enumerate(node.input) if x not in op.inputs][0]
    exp = (e_in - e_out) if t == "Mul" else (e_out - e_in)
    if exp:
        consts.replace(node, k, consts.get(node.input[k]).astype(np.float64) * pow2(exp), f"x2^{exp}")


def _scale_tied_constants(node: onnx.NodeProto, consts: _Constants, e_in: int) -> bool:
    """Multiply the float constants of a tied op (those :data:`TIED_CONSTANTS` lists, and Clip's
    ``min``/``max`` attributes) by ``2**-e_in``; whether anything changed."""
    t = node.op_type
    wanted = TIED_CONSTANTS[t]
    changed = False
    for k, x in enumerate(node.input):
        if x and x in consts and (wanted is None or k in wanted) and consts.get(x).dtype.kind == "f":
            consts.replace(node, k, consts.get(x).astype(np.float64) * pow2(-e_in), f"x2^{-e_in}")
            changed = True
    if t == "Clip":
        for a in ("min", "max"):
            if _attr(node, a) is not None:
                _set_attr(node, a, float(_attr(node, a)) * pow2(-e_in))
                changed = True
    return changed


def _scale_op_constants(node: onnx.NodeProto, op: ScaleOp, solution: ScaleSolution,
                        consts: _Constants) -> RewriteNote | None:
    """Rescale the constants (and scale attributes) of one op by its role in ``solution``.

    Args:
        node: the node (edited in place); op: its :class:`ScaleOp`.
        solution: the exponents being applied.
        consts: the graph's initializers.

    Returns:
        the ``scale`` note for ``node``, or None when nothing about it changed.
    """
    e_in = _input_exponent(op, solution.exponents)
    e_out = solution.produced(op)
    t = node.op_type
    if op.role is Role.LINEAR:
        if t in LINEAR_OPS or t in NORM_OPS:
            _scale_weights(node, consts, e_in, e_out)
        elif t in ("Mul", "Div"):
            _scale_mul_div_constant(node, op, consts, e_in, e_out)
        if e_in or e_out:
            return RewriteNote("scale", node.name, f"{t}: input exponent {e_in}, output exponent {e_out}")
    elif op.role is Role.BOUNDED and e_in and t == "HardSigmoid":
        _set_attr(node, "alpha", float(_attr(node, "alpha", 0.2)) * pow2(e_in))
        return RewriteNote("scale", node.name, f"HardSigmoid alpha x 2^{e_in}")
    elif op.role is Role.TIED and t in TIED_CONSTANTS:
        e_tied = e_in if op.inputs else e_out  # an embedding Gather reads no activation
        if e_tied and _scale_tied_constants(node, consts, e_tied):
            return RewriteNote("scale", node.name, f"{t}: constants x 2^{-e_tied}")
    return None


#: Rescale ``Mul`` nodes the fix inserts are named ``<value>__rescale`` (``__rescale1``, ... for the
#: further steps of a chain); :func:`restoring_rescales` finds them by this mark.
RESCALE_MARK = "__rescale"


def _rescale_nodes(graph: onnx.GraphProto, src: str, exponent: int, dst: str,
                   notes: list[RewriteNote]) -> list[onnx.NodeProto]:
    """``dst = src * 2**exponent`` as a chain of ``Mul`` nodes whose FP32 scalar factors are each a
    normal FP16 number (:func:`~fp16guard.folding.fp16_exact_steps`), so no factor becomes inf or 0
    when the chain runs in FP16; the constants are added to ``graph``, one note to ``notes``."""
    steps = fp16_exact_steps(exponent)
    nodes, cur = [], src
    for i, step in enumerate(steps):
        suffix = "" if i == 0 else str(i)
        out = dst if i == len(steps) - 1 else f"{dst}__part{i}"
        c = f"{dst}__factor{suffix}"
        graph.initializer.append(numpy_helper.from_array(np.array(pow2(step), dtype=np.float32), c))
        nodes.append(helper.make_node("Mul", [cur, c], [out], name=f"{dst}{RESCALE_MARK}{suffix}"))
        cur = out
    notes.append(RewriteNote("rescale_op", dst, f"Mul by 2^{exponent} (no constant could absorb it)"))
    return nodes


def restoring_rescales(model: onnx.ModelProto, fp32_nodes: Sequence[str]) -> list[str]:
    """The rescale ``Mul`` s (:data:`RESCALE_MARK`) that run in FP32: those that scale a graph input
    (beyond FP16 by definition, so before the input cast), those that scale down the output of a
    node kept in FP32 (it may be beyond FP16 before them), and those that restore values only for
    FP32: every reader runs in FP32 (``fp32_nodes``, or another such rescale) or the value is a graph
    output.

    Such a rescale must run in FP32 too: the value it restores may be beyond 65504 (that is why its
    readers are FP32, and why a graph output needs restoring at all), so computed in FP16 it
    would be inf. Its input is the stored, in-range value, cast up once.

    Returns:
        Node names (input scalings first, then restores).
    """
    fp32 = set(fp32_nodes)
    outputs = {o.name for o in model.graph.output}
    readers = consumers(model.graph)
    found = []
    fp32_values = {i.name for i in model.graph.input}  # a rescale of a graph input scales it before the cast
    for node in model.graph.node:
        if RESCALE_MARK in node.name and node.op_type == "Mul" and node.input[0] in fp32_values:
            fp32_values.add(node.output[0])
            fp32.add(node.name)
            found.append(node.name)
    scaling_inputs = set(found)
    producer = {o: n.name for n in model.graph.node for o in n.output}
    # a rescale that scales an FP32 island's output down, with every further step of its chain
    # (2^-25 is 2^-14 * 2^-11): the value is beyond FP16 until the last step, so the whole chain
    # runs in FP32, before the cast to FP16
    island_exits: set[str] = set()
    islands = set(fp32_nodes)
    for node in model.graph.node:
        src = producer.get(node.input[0]) if node.input else None
        if RESCALE_MARK in node.name and node.op_type == "Mul" and (src in islands or src in island_exits):
            island_exits.add(node.name)
    for node in reversed(model.graph.node):
        if node.name in scaling_inputs:
            continue
        if RESCALE_MARK not in node.name or node.op_type != "Mul":
            continue
        users = readers.get(node.output[0], [])
        after_fp32 = node.name in island_exits  # it scales an FP32 island's output down
        if after_fp32 or (users or node.output[0] in outputs) and all(u.name in fp32 for u in users):
            fp32.add(node.name)
            found.append(node.name)
    return found[::-1]


def merge_fp32_rescale_chains(model: onnx.ModelProto, fp32_nodes: Sequence[str]) -> onnx.ModelProto:
    """Chains of rescale ``Mul`` s (:func:`_rescale_nodes`) that all run in FP32 as one ``Mul`` by
    the product of their factors: the chain exists so that each factor is a normal FP16 number, which
    an FP32 node does not need (FP32 holds 2^k exactly for |k| <= 126), and one FP32 node is cheaper
    and one fewer than two. The last node of a chain keeps its name; ``model`` is not modified.

    Returns:
        The model (``model`` itself when no chain has two FP32 steps).
    """
    fp32 = set(fp32_nodes)

    def rescale(n) -> bool:
        """A rescale Mul that runs in FP32."""
        return n.name in fp32 and RESCALE_MARK in n.name and n.op_type == "Mul" and len(n.input) == 2

    readers = consumers(model.graph)
    outputs = {o.name for o in model.graph.output}
    m = _copy(model)
    g = m.graph
    factors = {i.name: float(numpy_helper.to_array(i)) for i in g.initializer if not i.dims}
    producer = {o: n for n in g.node for o in n.output}
    gone: set[str] = set()
    for node in g.node:
        src = producer.get(node.input[0]) if node.input else None
        if not (rescale(node) and src is not None and rescale(src) and src.name not in gone
                and len(readers.get(src.output[0], [])) == 1 and src.output[0] not in outputs
                and node.input[1] in factors and src.input[1] in factors):
            continue
        merged = f"{node.name}__factor"
        factors[merged] = factors[src.input[1]] * factors[node.input[1]]
        g.initializer.append(numpy_helper.from_array(np.array(factors[merged], dtype=np.float32), merged))
        node.input[0], node.input[1] = src.input[0], merged
        gone.add(src.name)
    if not gone:
        return model
    kept = [n for n in g.node if n.name not in gone]
    del g.node[:]
    g.node.extend(kept)
    _remove_unused_initializers(g)
    return m


def _insert_rescales(graph: onnx.GraphProto, solution: ScaleSolution, notes: list[RewriteNote]) -> None:
    """Insert a ``Mul`` by ``2**exponent`` for each of ``solution.rescales``: on one consumer's input
    edge (one Mul per tensor and exponent), or after the producer (its output renamed
    ``{tensor}__unscaled``) when the rescale has no consumer. Appends a ``rescale_op`` note per Mul.

    Raises:
        RewriteError: a graph output has a nonzero exponent and no rescale.
    """
    by_consumer: dict[tuple[str, str], Rescale] = {}
    outputs = {o.name for o in graph.output}
    new_nodes = []
    pending_out: dict[str, tuple[str, int]] = {}  # producer output renamed -> (raw name, exponent)
    for r in solution.rescales:  # two on one value compose: a barrier's graph output scaled down, then restored
        if not r.consumer:
            pending_out[r.tensor] = (f"{r.tensor}__unscaled", pending_out.get(r.tensor, ("", 0))[1] + r.exponent)
    after_producer = set(pending_out)
    pending_out = {t: v for t, v in pending_out.items() if v[1]}
    made: dict[tuple[str, int], str] = {}
    for r in solution.rescales:
        if r.consumer:
            by_consumer[(r.tensor, r.consumer)] = r
    scaled_inputs: dict[str, str] = {}  # a graph input has no producer: its rescale comes first
    for x in [i.name for i in graph.input if i.name in pending_out]:
        _, exponent = pending_out.pop(x)
        scaled_inputs[x] = f"{x}__scaled"
        new_nodes += _rescale_nodes(graph, x, exponent, scaled_inputs[x], notes)

    def edge(x: str, consumer: str) -> str:
        """The value ``consumer`` reads in place of ``x``: the scaled graph input, rescaled once per
        tensor and exponent where the solution puts a rescale on this edge."""
        src = scaled_inputs.get(x, x)
        r = by_consumer.get((x, consumer))
        if r is None:
            return src
        if (src, r.exponent) not in made:
            made[(src, r.exponent)] = f"{src}__x2^{r.exponent}"
            new_nodes.extend(_rescale_nodes(graph, src, r.exponent, made[(src, r.exponent)], notes))
        return made[(src, r.exponent)]

    for node in graph.node:
        for k, x in enumerate(node.input):
            node.input[k] = edge(x, node.name)
        for x in dict.fromkeys(r for _, sub in subgraphs(node) for r in free_reads(sub)):
            src = edge(x, node.name)  # an outer value a subgraph reads by name: rescaled the same way
            if src != x:
                rename_free_reads(node, x, src)
        renamed = []
        for j, o in enumerate(node.output):
            if o in pending_out:
                raw, _ = pending_out[o]
                node.output[j] = raw
                renamed.append(o)
        new_nodes.append(node)
        for o in renamed:
            raw, exponent = pending_out[o]
            new_nodes += _rescale_nodes(graph, raw, exponent, o, notes)
    e = solution.exponents
    for o in outputs:
        if o not in after_producer and e.get(o, 0):
            raise RewriteError(f"graph output {o!r} has exponent {e[o]} but no rescale")
    del graph.node[:]
    graph.node.extend(new_nodes)


def _check_rescaled_range(graph: onnx.GraphProto, ops: Mapping[str, ScaleOp], exponents: Mapping[str, int],
                          fp32: frozenset[str] = frozenset()) -> None:
    """Fail when a float initializer read by an op with a nonzero input exponent exceeds 65504,
    unless every such reader is one of ``fp32`` (an island: its constants stay FP32).

    Raises:
        RewriteError: such an initializer (its readers named).
    """
    for init in graph.initializer:
        v = numpy_helper.to_array(init)
        if v.dtype.kind == "f" and np.any(np.isfinite(v) & (np.abs(v.astype(np.float64)) > FP16_MAX)):
            readers = [n.name for n in graph.node if init.name in n.input]
            if any(ops.get(n) is not None and _input_exponent(ops[n], exponents) and n not in fp32 for n in readers):
                raise RewriteError(f"rescaled constant {init.name} (read by {', '.join(readers)}) exceeds 65504; "
                                   f"lower the headroom target or use --fallback fp32")


def apply_exponents(model: onnx.ModelProto, solution: ScaleSolution) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Rescale constants (and insert ``Mul`` by a power of two only where unavoidable) so every
    activation ``t`` is stored as ``true * 2**-solution.exponents[t]``.

    Per op (``e_in``/``e_out``: exponents of its activation input and output):

    * Conv/ConvTranspose/Gemm/MatMul: ``W *= 2**(e_in - e_out)``, ``b *= 2**-e_out``.
    * Mul by a constant: ``c *= 2**(e_in - e_out)``; Div by a constant: ``c *= 2**(e_out - e_in)``.
    * LayerNorm/InstanceNorm/GroupNorm: ``scale, B *= 2**-e_out``, ``epsilon *= 2**(-2 e_in)``.
    * HardSigmoid: ``alpha *= 2**e_in``.
    * Tied ops: their float constants (an added constant, Clip bounds, the Pad value) ``*= 2**-e``;
      Clip's ``min``/``max`` attributes (opset < 11) too.
    * Each :class:`~fp16guard.scaling.Rescale`: a ``Mul`` by ``2**exponent`` on that edge.
    * Saturating ops (Sigmoid, Tanh, Erf) reading exponent ``k``: ``Clip(-B 2^-k, B 2^-k)``, ``Mul 2^k``
      before them; gated ones (Gelu, HardSwish, Mish) also ``Where(x > B 2^-k, x, f * 2^-k)`` after
      (:func:`_saturate`, :mod:`fp16guard.fixing.laws`).

    Args:
        model: FP32 model whose constants are initializers and whose nodes are named (the one
            ``solution`` was computed for).
        solution: from :func:`fp16guard.scaling.solve` over :func:`scale_ops` of ``model``.

    Returns:
        ``(model', notes)``: one ``scale`` note per rescaled op, one ``rescale_op`` per inserted Mul.

    Raises:
        RewriteError: a rescaled constant overflows FP16 where the op runs in FP16 (not one of
            ``solution.unfixable``'s ops).
    """
    m = _copy(model)
    g = m.graph
    consts = _Constants(g)
    ops = {op.name: op for op in scale_ops(m)}
    notes: list[RewriteNote] = []
    for node in g.node:
        op = ops.get(node.name)
        if op is None:
            continue
        note = _scale_op_constants(node, op, solution, consts)
        if note is not None:
            notes.append(note)
    _insert_rescales(g, solution, notes)
    _saturate(m, solution, ops, notes)
    _close_logs(g, solution, notes)
    _remove_unused_initializers(g)
    _check_rescaled_range(g, ops, solution.exponents, frozenset(n for u in solution.unfixable for n in u.ops))
    return m, notes


def _times_pow2(g: onnx.GraphProto, src: str, exponent: int, dst: str, name: str) -> list[onnx.NodeProto]:
    """``dst = src * 2**exponent`` as ``Mul`` nodes whose factors are each a normal FP16 number
    (:func:`~fp16guard.folding.fp16_exact_steps`), named ``{name}``, ``{name}1``, ... (not rescales:
    they belong to the op that reads them)."""
    nodes, cur = [], src
    steps = fp16_exact_steps(exponent)
    for i, step in enumerate(steps):
        out = dst if i == len(steps) - 1 else f"{dst}__part{i}"
        factor = f"{name}{i or ''}__factor"
        g.initializer.append(numpy_helper.from_array(np.array(pow2(step), np.float32), factor))
        nodes.append(helper.make_node("Mul", [cur, factor], [out], name=f"{name}{i or ''}"))
        cur = out
    return nodes


def _saturate(m: onnx.ModelProto, solution: ScaleSolution, ops: Mapping[str, ScaleOp], notes: list[RewriteNote]) -> None:
    """Each ``SATURATING`` or ``GATED`` op (:mod:`fp16guard.fixing.laws`) that reads its input at an
    exponent ``k != 0`` reads ``Clip(x_s, -B 2^-k, B 2^-k) * 2^k`` (``k < 0``: ``x_s * 2^k``), ``B``
    its row's saturation bound: what it reads is the true value wherever its output is not already
    constant in FP16. A gated op ``f(x) = x g(x)`` then writes ``Where(x_s > B 2^-k, x_s, f(.) * 2^-k)``
    under its output's name (above ``B``, ``f(x)`` rounds to ``x``; below ``-B``, ``f(-B)`` to 0):
    its output stays at exponent ``k``, rounded once."""
    g = m.graph
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)
    e = solution.exponents
    nodes: list[onnx.NodeProto] = []
    for node in list(g.node):
        op = ops.get(node.name)
        k = e.get(op.inputs[0], 0) if op is not None and op.inputs else 0
        if op is None or op.role not in laws.SATURATING_ROLES or not k or not reads_scaled(op, e):
            nodes.append(node)
            continue
        bound, x, name = LAWS[node.op_type].bound, node.input[0], node.name
        read = f"{name}__sat_in"
        if k > 0:
            hi = f"{name}__sat_hi"
            lo = f"{name}__sat_lo"
            g.initializer.extend([numpy_helper.from_array(np.array(bound * pow2(-k), np.float32), hi),
                                  numpy_helper.from_array(np.array(-bound * pow2(-k), np.float32), lo)])
            clipped = f"{name}__sat_clip"
            if opset >= 11:
                nodes.append(helper.make_node("Clip", [x, lo, hi], [clipped], name=clipped))
            else:
                nodes.append(helper.make_node("Clip", [x], [clipped], name=clipped, min=-bound * pow2(-k),
                                              max=bound * pow2(-k)))
            nodes += _times_pow2(g, clipped, k, read, f"{name}__sat_mul")
        else:
            nodes += _times_pow2(g, x, k, read, f"{name}__sat_mul")
        node.input[0] = read
        if op.role is Role.SATURATING:
            nodes.append(node)
            notes.append(RewriteNote("scale", name, f"{node.op_type} reads its input stored x 2^-{k} through "
                                     f"Clip(-{bound:g} 2^-{k}, {bound:g} 2^-{k}) then Mul 2^{k} (saturated beyond "
                                     f"{bound:g}: exact)" if k > 0 else f"{node.op_type} reads its input x 2^{k}"))
            continue
        out = node.output[0]
        node.output[0] = f"{out}__sat_f"
        nodes.append(node)
        if k < 0:
            nodes += _times_pow2(g, node.output[0], -k, out, f"{name}__sat_out")
        else:
            scaled, beyond = f"{out}__sat_scaled", f"{out}__sat_beyond"
            nodes += _times_pow2(g, node.output[0], -k, scaled, f"{name}__sat_out")
            nodes += [helper.make_node("Greater", [x, f"{name}__sat_hi"], [beyond], name=beyond),
                      helper.make_node("Where", [beyond, x, scaled], [out], name=f"{name}__sat_where")]
        notes.append(RewriteNote("scale", name, f"{node.op_type} of a value stored x 2^-{k}: where(x > {bound:g} "
                                 f"2^-{k}, x, f(clip(x, +-{bound:g} 2^-{k}) 2^{k}) 2^-{k}), exact (f(x) rounds to x "
                                 f"beyond {bound:g})"
                                 if k > 0 else f"{node.op_type} of a value stored x 2^{-k}: f(x 2^{k}) 2^{-k}"))
    del g.node[:]
    g.node.extend(nodes)


def _close_logs(g: onnx.GraphProto, solution: ScaleSolution, notes: list[RewriteNote]) -> None:
    """``Log(x * 2**-e) + e ln 2`` for each ``LOG`` op reading its input at exponent ``e != 0``
    (an ``Add`` after the ``Log``, writing its output's name)."""
    nodes = []
    for node in g.node:
        nodes.append(node)
        e = solution.log_offsets.get(node.name)
        if not e:
            continue
        out = node.output[0]
        node.output[0] = f"{out}__log_scaled"
        offset = f"{node.name}__log_offset"
        g.initializer.append(numpy_helper.from_array(np.array(e * np.log(2.0), np.float32), offset))
        nodes.append(helper.make_node("Add", [node.output[0], offset], [out], name=f"{node.name}__close"))
        notes.append(RewriteNote("scale", node.name, f"Log of a value stored x 2^{-e}: {e} ln 2 added after it"))
    del g.node[:]
    g.node.extend(nodes)


def raise_constants(model: onnx.ModelProto, raises: Sequence[tuple[str, float]]) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Raise constants FP16 flushes to zero: every nonzero ``|x| < floor`` becomes ``sign(x) * floor``.

    Args:
        model: FP32 model whose constants are initializers.
        raises: ``(initializer name, floor)`` pairs (the plan's consented underflow entries).

    Raises:
        RewriteError: a name is not an initializer of ``model``.
    """
    m = _copy(model)
    g = m.graph
    by_name = {i.name: k for k, i in enumerate(g.initializer)}
    notes = []
    for name, floor in raises:
        if name not in by_name:
            raise RewriteError(f"plan raises constant {name!r}, which is not in the model")
        init = g.initializer[by_name[name]]
        v = numpy_helper.to_array(init)
        new, count = raise_small(v, floor)
        g.initializer[by_name[name]].CopyFrom(numpy_helper.from_array(new, name))
        notes.append(RewriteNote("raise_constant", name, f"{count} value(s) below {floor:.3g} raised to {floor:.3g}"))
    return m, notes


#: What a saturated mask constant becomes: -2**15. Exact in FP16, far below any score that still
#: counts after a softmax (``exp(-32768 - max)`` is 0 in every precision), and 2**15 away from FP16's
#: limit, so a masked score ``s - 32768`` cannot overflow to -inf for any ``|s| < 32736``.
SATURATED_MASK = -(2.0 ** 15)

#: Element types whose values are whole numbers: a float cast of them is an indicator when it is 0/1.
INDICATOR_TYPES = frozenset({TensorProto.BOOL, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                             TensorProto.INT32, TensorProto.INT64})

#: Ops that annihilate a very negative additive term: its position gets weight (or rank) zero.
MASK_SINKS = frozenset({"Softmax", "LogSoftmax", "ReduceMax", "ArgMax", "TopK"})
#: Ops that move or broadcast a mask without changing its values.
MASK_MOVES = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Expand", "Transpose", "Slice", "Identity", "Flatten",
                        "Tile", "Cast"})


def _is_indicator(value: str, producer: Mapping[str, onnx.NodeProto], consts: Mapping[str, np.ndarray],
                  types: Mapping[str, int]) -> bool:
    """Whether ``value`` is a 0/1 indicator: a bool or integer tensor cast to float (an attention
    mask, whose integers are taken to be 0/1 as tokenizers write them), ``1 - m`` of such an ``m``,
    or either moved or broadcast. ``consts``: the graph's initializer values by name."""
    node = producer.get(value)
    if node is None:
        return False
    if node.op_type == "Cast":  # of an integer or bool tensor (the mask input, a comparison)
        return types.get(node.input[0]) in INDICATOR_TYPES
    if node.op_type in MASK_MOVES:
        return _is_indicator(node.input[0], producer, consts, types)
    if node.op_type == "Sub" and node.input[0] in consts and np.all(consts[node.input[0]] == 1):  # 1 - m
        return _is_indicator(node.input[1], producer, consts, types)
    return False


def _annihilated(value: str, readers: Mapping[str, list[onnx.NodeProto]], producer, consts, types,
                 adds: list[tuple[onnx.NodeProto, int]], pure: bool = True, depth: int = 0) -> str | None:
    """How every use of ``value`` (a very negative additive term) ends at an op that gives its
    positions weight zero, or None when one use does not: the proof behind :func:`saturate_masks`.

    While ``value`` is the pure mask term, a use may scale it by an indicator (``(1 - m) * C``),
    select it (``Where(cond, C, x)``), move or broadcast it, or add it to scores (that ``Add`` and
    the mask side's input index are appended to ``adds``). From then on it may only be moved or
    added to, and must end in Softmax, LogSoftmax, ReduceMax, ArgMax or TopK.
    """
    uses = readers.get(value, [])
    if not uses or depth > 32:
        return None
    sinks = []
    for node in uses:
        t = node.op_type
        if t in MASK_SINKS and node.input[0] == value:  # also the pure term: masked_fill's Where(m, C, scores)
            sinks.append(t)
            continue
        if pure and t == "Mul" and len(node.input) == 2:
            other = node.input[1] if node.input[0] == value else node.input[0]
            if not _is_indicator(other, producer, consts, types):
                return None
        elif pure and t == "Where" and node.input[0] != value:
            pass
        elif t == "Add" and len(node.input) == 2 and node.input[0] != node.input[1]:
            if pure:
                adds.append((node, list(node.input).index(value)))
        elif t not in MASK_MOVES or t == "Cast" and _attr(node, "to") not in (FLOAT, TensorProto.FLOAT16,
                                                                               TensorProto.DOUBLE):
            return None
        found = _annihilated(node.output[0], readers, producer, consts, types, adds, pure and t != "Add", depth + 1)
        if found is None:
            return None
        sinks.append(found)
    return ", ".join(dict.fromkeys(sinks))


def _paths_to_sinks(value: str, readers: Mapping[str, list[onnx.NodeProto]], depth: int = 0
                    ) -> list[tuple[onnx.NodeProto, bool, bool]] | None:
    """Every path from ``value`` (the sum of scores and a mask) to a mask sink, as ``(sink, moved,
    added)``: whether the path moves the value (reshape, slice, ...) and whether it adds further
    terms (T5 adds the masked position bias to the scores of every layer); None if a path
    ends elsewhere (:func:`_annihilated` has proved it does not)."""
    out = []
    for node in readers.get(value, []):
        if node.op_type in MASK_SINKS and node.input[0] == value:
            out.append((node, False, False))
            continue
        rest = _paths_to_sinks(node.output[0], readers, depth + 1) if depth < 32 else None
        if rest is None:
            return None
        moved, added = node.op_type != "Add", node.op_type == "Add"
        out += [(sink, m or moved, a or added) for sink, m, a in rest]
    return out


def _mask_guard(g: onnx.GraphProto, name: str, value: str, mask: str, out: str) -> list[onnx.NodeProto]:
    """``out = Where(mask < SATURATED_MASK / 2, SATURATED_MASK, value)``: a masked position holds
    the saturated mask value, whatever its score, so a fully masked row is uniform after the
    softmax, as in FP32 where ``score + finfo.min`` absorbs the score; every other position keeps
    ``value``. ``mask`` is the mask term as it was added (0 or a position bias where unmasked, the
    saturated constant where masked)."""
    low, fill, keep = f"{name}__masked_below", f"{name}__masked_value", f"{name}__is_masked"
    g.initializer.append(numpy_helper.from_array(np.array(SATURATED_MASK / 2, np.float32), low))
    g.initializer.append(numpy_helper.from_array(np.array(SATURATED_MASK, np.float32), fill))
    return [helper.make_node("Less", [mask, low], [keep], name=keep),
            helper.make_node("Where", [keep, fill, value], [out], name=name)]


def _guard_sites(adds: Sequence[tuple[onnx.NodeProto, int]], readers: Mapping[str, list[onnx.NodeProto]]
                 ) -> tuple[dict[str, int], dict[str, list[str]]] | None:
    """Where the ``mask == 0`` selections go, for each ``Add(scores, mask)`` of ``adds``:
    ``({Add node: mask index}, {sink node: [masks]})``. An ``Add`` whose sum reaches its sinks
    only moved becomes the selection itself; one whose sum reaches them only through further
    ``Add``s (no move, so the mask still broadcasts) gets the selection at each sink's input;
    None for a mix (no proof that the mask lines up with the sink's input)."""
    at_add: dict[str, int] = {}
    at_sink: dict[str, list[str]] = {}
    for add, index in adds:
        paths = _paths_to_sinks(add.output[0], readers)
        if paths is None:
            return None
        if not any(added for _, _, added in paths):
            at_add[add.name] = index
        elif not any(moved for _, moved, _ in paths):
            for sink, _, _ in paths:
                masks = at_sink.setdefault(sink.name, [])
                if add.input[index] not in masks:
                    masks.append(add.input[index])
        else:
            return None
    return at_add, at_sink


def saturate_masks(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Saturate additive-mask constants beyond FP16 (``finfo(float32).min``, -1e9) to
    :data:`SATURATED_MASK`, where that provably leaves the outputs unchanged.

    ``(1 - mask) * -3.4e38`` added to attention scores becomes ``-inf`` in FP16, and ``0 * -inf``
    is NaN. A constant is saturated only when all its values beyond FP16 are negative and every
    use is annihilated (:func:`_annihilated`): scaled by a 0/1 indicator, selected, moved or added
    to scores, then a softmax (or max, argmax, top-k) along the masked positions. Each sum of
    scores and mask is read through ``Where(mask < -2^14, -2^15, sum)`` (:func:`_mask_guard`): at
    the ``Add`` itself when the sum only moves on to the softmax, at the softmax input when further
    terms are added (T5 adds the masked position bias to every layer's scores); a mask that
    reaches the softmax by selection alone (``masked_fill``'s ``Where(m, C, scores)``) needs no
    guard. Then an unmasked position's weight is unchanged (the masked terms' ``exp`` is 0 either
    way), a masked one stays exactly 0, and a fully masked row holds one value everywhere, uniform
    after the softmax as in FP32 (where ``score + finfo.min`` absorbs the score). Weights are never
    clamped: only mask constants with this proof.

    Returns:
        ``(model', notes)``: one ``saturate_constant`` note per constant, with its reason.
    """
    model = _copy(model)
    g = model.graph
    readers = consumers(g)
    producer = {o: n for n in g.node for o in n.output}
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    types = value_types(model)
    notes: list[RewriteNote] = []
    selected: dict[str, int] = {}  # Add node -> index of its mask input
    guarded: dict[str, list[str]] = {}  # sink node -> masks selected at its input
    for init in list(g.initializer):
        value = numpy_helper.to_array(init)
        if value.dtype.kind != "f":
            continue
        beyond = np.isfinite(value) & (np.abs(value.astype(np.float64)) > FP16_MAX)
        if not beyond.any() or (value[beyond] > 0).any():
            continue
        adds: list[tuple[onnx.NodeProto, int]] = []
        sinks = _annihilated(init.name, readers, producer, consts, types, adds)
        if sinks is None or len(value[~beyond]) and np.any(value[~beyond] != 0):
            continue  # no proof, or other nonzero values: the mask == 0 test below would misread them
        sites = _guard_sites(adds, readers)
        if sites is None:
            continue
        new = np.where(beyond, SATURATED_MASK, value).astype(value.dtype)
        init.CopyFrom(numpy_helper.from_array(new, init.name))
        selected.update(sites[0])
        for sink, masks in sites[1].items():
            guarded.setdefault(sink, [m for m in masks if m not in guarded.get(sink, [])])
        notes.append(RewriteNote("saturate_constant", init.name,
                                 f"{int(beyond.sum())} value(s) down to {float(value[beyond].min()):.3g} set to "
                                 f"-2^15, and the sums of {len(adds)} Add(scores, mask) read through Where(mask < -2^14, -2^15, sum): an "
                                 f"additive mask whose every use ends in {sinks}, where its positions get weight 0 "
                                 f"either way and a fully masked row stays uniform"))
    nodes = []
    for node in g.node:
        if node.name in selected:
            out, node.output[0] = node.output[0], f"{node.output[0]}__unguarded"
            nodes += [node, *_mask_guard(g, f"{node.name}__masked", node.output[0], node.input[selected[node.name]], out)]
            continue
        for k, mask in enumerate(guarded.get(node.name, [])):
            name = f"{node.name}__masked{k}"
            nodes += _mask_guard(g, name, node.input[0], mask, name)
            node.input[0] = name
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return model, notes
