"""Typed FP16 ONNX (the form TensorRT 11 needs) and its strict CPU emulation.

:func:`to_typed_fp16` turns an FP32 graph into a *typed* FP16 graph: FP16 initializers, FP16
activations, FP32 graph inputs and outputs with ``Cast`` nodes at the boundary. TensorRT 11 dropped
the FP16 builder flag: its networks are strongly typed, so the precision of every layer is the type
of its tensors in the ONNX file.

Why not onnxconverter-common's ``convert_float_to_float16``: by default it raises every weight
below 1e-7 to 1e-7 and clamps every weight above 1e4 to 1e4, which alone breaks valid models and
hides the very overflow fp16guard looks for (both can be switched off), and on the prefixes a
bisect produces its Cast clean-up raises ``ValueError: The downstream node of the second cast node
should be graph output`` (a prefix output that also feeds an FP32 op, e.g. PP-OCRv4's Resize). The
conversion here is small and total: a value FP16 can hold is stored rounded to nearest, a value
beyond 65504 becomes inf, a value below 2^-25 becomes 0, as an FP16 cast does; nothing is clamped.
:class:`Fp16Conversion` lists the initializers and ``Constant`` values that did not fit.

:func:`emulation_model` rewrites a typed FP16 graph into an FP32 graph that ONNX Runtime's CPU EP
runs *as if* in FP16: every FP16 tensor becomes an FP32 tensor whose producer is followed by a
``Cast(to=FLOAT16) -> Cast(to=FLOAT)`` pair, i.e. every op's output is rounded through IEEE FP16
(overflow to inf, subnormals, flush to zero), every weight holds its FP16 value, and the arithmetic
of each op runs in FP32 (as FP16 kernels with FP32 accumulation do), inside ``If``/``Loop``/``Scan``
subgraphs too. BF16 tensors (islands converted
with ``island_dtype=TensorProto.BFLOAT16``) are rounded the same way through
``Cast(to=BFLOAT16)``: round-to-nearest-even on the upper 16 bits of the float32, a value beyond
:data:`~fp16guard.fp16.BF16_MAX` to inf, as BF16 hardware stores it. Run it with graph
optimizations off (:func:`emulation_session_options`): ORT's optimizer removes back-to-back Casts,
and its CPU EP has no FP16 kernel for many ops, both of which would hide an overflow.
"""

from __future__ import annotations

import itertools
from collections import ChainMap
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from fp16guard.fp16 import BF16_MAX, BF16_MIN_SUBNORMAL, FP16_MAX, FP16_MIN_SUBNORMAL
from fp16guard.control_flow import all_nodes, inner_constants, inner_types
from fp16guard.onnx_graph import graph_constants, graph_defines, subgraphs, value_types

#: Storage precisions of a typed graph, as ONNX element types: FP16 (the default), FP32 and BF16
#: (islands: nodes that need values beyond FP16).
FP16, FP32, BF16 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.BFLOAT16

#: The precision of islands by name, as ``fix --islands`` and ``--fallback`` spell it.
ISLAND_DTYPES = {"fp32": FP32, "bf16": BF16}

#: Name suffix of a Cast to each precision (``x__to16``, ``x__cast_to_fp16``; ``x__tobf16``, ...).
_CAST_SUFFIX = {FP16: "16", FP32: "32", BF16: "bf16"}

#: Ops kept in FP32 (with Casts around them) by default: no FP16 form in ONNX Runtime / TensorRT,
#: float inputs that are really coordinates/indices, or quantization (a QDQ model's
#: QuantizeLinear/DequantizeLinear, their scales and zero points stay as quantized: before opset 19
#: their schemas take float32 only).
DEFAULT_FP32_OPS = ("NonMaxSuppression", "RoiAlign", "Range", "RandomUniformLike", "RandomNormalLike",
                    "RandomUniform", "RandomNormal", "Multinomial", "QuantizeLinear", "DequantizeLinear",
                    "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul")

