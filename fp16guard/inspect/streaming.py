"""Inspection of a streamed data set, alone or across the processes of a ``torch.distributed`` group.

:func:`inspect_stream` takes a PyTorch module or an ONNX model and any data set a
:class:`~fp16guard.datasets.DataSource` reads (paths, folders, patterns, ``.npz`` shards, a generator,
a DataLoader), one input at a time:

* a module runs under :class:`~fp16guard.inspect.hooks.FInspect` through :meth:`FInspect.run`, whose
  records are merged per call site and input signature (max of amax, sums of counts): the report
  is :func:`~fp16guard.inspect.hooks.run_torch`'s on the same inputs, and memory does not grow
  with their number.
* an ONNX model runs a block at a time through :func:`~fp16guard.inspect.onnx_inspector.inspect_onnx`,
  and each node's records are merged over every input: one record per node (``call`` 0), where
  ``inspect_onnx`` on a list keeps one per node and input.

Under a process group each rank inspects its own shard, and
:func:`~fp16guard.inspect.merge.reduce_report` merges the ranks' records by call site (name, kind,
scope, call; max for amax, sums for counts) and gathers the labels in data-set order, so every rank
holds the report of the whole data set;
:meth:`FInspect.report` does the same for a probe the caller drives. Early stop (``early_stop=N``):
the pass ends once no record's power of two moved for ``N`` inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator, Sequence

from fp16guard import distributed
from fp16guard.datasets import BLOCK, DataSource, RangeWatch, blocks
from fp16guard.inputs import NamedInput, onnx_feed
from fp16guard.inspect.forward import probe_forward
from fp16guard.inspect.merge import record_key, reduce_report
from fp16guard.inspect.report import CallRecord, InspectionReport
from fp16guard.progress import reporting, step
from fp16guard.stats import RangeStats

logger = logging.getLogger("fp16guard")

def _amax(records: Sequence[CallRecord]) -> dict[str, float]:
    """``{call site: output amax}`` (inf where non-finite), what the early stop watches."""
    return {repr(record_key(r)): (float("inf") if r.outputs.nonfinite else r.outputs.amax) for r in records}


class _Once(logging.Filter):
    """Lets each distinct warning through once (a block-by-block pass repeats them)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """True the first time a message is logged, False after."""
        message = record.getMessage()
        new = message not in self.seen
        self.seen.add(message)
        return new


@contextlib.contextmanager
def _pass(description: str, source: DataSource) -> Iterator[Any]:
    """The pass's progress step (count and ETA where the length is known), repeated warnings once."""
    once = _Once()
    logger.addFilter(once)
    try:
        with step(description, total=source.share()) as count:
            yield count
    finally:
        logger.removeFilter(once)


def _chunks(source: DataSource, watch: RangeWatch, block: int) -> Iterator[list[tuple[int, NamedInput]]]:
    """``source``'s blocks (this rank's); with an early stop under a process group, every rank
    keeps step (one small collective per block) until every rank stopped or ran out."""
    size = min(block, watch.patience) if watch.patience else block
    pending = blocks(source.indexed(), size)
    agree = watch.patience is not None and distributed.active()
    done = False
    while True:
        chunk = None if done else next(pending, None)
        done = done or chunk is None
        if chunk is not None:
            yield chunk
            done = watch.stopped
        if distributed.all_true(done) if agree else done:
            return


def _torch(model, source: DataSource, watch: RangeWatch, *, ops: bool, device: str, half: bool,
           cuda_graph: bool | None, static: bool, block: int) -> tuple[InspectionReport, list]:
    """The merged report of a module on this rank's inputs, and their ``(index, label)``."""
    import torch

    from fp16guard.inspect.hooks import FInspect
    from fp16guard.inspect.static_check import check_module
    from fp16guard.torch_graph import inference_copy

    if device != "cpu" or half or any(m.training for m in model.modules()):
        model = inference_copy(model).to(device)
        if half:
            model = model.half()
    labels: list[tuple[int, str]] = []
    with torch.no_grad(), FInspect(model, ops=ops, cuda_graph=cuda_graph, static=False) as probe, \
            _pass(f"inspect: FP{16 if half else 32} forward, streamed from {source.describe()}, {device}",
                  source) as count:
        for chunk in _chunks(source, watch, block):
            for index, item in chunk:
                probe_forward(probe, item, device, half)
                labels.append((index, item.label))
                count()
            if watch.patience is not None:
                watch.update(_amax(probe.report(reduce=False).calls), len(chunk))
        report = probe.report(reduce=False) if labels else InspectionReport(type(model).__name__)
    return dataclasses.replace(report, static=tuple(check_module(model)) if static else ()), labels


