"""The inspector for ONNX files: every intermediate value of an FP32 ONNX Runtime run.

The measurement itself (values exposed in memory-bounded chunks, reduced on the host) is
:func:`fp16guard.onnx_graph.value_ranges`, shared with the fix's calibration; this module turns
its statistics into an :class:`~fp16guard.inspect.report.InspectionReport` with per-node records,
from/to transitions and the static check of the graph's constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from fp16guard.inspect.report import CallRecord, InspectionReport
from fp16guard.inspect.static_check import check_onnx
from fp16guard.onnx_graph import (
    Feeds,
    feed_list,
    graph_constants,
    load_onnx,
    node_name,
    node_scope,
    refuse_control_flow,
    value_ranges,
)
from fp16guard.progress import step
from fp16guard.stats import RangeStats


def inspect_onnx(model: str | Path | onnx.ModelProto, feeds: Feeds | Sequence[Feeds], *,
                 providers: Sequence[str] | None = None, static: bool = True,
                 labels: Sequence[str] = (), source: str | None = None,
                 memory_budget: int = 1 << 30) -> InspectionReport:
    """Inspect an FP32 ONNX model: per-node activation ranges, from/to transitions, static check.

    Args:
        model: path to an ``.onnx`` file or an ``onnx.ModelProto``.
        feeds: one run's inputs (a dict by input name, a tuple of arrays in input order, or one
            array for a single-input model) or a list of runs. Shapes must match the graph's
            declared static dimensions; floating arrays are cast to the declared float type.
        providers: ONNX Runtime execution providers (default: CPU).
        static: include the static check of initializers, ``Constant`` nodes and BatchNorms.
        labels: a label per run, for the report.
        source: what to call the model in the report (default: the file name).
        memory_budget: bytes of intermediate values held at once (see the module docstring).

    Returns:
        An :class:`InspectionReport` with one :class:`CallRecord` per node and run (``call`` is the
        run index), nodes in graph (topological) order.

    Raises:
        ModelLoadError: the model is missing or unreadable, has control flow (``If``/``Loop``/``Scan``:
            its inner values would go unmeasured), or ONNX Runtime cannot load it.
        InputError: a feed does not match the graph's inputs, or ONNX Runtime fails on it.
    """
    proto = load_onnx(model)
    refuse_control_flow(proto, "the ONNX inspector")
    consts = graph_constants(proto)
    runs = feed_list(proto, feeds, set(consts))
    name = source or (Path(model).name if not isinstance(model, onnx.ModelProto) else proto.graph.name)
    with step(f"inspect: FP32 ONNX Runtime runs of every value on {len(runs)} input(s)", total=len(runs)):
        stats = value_ranges(proto, runs, providers=providers, labels=labels, memory_budget=memory_budget)

    records: list[CallRecord] = []
    for run in range(len(runs)):
        seen = stats[run]
        for i, node in enumerate(proto.graph.node):
            if not any(o in seen for o in node.output):
                continue
            label = node_name(node, i)
            scope = node_scope(node) or (node.output[0] if node.output else label)
            records.append(CallRecord(
                len(records), label, node.op_type, scope, run,
                RangeStats.merge(seen[n] for n in node.input if n in seen),
                RangeStats.merge(seen[n] for n in node.output if n in seen)))
    consumer = {}
    for i, node in enumerate(proto.graph.node):
        for n in node.input:
            consumer.setdefault(n, node_name(node, i))
    return InspectionReport(
        source=name,
        calls=tuple(records),
        static=tuple(check_onnx(proto, consts, consumer)) if static else (),
        inputs=tuple(labels) or tuple(f"run {k}" for k in range(len(runs))),
    )
