"""Range statistics computed inside the ONNX graph: one ONNX Runtime run per input returns scalars.

:func:`statistics_model` appends, right after the node that writes each measured value, a few
reductions of that value to scalars, and makes the scalars the graph's outputs. ONNX Runtime then
frees every activation as soon as its last reader (its reductions included) has run, so a run
holds what the plain model holds, whatever the model's size, and returns a few numbers per value
(:func:`read_statistics` turns them into :class:`~fp16guard.stats.RangeStats`).

Per value ``x`` (float16 and bfloat16 values are cast to float32 first):

* always, reading ``x`` three times and writing nothing: ``ReduceMax(x)``, ``ReduceMin(x)``,
  ``ReduceSum(x)`` and ``Size(x)``. When the sum is finite every element is finite, and
  ``amax = max(|max|, |min|)``. Otherwise an ``If`` runs its branch, and only then: the number of
  inf/NaN elements and the largest finite magnitude, from ``Less(|x|, inf)`` (NaN compares false).
  A finite sum that overflows takes the exact branch too, which is only slower.
* with counts (:func:`statistics_model`'s ``counts``): ``|x|`` once, then three
  ``ReduceSum(Cast(Less(|x|, t)))`` for ``t`` in (smallest subnormal of ``x``'s type or exact zero,
  ``2**-24``, ``2**-14``), which give the zero, flush-to-zero and subnormal counts of
  :data:`fp16guard.stats.STAT_FIELDS`. The boolean masks are summed as float32 where the value
  holds at most ``2**24`` elements (exact: every partial sum is an integer below ``2**24``) and as
  int32 where it may hold more.

Only float ops and comparisons are used: ``IsNaN``/``IsInf``/``And``/``Not`` over whole tensors and
int64 sums ran many times slower in ONNX Runtime's CPU kernels (measured: an int64 count of one
comparison over 2**26 elements 220 ms against 62 ms as float32, on 2 cores). The session runs
with ``ExecutionOrder.PRIORITY_BASED`` so the reductions run as soon as their value is written: in
ONNX Runtime's default order they ran after the model and held every activation (PP-OCRv4 on a
photo: 2.7 GB against 474 MB).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fp16guard.fp16 import FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL
from fp16guard.stats import RangeStats

#: Element count up to which a boolean mask is summed as float32 (exact below 2**24).
FLOAT_COUNT_LIMIT = 1 << 24

_WIDE = {TensorProto.FLOAT: TensorProto.FLOAT, TensorProto.DOUBLE: TensorProto.DOUBLE,
         TensorProto.FLOAT16: TensorProto.FLOAT, TensorProto.BFLOAT16: TensorProto.FLOAT}


@dataclass(frozen=True)
class StatOutputs:
    """The graph outputs :func:`statistics_model` added for one value.

    Attributes:
        value: the measured value's name.
        amax: scalar, largest finite magnitude (``-inf``/``inf`` ignored; garbage when ``numel`` is 0).
        numel: int64 scalar, the number of elements.
        nonfinite: scalar, the number of inf/NaN elements.
        counts: ``(zero, below 2**-24, below 2**-14)`` scalars (zeros included in the last two), or
            ``()`` where counts were not asked for.
    """

    value: str
    amax: str
    numel: str
    nonfinite: str
    counts: tuple[str, ...] = ()
    count_type: int = TensorProto.FLOAT


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


class _Builder:
    """Appends the nodes and constants of the statistics of one value after another."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.opset = _opset(model)
        used = {i.name for i in self.graph.initializer} | {i.name for i in self.graph.input}
        used |= {o for n in self.graph.node for o in n.output}
        k = 0
        while any(u.startswith(f"fp16guard_stat{k}/") for u in used):
            k += 1
        self.prefix = f"fp16guard_stat{k}/"
        self.consts: dict[tuple, str] = {}

    def const(self, value: float, elem: int) -> str:
        """The name of a scalar initializer of type ``elem`` holding ``value`` (made once)."""
        key = (float(value), elem)
        if key not in self.consts:
            name = f"{self.prefix}c{len(self.consts)}"
            dtype = helper.tensor_dtype_to_np_dtype(elem)
            self.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
            self.consts[key] = name
        return self.consts[key]

    def nodes(self, index: int, value: str, elem: int, counts: bool, numel_hint: int | None) -> tuple[list, StatOutputs]:
        """The nodes measuring ``value`` (element type ``elem``) and the names of their outputs."""
        p = f"{self.prefix}{index}/"
        wide = _WIDE[elem]
        out: list[onnx.NodeProto] = []
        x = value
        if wide != elem:
            x = p + "x"
            out.append(helper.make_node("Cast", [value], [x], to=wide, name=p + "cast"))
        for op, name in (("ReduceMax", "hi"), ("ReduceMin", "lo"), ("ReduceSum", "sum")):
            out.append(helper.make_node(op, [x], [p + name], keepdims=0, name=p + name))
        out.append(helper.make_node("Size", [x], [p + "numel"], name=p + "numel"))
        inf = self.const(np.inf, wide)
        # cheap branch: every element finite
        out += [helper.make_node("Abs", [p + "hi"], [p + "ahi"], name=p + "ahi"),
                helper.make_node("Abs", [p + "lo"], [p + "alo"], name=p + "alo"),
                helper.make_node("Max", [p + "ahi", p + "alo"], [p + "fast"], name=p + "fast"),
                helper.make_node("Abs", [p + "sum"], [p + "asum"], name=p + "asum"),
                helper.make_node("Less", [p + "asum", inf], [p + "finite"], name=p + "finite"),
                helper.make_node("Not", [p + "finite"], [p + "slow"], name=p + "notfinite")]
        zero = self.const(0.0, wide)
        exact = helper.make_graph(
            [helper.make_node("Abs", [x], [p + "e_a"], name=p + "e_a"),
             helper.make_node("Less", [p + "e_a", inf], [p + "e_fin"], name=p + "e_fin"),
             helper.make_node("Where", [p + "e_fin", p + "e_a", zero], [p + "e_kept"], name=p + "e_kept"),
             helper.make_node("ReduceMax", [p + "e_kept"], [p + "e_amax"], keepdims=0, name=p + "e_amax"),
             helper.make_node("Cast", [p + "e_fin"], [p + "e_finf"], to=TensorProto.FLOAT, name=p + "e_finf"),
             helper.make_node("ReduceSum", [p + "e_finf"], [p + "e_nfin"], keepdims=0, name=p + "e_nfin"),
             helper.make_node("Cast", [p + "numel"], [p + "e_numel"], to=TensorProto.FLOAT, name=p + "e_numel"),
             helper.make_node("Sub", [p + "e_numel", p + "e_nfin"], [p + "e_bad"], name=p + "e_bad")],
            p + "exact", [],
            [helper.make_tensor_value_info(p + "e_amax", wide, []),
             helper.make_tensor_value_info(p + "e_bad", TensorProto.FLOAT, [])])
        cheap = helper.make_graph(
            [helper.make_node("Identity", [p + "fast"], [p + "c_amax"], name=p + "c_amax"),
             helper.make_node("Identity", [self.const(0.0, TensorProto.FLOAT)], [p + "c_bad"], name=p + "c_bad")],
            p + "cheap", [],
            [helper.make_tensor_value_info(p + "c_amax", wide, []),
             helper.make_tensor_value_info(p + "c_bad", TensorProto.FLOAT, [])])
        out.append(helper.make_node("If", [p + "slow"], [p + "amax", p + "nonfinite"], name=p + "if",
                                    then_branch=exact, else_branch=cheap))
        names: tuple[str, ...] = ()
        count_type = TensorProto.FLOAT
        if counts:
            count_type = TensorProto.FLOAT if numel_hint is not None and numel_hint <= FLOAT_COUNT_LIMIT \
                else TensorProto.INT32
            out.append(helper.make_node("Abs", [x], [p + "a"], name=p + "a"))
            zero_below = float(np.finfo(helper.tensor_dtype_to_np_dtype(wide)).smallest_subnormal)
            for label, t in (("zero", zero_below), ("lt24", FP16_MIN_SUBNORMAL), ("lt14", FP16_MIN_NORMAL)):
                out += [helper.make_node("Less", [p + "a", self.const(t, wide)], [p + label + "_b"], name=p + label + "_b"),
                        helper.make_node("Cast", [p + label + "_b"], [p + label + "_f"], to=count_type,
                                         name=p + label + "_f"),
                        helper.make_node("ReduceSum", [p + label + "_f"], [p + label], keepdims=0, name=p + label)]
            names = (p + "zero", p + "lt24", p + "lt14")
        return out, StatOutputs(value, p + "amax", p + "numel", p + "nonfinite", names, count_type)