def _onnx(model, source: DataSource, watch: RangeWatch, *, static: bool, memory_budget: int, name: str | None,
          block: int) -> tuple[InspectionReport, list]:
    """The report of an ONNX model on this rank's inputs, each node's records merged over them."""
    from fp16guard.inspect.onnx_inspector import inspect_onnx
    from fp16guard.onnx_graph import fed_inputs, load_onnx

    proto = load_onnx(model)
    names = fed_inputs(proto)
    merged: dict[tuple, tuple[RangeStats, RangeStats]] = {}
    labels: list[tuple[int, str]] = []
    first: InspectionReport | None = None
    with _pass(f"inspect: FP32 ONNX Runtime runs, streamed from {source.describe()}", source) as count:
        for chunk in _chunks(source, watch, block):
            feeds = [onnx_feed(names, item) for _, item in chunk]
            with reporting(None):  # its runs are counted here, by input
                part = inspect_onnx(proto, feeds, labels=[item.label for _, item in chunk], memory_budget=memory_budget,
                                    static=static and first is None, source=name)
            first = first or part
            for rec in part.calls:
                key = (rec.name, rec.kind, rec.scope, 0, rec.leaf)
                ins, outs = merged.get(key, (RangeStats(), RangeStats()))
                merged[key] = (RangeStats.merge([ins, rec.inputs]), RangeStats.merge([outs, rec.outputs]))
            labels += [(i, item.label) for i, item in chunk]
            count(len(chunk))
            if watch.patience is not None:
                watch.update({repr(k): float("inf") if v[1].nonfinite else v[1].amax for k, v in merged.items()},
                             len(chunk))
    calls = tuple(CallRecord(i, n, kind, scope, call, ins, outs, leaf)
                  for i, ((n, kind, scope, call, leaf), (ins, outs)) in enumerate(merged.items()))
    report = first or InspectionReport(name or "model")
    return dataclasses.replace(report, calls=calls, mode="ONNX Runtime, each node's records merged over the inputs"), \
        labels


def inspect_stream(model, data, *, early_stop: int | None = None, ops: bool = False, device: str = "cpu",
                   half: bool = False, cuda_graph: bool | None = None, static: bool = True,
                   memory_budget: int = 1 << 30, source: str | None = None, block: int = BLOCK) -> InspectionReport:
    """Inspect a model on a streamed data set (see the module docstring).

    Args:
        model: a ``torch.nn.Module``, an ``.onnx`` path or ``onnx.ModelProto``, or a ``.pt2`` path.
        data: a :class:`~fp16guard.datasets.DataSource`, or what one takes.
        early_stop: stop once no record's power of two moved for this many inputs (a warning says
            after which input).
        ops, device, half, cuda_graph: PyTorch, as :func:`~fp16guard.inspect.hooks.run_torch`.
        static: include the static check of weights and constants.
        memory_budget: ONNX, as :func:`~fp16guard.inspect.onnx_inspector.inspect_onnx`.
        source: the model's name in the report.
        block: inputs per block (ONNX: per ONNX Runtime session; both: how often the early stop looks).

    Returns:
        The :class:`InspectionReport` of the whole data set (of every rank's shard, merged, on
        every rank); ``inputs`` in data-set order.

    Raises:
        InputError: an input the model rejects; ModelLoadError: an unreadable model.
    """
    from fp16guard.loading import Framework, open_model

    model, framework, name = open_model(model)
    src = data if isinstance(data, DataSource) else DataSource(data)
    watch = RangeWatch(early_stop)
    if framework is Framework.TORCH:
        report, labels = _torch(model, src, watch, ops=ops, device=device, half=half, cuda_graph=cuda_graph,
                                static=static, block=block)
    else:
        report, labels = _onnx(model, src, watch, static=static, memory_budget=memory_budget,
                               name=source or name, block=block)
    if watch.stopped:
        logger.warning("inspect %s", watch.note(src.share()))
    report = reduce_report(report, labels)
    return dataclasses.replace(report, source=source) if source else report