#: Float inputs that an op's schema requires in FP32 even when the op runs in FP16:
#: ``{op_type: input indices}`` (Resize's ``roi`` and ``scales``, Upsample's ``scales``).
FP32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}


@dataclass(frozen=True)
class UnfitConstant:
    """An FP32 initializer or ``Constant`` value that FP16 cannot hold exactly in range.

    Attributes:
        name: tensor name in the graph.
        numel: element count.
        overflow: elements with finite |x| > 65504 (they become inf).
        flushed: nonzero elements with |x| < 2^-25 (they round to 0).
        amax: largest finite |x|.
    """

    name: str
    numel: int
    overflow: int
    flushed: int
    amax: float

    def to_json(self) -> dict:
        """Plain-JSON form."""
        return dict(name=self.name, numel=self.numel, overflow=self.overflow, flushed=self.flushed, amax=self.amax)


@dataclass
class Fp16Conversion:
    """What :func:`to_typed_fp16` did.

    Attributes:
        unfit: constants that did not fit FP16 (see :class:`UnfitConstant`).
        fp32_nodes: names of nodes left in FP32 (op on the FP32 list, or asked by name).
        casts: Cast nodes inserted at precision boundaries.
        bf16_nodes: names of nodes that run in BF16 (``island_dtype=TensorProto.BFLOAT16``).
        bf16_refused: nodes asked to run in BF16 that stay in FP32, with the reason (no bfloat16
            type in the op's ONNX schema at the model's opset, or a constant beyond BF16).
    """

    unfit: list[UnfitConstant] = field(default_factory=list)
    fp32_nodes: list[str] = field(default_factory=list)
    casts: int = 0
    bf16_nodes: list[str] = field(default_factory=list)
    bf16_refused: dict[str, str] = field(default_factory=dict)


def unfit_constants(model: onnx.ModelProto) -> list[UnfitConstant]:
    """FP32 initializers and ``Constant`` values of ``model`` that overflow or flush in FP16 (those
    inside ``If``/``Loop``/``Scan`` subgraphs too)."""
    out = []
    for name, v in {**graph_constants(model), **inner_constants(model)}.items():
        if v.dtype != np.float32:
            continue
        a = np.abs(v)  # float32 holds 65504 and 2**-25 exactly: the same comparisons as in float64
        top = a.max() if a.size else 0.0
        finite = np.isfinite(a) if not np.isfinite(top) else None  # None: all finite (the usual case)
        over = int(np.count_nonzero(a > FP16_MAX if finite is None else finite & (a > FP16_MAX)))
        # below half the smallest subnormal, round-to-nearest gives zero
        flushed = int(np.count_nonzero((a > 0) & (a <= FP16_MIN_SUBNORMAL / 2)))
        if over or flushed:
            amax = float(top) if finite is None else (float(a[finite].max()) if finite.any() else 0.0)
            out.append(UnfitConstant(name, int(v.size), over, flushed, amax))
    return out


def _fp16_tensor(t: onnx.TensorProto, name: str | None = None) -> onnx.TensorProto:
    with np.errstate(over="ignore"):
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), name or t.name)


def _stored_as(t: onnx.TensorProto, dtype: int) -> onnx.TensorProto:
    """``t`` stored in ``dtype`` (FP16 or BF16), rounded to nearest even; FP32 unchanged."""
    if dtype == FP16:
        return _fp16_tensor(t)
    if dtype == BF16:
        import ml_dtypes  # onnx's own dependency for its 8- and 16-bit float types

        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32).astype(ml_dtypes.bfloat16), t.name)
    return t


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), onnx.defs.onnx_opset_version())


