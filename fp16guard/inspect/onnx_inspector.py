"""The inspector for ONNX files: every intermediate value of an FP32 ONNX Runtime run.

The measurement itself (values exposed in memory-bounded chunks, reduced on the host) is
:func:`fp16guard.onnx_ranges.value_ranges`, shared with the fix's calibration; this module turns
its statistics into an :class:`~fp16guard.inspect.report.InspectionReport` with per-node records,
from/to transitions and the static check of the graph's constants.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnx

from fp16guard import control_flow

from fp16guard.inspect.report import CallRecord, InspectionReport
from fp16guard.inspect.static_check import check_onnx
from fp16guard.onnx_graph import (
    Feeds,
    constant_names,
    feed_list,
    graph_constants,
    load_onnx,
    node_name,
    node_reads,
    node_scope,
    subgraphs,
)
from fp16guard.onnx_ranges import value_ranges
from fp16guard.progress import step
from fp16guard.stats import RangeStats

logger = logging.getLogger("fp16guard")


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
        ModelLoadError: the model is missing or unreadable, or ONNX Runtime cannot load it.

    Control flow (``If``/``Loop``/``Scan``): an ``If`` whose condition is static is inlined
    (:func:`fp16guard.control_flow.normalize`); the nodes inside other subgraphs get records of
    their own, before their control flow node's, wherever their branch or loop ran (a subgraph that
    never ran is logged as a warning).
        InputError: a feed does not match the graph's inputs, or ONNX Runtime fails on it.
    """
    proto = load_onnx(model)
    proto, changes = control_flow.normalize(proto)
    for change in changes:
        logger.info("inspect: %s", change)
    runs = feed_list(proto, feeds, constant_names(proto))
    name = source or (Path(model).name if not isinstance(model, onnx.ModelProto) else proto.graph.name)
    with step(f"inspect: FP32 ONNX Runtime runs of every value on {len(runs)} input(s)", total=len(runs)):
        stats = value_ranges(proto, runs, providers=providers, labels=labels, memory_budget=memory_budget)

    for owner, attr in control_flow.unmeasured(proto, stats):
        logger.warning("%s never ran on the inputs given: its values are not measured",
                       control_flow.branch_label(owner, attr))

    records: list[CallRecord] = []

    def record(node: onnx.NodeProto, label: str, run: int, seen: dict[str, RangeStats]) -> None:
        """The records of ``node``, those of the nodes inside its subgraphs first, that ran."""
        for _, sub in subgraphs(node):
            for inner in sub.node:
                record(inner, inner.name or inner.op_type, run, seen)
        if not any(o in seen for o in node.output):
            return
        scope = node_scope(node) or (node.output[0] if node.output else label)
        records.append(CallRecord(
            len(records), label, node.op_type, scope, run,
            RangeStats.merge(seen[n] for n in node_reads(node) if n in seen),
            RangeStats.merge(seen[n] for n in node.output if n in seen)))

    for run in range(len(runs)):
        for i, node in enumerate(proto.graph.node):
            record(node, node_name(node, i), run, stats[run])
    consumer = {}
    for i, node in enumerate(proto.graph.node):
        for n in node_reads(node):
            consumer.setdefault(n, node_name(node, i))
    for node, _, _ in control_flow.inner_nodes(proto.graph):
        for n in node.input:
            consumer.setdefault(n, node.name)
    consts = {**graph_constants(proto), **control_flow.inner_constants(proto)}
    return InspectionReport(
        source=name,
        calls=tuple(records),
        static=tuple(check_onnx(proto, consts, consumer)) if static else (),
        inputs=tuple(labels) or tuple(f"run {k}" for k in range(len(runs))),
    )
