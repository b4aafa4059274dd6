"""Rewrites of FP32 ONNX graphs that keep them exact in real arithmetic and in FP16 range.

Each pass is a pure function ``f(model, ...) -> (new_model, notes)``: the argument is never
modified, and ``notes`` is a list of :class:`RewriteNote` (what changed, where, and why), the
rows of ``fp16guard fix``'s report. The math lives in :mod:`fp16guard.folding`; each pass's
machinery in a module of its own job, which this one drives: :mod:`~fp16guard.fixing.onnx_edit`
(copy-on-write constants), :mod:`~fp16guard.fixing.onnx_fold` (folding),
:mod:`~fp16guard.fixing.onnx_roles` (each op as the solver sees it),
:mod:`~fp16guard.fixing.onnx_exponents` (the rewrites of :func:`apply_exponents`) and
:mod:`~fp16guard.fixing.onnx_masks` (the proof of :func:`saturate_masks`).

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
   powers of two so that each activation is stored as ``true * 2**-e`` (:mod:`fp16guard.fixing.solver_model`
   says which ops absorb, carry or refuse a scale); a ``Mul`` by a power of two is inserted only
   where no constant can absorb it.
5. :func:`raise_constants`: constants that FP16 flushes to zero (an epsilon of 1e-10 under a log)
   raised to a value FP16 holds, where the plan consents.

Between steps 1 and 2, :func:`saturate_masks` saturates additive-mask constants beyond FP16 where
that provably changes no output. :func:`scale_ops` is the graph as the solver sees it;
:func:`restoring_rescales` and :func:`merge_fp32_rescale_chains` place rescales for the typed FP16
conversion.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fp16guard.errors import RewriteError
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.onnx_edit import (
    FLOAT,
    Constants,
    copy_model,
    name_nodes,
    node_attr,
    remove_unused_initializers,
)
from fp16guard.fixing.onnx_exponents import (
    RESCALE_MARK,
    check_rescaled_range,
    close_logs,
    insert_rescales,
    saturate,
    scale_op_constants,
)
from fp16guard.fixing.onnx_fold import channel_constant, fold_constant_nodes, next_affine_op, out_channels
from fp16guard.fixing.onnx_masks import SATURATED_MASK, annihilated, guard_sites, mask_guard
from fp16guard.fixing.onnx_roles import SCALE_BLIND_OPS, op_role, scaled_constants
from fp16guard.fixing.solver_model import Role, ScaledConstant, ScaleOp, ScaleSolution
from fp16guard.folding import fold_affine_into_weights, fold_batchnorm, keeps_fp16_precision, raise_small
from fp16guard.fp16 import FP16_MAX
from fp16guard.onnx_graph import consumers, float64_as_float32, infer_shapes, node_reads, node_scope, subgraphs, value_types


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
    m = copy_model(model)
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
    m = copy_model(model)
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
    folded = fold_constant_nodes(m)
    name_nodes(g)
    notes = [RewriteNote("constant_to_initializer", "graph", f"{moved} Constant nodes became initializers")] if moved else []
    if folded:
        notes.append(RewriteNote("constant_to_initializer", "graph",
                                 f"{folded} nodes computed from constants alone (Identity, Cast, Transpose, ...) "
                                 "evaluated into initializers"))
    return m, notes


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
    m = copy_model(model)
    g = m.graph
    consts = Constants(g)
    readers = consumers(g)
    outputs = {o.name for o in g.output}
    drop: set[str] = set()
    notes = []
    for node in g.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.input[1] not in consts:
            continue
        w0 = consts.get(node.input[1])
        oc = out_channels(node, w0)
        if oc is None:
            continue
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if has_bias and node.input[2] not in consts:
            continue  # a bias computed in the graph: nothing to fold into
        w = w0.astype(np.float64)
        b = consts.get(node.input[2]).astype(np.float64) if has_bias else np.zeros(oc[0])
        folded = []
        while True:
            found = next_affine_op(node.output[0], readers, outputs, consts, scales)
            if found is None:
                break
            op, other = found
            c = channel_constant(consts.get(other), oc[0], w.ndim)
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
    remove_unused_initializers(g)
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
    m = copy_model(model)
    g = m.graph
    consts = Constants(g)
    readers = consumers(g)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    ranks = {}
    for vi in [*infer_shapes(m).graph.value_info, *g.input]:
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    drop: set[str] = set()
    replace: dict[str, list[onnx.NodeProto]] = {}
    notes = []
    for bn in g.node:
        if bn.op_type != "BatchNormalization":
            continue
        if len(bn.output) > 1 and any(bn.output[1:]) or node_attr(bn, "training_mode", 0):
            raise RewriteError(f"{bn.name}: BatchNormalization in training mode cannot be folded; export in eval mode")
        if not all(t in consts for t in bn.input[1:5]):
            raise RewriteError(f"{bn.name}: BatchNormalization statistics are not constants")
        scale, shift = fold_batchnorm(*(consts.get(t) for t in bn.input[1:5]), float(node_attr(bn, "epsilon", 1e-5)))
        src = bn.input[0]
        conv = producer.get(src)
        constant_bias = conv is not None and (len(conv.input) < 3 or not conv.input[2] or conv.input[2] in consts)
        if (conv is not None and conv.op_type in ("Conv", "ConvTranspose") and conv.input[1] in consts
                and constant_bias and len(readers.get(src, [])) == 1 and src not in outputs):
            w = consts.get(conv.input[1])
            oc = out_channels(conv, w)
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
    remove_unused_initializers(g)
    return m, notes


def scale_ops(model: onnx.ModelProto) -> list[ScaleOp]:
    """The graph as :func:`fp16guard.fixing.solver.solve` sees it: each node's :class:`Role` and its
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
        role, degree = op_role(node, acts, values, types)
        if computed.intersection(node.input) and node.op_type not in SCALE_BLIND_OPS or subgraphs(node):
            role, degree = Role.BARRIER, Fraction(1)
        ops.append(ScaleOp(node.name, role, acts, outs, node_scope(node), degree,
                           scaled_constants(node, role, acts, values, arrays)))
    return ops