def bf16_refusal(node: onnx.NodeProto, opset: int, types: dict[str, int],
                 constants: dict[str, np.ndarray] | None = None) -> str | None:
    """Why ``node`` cannot run in BF16 at ``opset``, or None when it can.

    It can when the op's ONNX schema (``onnx.defs.get_schema(op, opset).type_constraints``) allows
    ``tensor(bfloat16)`` for every float32 input and output (inputs that stay FP32 anyway,
    :data:`FP32_INPUTS`, aside), and no float constant it reads overflows BF16 or flushes in it
    (``finfo(float32).min`` is inf in BF16). ``Conv`` before opset 22, for instance, takes no bfloat16.

    Args:
        node: a node of the FP32 graph.
        opset: the model's default-domain opset (:func:`model_opset`).
        types: element type of every tensor.
        constants: float constants by name (``graph_constants``), for the range check.
    """
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain} op: no BF16 form in the ONNX schemas"
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return f"{node.op_type} has no ONNX schema at opset {opset}"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    skip = FP32_INPUTS.get(node.op_type, ())
    for kind, formals, names in (("input", schema.inputs, node.input), ("output", schema.outputs, node.output)):
        for k, name in enumerate(names):
            if not name or types.get(name) != FP32 or not formals or (kind == "input" and k in skip):
                continue
            formal = formals[min(k, len(formals) - 1)]  # the last formal may be variadic
            if "tensor(bfloat16)" not in allowed.get(formal.type_str, {formal.type_str}):
                return (f"{node.op_type}-{schema.since_version} (opset {opset}) takes no bfloat16 {kind} "
                        f"{formal.name} ({formal.type_str})")
    for name in node.input:
        v = (constants or {}).get(name)
        if v is None or v.dtype != np.float32:
            continue
        a = np.abs(v.astype(np.float64))
        if np.any(np.isfinite(a) & (a > BF16_MAX)):
            return f"reads {name} (amax {float(a[np.isfinite(a)].max()):.4g}), beyond BF16's {BF16_MAX:.4g}"
        if np.any((a > 0) & (a <= BF16_MIN_SUBNORMAL / 2)):
            return f"reads {name}, whose nonzero values below {BF16_MIN_SUBNORMAL:.3g} are 0 in BF16"
    return None