def statistics_model(model: onnx.ModelProto, values: Sequence[str], types: Mapping[str, int], *,
                     counts: bool | Collection[str] = True, sizes: Mapping[str, int] | None = None,
                     keep_outputs: bool = False, in_place: bool = False) -> tuple[onnx.ModelProto, list[StatOutputs]]:
    """A copy of ``model`` whose outputs are the range statistics of ``values`` (and, with
    ``keep_outputs``, then the model's own outputs, in their order).

    Args:
        model: the graph (not modified). Values inside ``If``/``Loop``/``Scan`` subgraphs cannot be
            named here (:func:`fp16guard.control_flow.inner_ranges` replays them).
        values: names of float graph inputs or node outputs of the main graph.
        types: ONNX element type of each value (:func:`fp16guard.onnx_graph.value_types`).
        counts: measure the zero/flush/subnormal counts of every value (``True``), of none
            (``False``: amax, element count and inf/NaN count only, the cheaper graph a fix
            calibrates with), or of the values named.
        sizes: bytes of each value for the largest input (:func:`fp16guard.onnx_graph.value_bytes`);
            a value counted as float32 must be known to hold at most :data:`FLOAT_COUNT_LIMIT`
            elements, others are counted as int32.
        keep_outputs: also output what the model outputs (a fix's FP32 references come from the
            same run as its calibration).
        in_place: add the statistics to ``model`` itself (the caller gives it away) instead of to a
            copy: one copy of the weights less.

    Returns:
        ``(model', outputs)``: one :class:`StatOutputs` per value, in ``values`` order.

    Raises:
        KeyError: a value that is neither a graph input nor a node output of the main graph, or
            whose type is not float.
    """
    if in_place:
        new = model
    else:
        new = onnx.ModelProto()
        new.CopyFrom(model)
    g = new.graph
    build = _Builder(new)
    sizes = sizes or {}
    wanted = {v: k for k, v in enumerate(values)}
    written = {i.name for i in g.input} | {o for n in g.node for o in n.output}
    missing = [v for v in values if v not in written or types.get(v) not in _WIDE]
    if missing:
        raise KeyError(f"cannot measure {missing[0]!r} in the main graph")

    def measure(value: str) -> list:
        """The statistics nodes of ``value`` (its :class:`StatOutputs` recorded in ``results``)."""
        elem = types[value]
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize
        hint = sizes[value] // itemsize if value in sizes else None
        want_counts = counts if isinstance(counts, bool) else value in counts
        nodes, outs = build.nodes(wanted[value], value, elem, want_counts, hint)
        results[wanted[value]] = outs
        return nodes

    results: list[StatOutputs | None] = [None] * len(values)
    order: list[onnx.NodeProto] = []
    for i in g.input:
        if i.name in wanted:
            order += measure(i.name)
    for node in g.node:
        order.append(node)
        for o in node.output:
            if o in wanted and results[wanted[o]] is None:
                order += measure(o)
    del g.node[:]
    g.node.extend(order)
    kept = [_copied(o) for o in g.output] if keep_outputs else []  # copies: the field is cleared next
    del g.output[:]
    for r in results:
        elem = _WIDE[types[r.value]]
        g.output.extend([helper.make_tensor_value_info(r.amax, elem, []),
                         helper.make_tensor_value_info(r.numel, TensorProto.INT64, []),
                         helper.make_tensor_value_info(r.nonfinite, TensorProto.FLOAT, [])])
        for c in r.counts:
            g.output.append(helper.make_tensor_value_info(c, r.count_type, []))
    g.output.extend(kept)
    return new, results  # type: ignore[return-value]