def apply_exponents(model: onnx.ModelProto, solution: ScaleSolution,
                    ops: Sequence[ScaleOp] | None = None) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Rescale constants (and insert ``Mul`` by a power of two only where unavoidable) so every
    activation ``t`` is stored as ``true * 2**-solution.exponents[t]``.

    Per op (``e_in``/``e_out``: exponents of its activation input and output):

    * Conv/ConvTranspose/Gemm/MatMul: ``W *= 2**(e_in - e_out)``, ``b *= 2**-e_out``.
    * Mul by a constant: ``c *= 2**(e_in - e_out)``; Div by a constant: ``c *= 2**(e_out - e_in)``.
    * LayerNorm/InstanceNorm/GroupNorm: ``scale, B *= 2**-e_out``, ``epsilon *= 2**(-2 e_in)``.
    * HardSigmoid: ``alpha *= 2**e_in``.
    * Tied ops: their float constants (an added constant, Clip bounds, the Pad value) ``*= 2**-e``;
      Clip's ``min``/``max`` attributes (opset < 11) too.
    * Each :class:`~fp16guard.fixing.solver_model.Rescale`: a ``Mul`` by ``2**exponent`` on that edge.
    * Saturating ops (Sigmoid, Tanh, Erf) reading exponent ``k``: ``Clip(-B 2^-k, B 2^-k)``, ``Mul 2^k``
      before them; gated ones (Gelu, HardSwish, Mish) also ``Where(x > B 2^-k, x, f * 2^-k)`` after
      (:func:`~fp16guard.fixing.onnx_exponents.saturate`, :mod:`fp16guard.fixing.laws`).

    Args:
        model: FP32 model whose constants are initializers and whose nodes are named (the one
            ``solution`` was computed for).
        solution: from :func:`fp16guard.fixing.solver.solve` over :func:`scale_ops` of ``model``.
        ops: :func:`scale_ops` of ``model``, where the caller has them (worked out here otherwise).

    Returns:
        ``(model', notes)``: one ``scale`` note per rescaled op, one ``rescale_op`` per inserted Mul.

    Raises:
        RewriteError: a rescaled constant overflows FP16 where the op runs in FP16 (not one of
            ``solution.unfixable``'s ops).
    """
    m = copy_model(model)
    g = m.graph
    consts = Constants(g)
    ops = {op.name: op for op in (scale_ops(m) if ops is None else ops)}
    notes: list[RewriteNote] = []
    for node in g.node:
        op = ops.get(node.name)
        if op is None:
            continue
        note = scale_op_constants(node, op, solution, consts)
        if note is not None:
            notes.append(note)
    insert_rescales(g, solution, notes)
    saturate(m, solution, ops, notes)
    close_logs(g, solution, notes)
    remove_unused_initializers(g)
    check_rescaled_range(g, ops, solution.exponents, frozenset(n for u in solution.unfixable for n in u.ops))
    return m, notes


def restoring_rescales(model: onnx.ModelProto, fp32_nodes: Sequence[str]) -> list[str]:
    """The rescale ``Mul`` s (:data:`~fp16guard.fixing.onnx_exponents.RESCALE_MARK`) that run in FP32:
    those that scale a graph input (beyond FP16 by definition, so before the input cast), those that
    scale down the output of a node kept in FP32 (it may be beyond FP16 before them), and those that
    restore values only for FP32: every reader runs in FP32 (``fp32_nodes``, or another such rescale)
    or the value is a graph output.

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
    """Chains of rescale ``Mul`` s (:func:`~fp16guard.fixing.onnx_exponents.insert_rescales`) that all
    run in FP32 as one ``Mul`` by the product of their factors: the chain exists so that each factor
    is a normal FP16 number, which an FP32 node does not need (FP32 holds 2^k exactly for
    |k| <= 126), and one FP32 node is cheaper and one fewer than two. The last node of a chain keeps
    its name; ``model`` is not modified.

    Returns:
        The model (``model`` itself when no chain has two FP32 steps).
    """
    fp32 = set(fp32_nodes)

    def rescale(n) -> bool:
        """A rescale Mul that runs in FP32."""
        return n.name in fp32 and RESCALE_MARK in n.name and n.op_type == "Mul" and len(n.input) == 2

    readers = consumers(model.graph)
    outputs = {o.name for o in model.graph.output}
    m = copy_model(model)
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
    remove_unused_initializers(g)
    return m


def raise_constants(model: onnx.ModelProto, raises: Sequence[tuple[str, float]]) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Raise constants FP16 flushes to zero: every nonzero ``|x| < floor`` becomes ``sign(x) * floor``.

    Args:
        model: FP32 model whose constants are initializers.
        raises: ``(initializer name, floor)`` pairs (the plan's consented underflow entries).

    Raises:
        RewriteError: a name is not an initializer of ``model``.
    """
    m = copy_model(model)
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


def saturate_masks(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Saturate additive-mask constants beyond FP16 (``finfo(float32).min``, -1e9) to
    :data:`SATURATED_MASK`, where that provably leaves the outputs unchanged.

    ``(1 - mask) * -3.4e38`` added to attention scores becomes ``-inf`` in FP16, and ``0 * -inf``
    is NaN. A constant is saturated only when all its values beyond FP16 are negative and every
    use is annihilated (:func:`~fp16guard.fixing.onnx_masks.annihilated`): scaled by a 0/1
    indicator, selected, moved or added to scores, then a softmax (or max, argmax, top-k) along the
    masked positions. Each sum of scores and mask is read through
    ``Where(mask < -2^14, -2^15, sum)`` (:func:`~fp16guard.fixing.onnx_masks.mask_guard`): at
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
    model = copy_model(model)
    g = model.graph
    readers = consumers(g)
    producer = {o: n for n in g.node for o in n.output}
    consts = Constants(g).values  # decoded when read
    types = None
    notes: list[RewriteNote] = []
    selected: dict[str, int] = {}  # Add node -> index of its mask input
    guarded: dict[str, list[str]] = {}  # sink node -> masks selected at its input
    for init in list(g.initializer):
        if init.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            continue
        value = consts[init.name]
        if not value.size or -FP16_MAX <= value.min() and value.max() <= FP16_MAX:
            continue  # every value fits (NaN too: a mask is never NaN)
        beyond = np.isfinite(value) & (np.abs(value.astype(np.float64)) > FP16_MAX)
        if not beyond.any() or (value[beyond] > 0).any():
            continue
        types = value_types(model) if types is None else types
        adds: list[tuple[onnx.NodeProto, int]] = []
        sinks = annihilated(init.name, readers, producer, consts, types, adds)
        if sinks is None or len(value[~beyond]) and np.any(value[~beyond] != 0):
            continue  # no proof, or other nonzero values: the mask == 0 test below would misread them
        sites = guard_sites(adds, readers)
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
            nodes += [node, *mask_guard(g, f"{node.name}__masked", node.output[0], node.input[selected[node.name]], out)]
            continue
        for k, mask in enumerate(guarded.get(node.name, [])):
            name = f"{node.name}__masked{k}"
            nodes += mask_guard(g, name, node.input[0], mask, name)
            node.input[0] = name
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return model, notes