def to_typed_fp16(model: onnx.ModelProto, *, fp32_ops: tuple[str, ...] | None = None,
                  node_block_list: list[str] | None = None,
                  island_dtype: int = TensorProto.FLOAT) -> tuple[onnx.ModelProto, Fp16Conversion]:
    """Typed FP16 copy of an FP32 ONNX graph, FP32 at its inputs and outputs, nothing clamped.

    Every node runs in FP16 except those whose op is in ``fp32_ops`` (FP32) or whose name is in
    ``node_block_list`` (the islands: ``island_dtype``). Float tensors take the precision of their
    producer; a Cast is inserted (once per tensor and precision) wherever a consumer needs another
    one, and before every float graph output. Float initializers and ``Constant`` values read only by
    FP16 (BF16) nodes are stored in FP16 (BF16, rounded to nearest even); those with readers of
    several precisions stay FP32 (the others then get a Cast). ``Cast(to=FLOAT)`` and
    ``ConstantOfShape`` inside an FP16 (BF16) region produce FP16 (BF16).

    ``If``/``Loop``/``Scan`` subgraphs are converted by the same rules (:func:`_convert_graph`): their
    nodes run in FP16 unless listed, while the control flow node's inputs and outputs, and so its
    subgraphs' formal inputs and outputs, stay FP32 (a Cast inside where needed); an outer weight read
    only by FP16 nodes inside is stored in FP16.

    Args:
        model: FP32 ``onnx.ModelProto`` (not modified). Shape inference must type its tensors.
        fp32_ops: op types to keep in FP32 (default :data:`DEFAULT_FP32_OPS`; ops of the
            ``ai.onnx.ml`` domain always stay FP32).
        node_block_list: node names to keep out of FP16 (the plan's islands, earlier offenders).
        island_dtype: their precision: ``TensorProto.FLOAT`` (default) or ``TensorProto.BFLOAT16``
            (FP32's range at tensor-core speed on Ampere and later, 8 significant bits). A listed
            node that cannot run in BF16 (:func:`bf16_refusal`) stays FP32, with the reason in
            ``conversion.bf16_refused``.

    Returns:
        ``(fp16_model, conversion)``.

    Raises:
        ValueError: another ``island_dtype``.
    """
    if island_dtype not in (FP32, BF16):
        raise ValueError(f"island_dtype must be TensorProto.FLOAT or TensorProto.BFLOAT16, got {island_dtype!r}")
    fp32_ops = DEFAULT_FP32_OPS if fp32_ops is None else tuple(fp32_ops)
    blocked_names = set(node_block_list or ())
    types = _types(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    report = Fp16Conversion(unfit=unfit_constants(model))
    if island_dtype == BF16:
        opset, values = model_opset(model), {**graph_constants(model), **inner_constants(model)}
        for node in all_nodes(g):
            reason = bf16_refusal(node, opset, types, values) if node.name in blocked_names else None
            if reason:
                report.bf16_refused[node.name] = reason

    def node_dtype(node: onnx.NodeProto) -> int:
        """The precision ``node`` runs in: FP32 (op list, ai.onnx.ml, an island op without BF16, the
        boundary of a node with subgraphs), the island's, or FP16."""
        if (subgraphs(node) or node.op_type in fp32_ops or node.domain == "ai.onnx.ml"
                or node.name in report.bf16_refused):
            return FP32
        return island_dtype if node.name in blocked_names else FP16

    _convert_graph(g, types, node_dtype, report, {}, "", itertools.count(1))
    return m, report


def _convert_graph(g: onnx.GraphProto, types: dict[str, int], node_dtype: Callable[[onnx.NodeProto], int],
                   report: Fp16Conversion, outer: Mapping[str, int], tag: str, count: Iterator[int],
                   outer_casts: Mapping[tuple[str, int], str] | None = None) -> None:
    """Convert graph ``g`` in place, then the subgraphs of its nodes with the same rules.

    A node with subgraphs (``If``, ``Loop``, ``Scan``) keeps FP32 inputs and outputs, so its
    subgraphs' formal inputs and outputs are FP32 too (both branches of an ``If`` agree on types, a
    loop's carried values keep theirs); inside, every node runs in the precision ``node_dtype`` gives
    it, an outer value it reads is cast inside the subgraph where it needs another precision, and a
    float subgraph output is cast to FP32 at its end.

    Args:
        outer: precision of the values of the scopes around ``g`` (empty for the main graph).
        tag: suffix of the names of the Casts inserted in ``g`` (``""`` for the main graph: a subgraph
            must not define a name the outer graph defines); ``count`` numbers the subgraphs.
        outer_casts: ``{(value, precision): cast value}`` computed before ``g``'s node in the scopes
            around it.
    """
    constants = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    precision = _tensor_precisions(g, types, constants, node_dtype, report)
    _store_constants(g, constants, precision)
    scope = ChainMap(precision, dict(outer))

    def convert_subgraphs(node: onnx.NodeProto, visible: Mapping[str, int],
                          casts: Mapping[tuple[str, int], str]) -> None:
        """Convert the subgraphs of ``node``: ``visible`` the precisions they see, ``casts`` the Casts
        already computed before ``node`` (reused inside instead of casting again)."""
        for _, sub in subgraphs(node):
            _convert_graph(sub, types, node_dtype, report, visible, f"__sg{next(count)}", count, casts)

    _insert_casts(g, scope, node_dtype, report, tag, outer_casts, convert_subgraphs)
    _mark_value_info(g, precision)


def _free_wants(sub: onnx.GraphProto, node_dtype: Callable[[onnx.NodeProto], int]) -> list[tuple[str, int]]:
    """``(outer value, precision wanted)`` for each read of a value from outside ``sub`` by a node in
    it (or deeper); a subgraph output that is an outer value wants FP32 (the boundary)."""
    local = graph_defines(sub)
    out = []
    for node in sub.node:
        for k, x in enumerate(node.input):
            if x and x not in local:
                out.append((x, _wanted_precision(node, k, node_dtype)))
        for _, inner in subgraphs(node):
            out += [(x, p) for x, p in _free_wants(inner, node_dtype) if x not in local]
    out += [(o.name, FP32) for o in sub.output if o.name and o.name not in local]
    return out


def _wanted_precision(node: onnx.NodeProto, k: int, node_dtype: Callable[[onnx.NodeProto], int]) -> int:
    """Precision (:data:`FP16`, :data:`FP32` or :data:`BF16`) that input ``k`` of ``node`` must have.

    Args:
        node_dtype: the precision a node runs in (see :func:`to_typed_fp16`).
    """
    if k in FP32_INPUTS.get(node.op_type, ()):
        return FP32
    return node_dtype(node)


def _tensor_precisions(g: onnx.GraphProto, types: dict[str, int], constants: dict[str, onnx.NodeProto],
                       node_dtype: Callable[[onnx.NodeProto], int], report: Fp16Conversion) -> dict[str, int]:
    """Storage precision (:data:`FP16`, :data:`FP32` or :data:`BF16`) of each float tensor of ``g``,
    and the FP32 and BF16 nodes added to ``report.fp32_nodes`` / ``report.bf16_nodes``.

    Graph inputs are FP32; an initializer or ``Constant`` value takes its readers' precision when they
    all want the same one, else FP32; any other tensor takes the precision of the node that produces it.

    Args:
        g: the graph (not modified).
        types: element type of every tensor (:func:`_types`).
        constants: ``Constant`` nodes of ``g`` by output name.
        node_dtype: the precision a node runs in.
        report: the conversion report to complete.
    """
    is_float = {name for name, t in types.items() if t == TensorProto.FLOAT}
    graph_inputs = {i.name for i in g.input}
    inits = {i.name for i in g.initializer}
    precision: dict[str, int] = {}
    wants: dict[str, set[int]] = {}
    for node in g.node:
        for k, name in enumerate(node.input):
            if name:
                wants.setdefault(name, set()).add(_wanted_precision(node, k, node_dtype))
        for _, sub in subgraphs(node):  # an outer constant read inside a subgraph: as its inner readers want
            for name, p in _free_wants(sub, node_dtype):
                wants.setdefault(name, set()).add(p)
    local = graph_defines(g)
    for name in is_float & local:
        if name in graph_inputs:
            precision[name] = FP32
        elif name in inits or name in constants:
            want = wants.get(name, set())
            precision[name] = next(iter(want)) if len(want) == 1 else FP32
    for node in g.node:
        if node.op_type == "Constant":
            continue
        p = node_dtype(node)
        computes_float = not subgraphs(node) and any(x in is_float for x in (*node.input, *node.output))
        report.fp32_nodes += [node.name] if p == FP32 and computes_float else []  # not an integer Range
        report.bf16_nodes += [node.name] if p == BF16 and computes_float else []
        for o in node.output:
            if o in is_float:
                precision[o] = p
    return precision


def _store_constants(g: onnx.GraphProto, constants: dict[str, onnx.NodeProto], precision: dict[str, int]) -> None:
    """Store in FP16 (BF16) the initializers and ``Constant`` values whose precision is FP16 (BF16). A
    ``Constant`` in the rare ``value_float``/``value_floats`` form stays FP32 (its entry in
    ``precision`` becomes FP32).

    Args:
        g: the graph (edited in place).
        constants: ``Constant`` nodes of ``g`` by output name.
        precision: from :func:`_tensor_precisions` (updated in place).
    """
    for i, init in enumerate(g.initializer):
        if precision.get(init.name, FP32) != FP32:
            g.initializer[i].CopyFrom(_stored_as(init, precision[init.name]))
    for name, node in constants.items():
        if precision.get(name, FP32) != FP32:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(_stored_as(a.t, precision[name]))
                elif a.name in ("value_float", "value_floats"):  # rare forms: keep them FP32
                    precision[name] = FP32


def _retype_attributes(node: onnx.NodeProto, dtype: int) -> None:
    """For a node that runs in FP16 (BF16): ``Cast(to=FLOAT)`` casts to FLOAT16 (BFLOAT16) instead, and
    ``ConstantOfShape``'s FP32 fill value becomes FP16 (BF16)."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
            a.i = dtype
        elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(_stored_as(a.t, dtype))


def _insert_casts(g: onnx.GraphProto, precision: Mapping[str, int], node_dtype: Callable[[onnx.NodeProto], int],
                  report: Fp16Conversion, tag: str = "", outer_casts: Mapping[tuple[str, int], str] | None = None,
                  convert_subgraphs: Callable | None = None) -> None:
    """Rewrite the nodes of ``g`` for mixed precision: a Cast (one per tensor and precision) before every
    input whose precision is not the one its reader wants, FP16 (BF16) attributes in FP16 (BF16) nodes,
    and a ``Cast(to=FLOAT)`` after every FP16 or BF16 graph output (its producer then writes
    ``{name}__fp16`` or ``{name}__bf16``). In a subgraph (``tag`` not empty) an FP16 or BF16 output is
    cast to FP32 at the end of the subgraph, which then outputs the cast value.

    Args:
        g: the graph (edited in place).
        precision: storage precision of each float tensor (:func:`_tensor_precisions`), those of the
            scopes around a subgraph included.
        node_dtype: the precision a node runs in.
        report: counts the inserted Casts.
        tag: suffix of the inserted Casts' names in a subgraph (``""``: the main graph).
        outer_casts: Casts of outer values already computed in the scopes around a subgraph.
        convert_subgraphs: ``f(node, precisions, casts)`` converts the subgraphs of ``node`` given the
            precisions and Casts visible where ``node`` runs.
    """
    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = dict(outer_casts or {})

    def cast(name: str, to: int) -> str:
        """Name of ``name`` cast to precision ``to``: one Cast node per tensor and precision."""
        key = (name, to)
        if key not in casts:
            suffix = _CAST_SUFFIX[to]
            out = f"{name}__to{suffix}{tag}"
            new_nodes.append(onnx.helper.make_node(
                "Cast", [name], [out], name=f"{name}__cast_to_{'' if to == BF16 else 'fp'}{suffix}{tag}", to=to))
            casts[key] = out
            report.casts += 1
        return casts[key]

    graph_outputs = {o.name for o in g.output} if not tag else set()
    renamed_outputs: dict[str, str] = {}
    for node in g.node:
        node_p = node_dtype(node)
        for k, name in enumerate(node.input):
            if name in precision:
                need = _wanted_precision(node, k, node_dtype) if node.op_type != "Constant" else precision[name]
                if precision[name] != need:
                    node.input[k] = cast(renamed_outputs.get(name, name), need)
                elif name in renamed_outputs:
                    node.input[k] = renamed_outputs[name]
        if node_p != FP32:
            _retype_attributes(node, node_p)
        if convert_subgraphs is not None and subgraphs(node):
            # a graph output renamed above is read, inside, as the FP32 value its output Cast writes
            convert_subgraphs(node, ChainMap(dict.fromkeys(renamed_outputs, FP32), precision), dict(casts))
        for j, o in enumerate(node.output):
            if o in graph_outputs and precision.get(o, FP32) != FP32:
                node.output[j] = renamed_outputs[o] = f"{o}__{'bf16' if precision[o] == BF16 else 'fp16'}"
        new_nodes.append(node)
        for o in node.output:
            orig = next((k for k, v in renamed_outputs.items() if v == o), None)
            if orig is not None:
                new_nodes.append(onnx.helper.make_node("Cast", [o], [orig], name=f"{orig}__output_cast",
                                                       to=TensorProto.FLOAT))
                report.casts += 1
    for o in g.output if tag else ():
        if precision.get(o.name, FP32) != FP32:
            o.name = cast(o.name, FP32)
    del g.node[:]
    g.node.extend(new_nodes)


def _mark_value_info(g: onnx.GraphProto, precision: dict[str, int]) -> None:
    """Set the element type of ``g.value_info`` entries of FP16 (BF16) tensors to FLOAT16 (BFLOAT16)."""
    kept = []
    for vi in g.value_info:
        if precision.get(vi.name, FP32) != FP32:
            vi.type.tensor_type.elem_type = precision[vi.name]
        kept.append(vi)
    del g.value_info[:]
    g.value_info.extend(kept)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor: shape inference, initializers, and ``Constant`` values, those
    inside subgraphs included."""
    types = {**inner_types(model), **value_types(model)}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def _to_fp32_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    out = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
    return out


def emulation_model(fp16_model: onnx.ModelProto) -> onnx.ModelProto:
    """FP32 graph that computes exactly what ``fp16_model`` computes with FP16 storage.

    Every FP16 (BF16) initializer and constant is stored as FP32 holding the same value; every
    FP16 (BF16) activation is produced in FP32 and immediately rounded through FP16 (BF16) by a
    ``Cast(to=FLOAT16) -> Cast(to=FLOAT)`` (``Cast(to=BFLOAT16) -> ...``) pair: round to nearest
    even, inf beyond the format's largest value. ``Cast(to=FLOAT16)`` and ``Cast(to=BFLOAT16)`` nodes
    of the original stay (they round), followed by a ``Cast(to=FLOAT)``.

    Args:
        fp16_model: a typed FP16 graph from :func:`to_typed_fp16`.

    Returns:
        a new ``onnx.ModelProto`` (run it with :func:`emulation_session_options`).
    """
    types = _types(fp16_model)
    m = onnx.ModelProto()
    m.CopyFrom(fp16_model)
    _emulate_graph(m.graph, types)
    return m


def _emulate_graph(g: onnx.GraphProto, types: Mapping[str, int]) -> None:
    """:func:`emulation_model` on one graph, in place, and on the subgraphs of its nodes (an ``If``
    branch or a loop body rounds its FP16 values as the main graph does)."""
    narrow = (FP16, BF16)
    for i, init in enumerate(g.initializer):
        if init.data_type in narrow:
            g.initializer[i].CopyFrom(_to_fp32_tensor(init))
    for vi in [*g.value_info, *g.input, *g.output]:
        if vi.type.tensor_type.elem_type in narrow:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = []
    for index, node in enumerate(g.node):
        new = onnx.NodeProto()
        base = f"{node.name or node.op_type}#{index}"
        new.CopyFrom(node)
        is_cast16 = node.op_type == "Cast" and any(a.name == "to" and a.i in narrow for a in node.attribute)
        for a in new.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in narrow:
                a.t.CopyFrom(_to_fp32_tensor(a.t))
            elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i in narrow and not is_cast16:
                a.i = TensorProto.FLOAT
            elif a.type == onnx.AttributeProto.GRAPH:
                _emulate_graph(a.g, types)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _emulate_graph(sub, types)
        rounding = []
        for j, out in enumerate(node.output):
            if not out or types.get(out) not in narrow:
                continue
            if is_cast16:  # already rounds: widen its FP16 (BF16) result back to FP32
                new.output[j] = f"{out}__fp16"
                rounding.append(onnx.helper.make_node("Cast", [new.output[j]], [out], to=TensorProto.FLOAT,
                                                      name=f"{base}__widen{j}"))
            else:
                new.output[j] = f"{out}__fp32"
                rounding += [
                    onnx.helper.make_node("Cast", [new.output[j]], [f"{out}__fp16"], to=types[out],
                                          name=f"{base}__round{j}"),
                    onnx.helper.make_node("Cast", [f"{out}__fp16"], [out], to=TensorProto.FLOAT,
                                          name=f"{base}__widen{j}"),
                ]
        nodes += [new, *rounding]
    del g.node[:]
    g.node.extend(nodes)


def emulation_session_options():
    """``onnxruntime.SessionOptions`` for an emulation graph: every graph optimization off.

    With optimizations on, ORT removes ``Cast(FLOAT16) -> Cast(FLOAT)`` pairs (cast elimination),
    which would skip the rounding and hide an overflow.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return so