def _copied(info: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    return out


def read_statistics(outputs: Mapping[str, np.ndarray], measured: Sequence[StatOutputs]) -> dict[str, RangeStats]:
    """The :class:`~fp16guard.stats.RangeStats` of each value from one run of a
    :func:`statistics_model` graph (``outputs``: output name -> array). Counts not measured are 0
    (``nonzero`` too)."""
    stats = {}
    for m in measured:
        numel = int(outputs[m.numel])
        nonfinite = int(round(float(outputs[m.nonfinite])))
        amax = float(outputs[m.amax]) if numel and nonfinite < numel else 0.0
        if m.counts:
            zero, lt24, lt14 = (int(round(float(outputs[c]))) for c in m.counts)
            stats[m.value] = RangeStats(amax, numel, nonfinite, numel - nonfinite - zero, lt24 - zero, lt14 - lt24)
        else:
            stats[m.value] = RangeStats(amax, numel, nonfinite)
    return stats


def statistics_session(model: onnx.ModelProto, providers: Sequence[str] | None = None):
    """An ONNX Runtime session of a :func:`statistics_model` graph, its nodes run in graph order where
    they can (``ExecutionOrder.PRIORITY_BASED``), quiet.

    Raises:
        ModelLoadError: ONNX Runtime refuses the model.
    """
    import onnxruntime as ort

    from fp16guard.errors import ModelLoadError, first_line
    from fp16guard.onnx_graph import cpu_session

    so = ort.SessionOptions()
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if providers is None or list(providers) == ["CPUExecutionProvider"]:
        return cpu_session(model, options=so)
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))
    except Exception as e:
        raise ModelLoadError(f"ONNX Runtime cannot load {model.graph.name or 'the model'}: {first_line(e)}") from None
