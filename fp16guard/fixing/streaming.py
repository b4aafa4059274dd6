"""Calibration on a streamed data set (:class:`fp16guard.datasets.DataSource`), alone or across the
processes of a ``torch.distributed`` group.

:func:`calibrate_stream` reads the inputs a block at a time (:data:`fp16guard.datasets.BLOCK`), and
merges what calibration measures as it goes (:class:`StreamRanges`): the running max of every
value's amax on the prepared and on the base graph, the values FP16 flushes, the labels. Memory
holds one block. Under a process group each rank reads its own shard and the ranges are merged
across ranks (max, union: :mod:`fp16guard.distributed`) before the plan is solved, so every rank
gets the plan of the whole data set. Then the one calibration,
:func:`~fp16guard.fixing.calibration.calibrate_target`, decides the plan from these ranges
(:class:`MeasuredTarget`): a streamed plan is the plan of the same inputs in one list, value for
value, and a distributed one the plan of the union of the shards.

Early stop (``early_stop=N``): the pass ends once no value's power of two moved for ``N`` inputs
(:class:`~fp16guard.datasets.RangeWatch`); a warning says after which input.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from fp16guard import control_flow, distributed
from fp16guard.datasets import BLOCK, CAPTURE_INPUTS, DataSource, RangeWatch, blocks
from fp16guard.errors import FixError, UsageError
from fp16guard.fixing.calibration import INPUT_FLOOR_QUANTILE, calibrate_target, collect_magnitudes
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.targets import FixTarget, OnnxFixTarget
from fp16guard.fp16 import FP16_MAX
from fp16guard.inputs import NamedInput, check_inputs
from fp16guard.plan import DEFAULT_TARGET_LOG2, RewritePlan
from fp16guard.progress import advance, reporting, step

logger = logging.getLogger("fp16guard")

WHAT = "calibration input"


def _merge(into: dict[str, float], new: Mapping[str, float]) -> None:
    """``into[name] = max(into[name], new[name])`` (inf stays inf)."""
    for name, a in new.items():
        into[name] = max(into.get(name, 0.0), a)


class _Quiet(logging.Filter):
    """Drops a target's per-block warning that a subgraph never ran: only the whole pass can say."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the never-ran warning, True for every other record."""
        return "never ran in calibration" not in record.getMessage()


@contextlib.contextmanager
def _block_measurement() -> Iterator[None]:
    """Around one block's measurement: its ONNX Runtime runs are counted by the stream's own step
    (not the block's), and per-block subgraph warnings are left to the end of the pass."""
    quiet = _Quiet()
    logger.addFilter(quiet)
    try:
        with reporting(None), step("calibration: one block of the stream"):  # a step of no listener
            yield
    finally:
        logger.removeFilter(quiet)


class StreamRanges:
    """What calibration measures, merged over streamed inputs.

    Attributes:
        amax: max |x| of every value of the prepared graph (inf where ever non-finite).
        base: the same on the base graph (the FP32 fallback's ranges).
        flushed: values of the prepared graph holding a nonzero value FP16 flushes to zero.
        labels: ``(index in the data set, label)`` of every input measured.
    """

    def __init__(self, target: FixTarget):
        self.target = target
        self.amax: dict[str, float] = {}
        self.base: dict[str, float] = {}
        self.flushed: set[str] = set()
        self.labels: list[tuple[int, str]] = []

    def add(self, pairs: Sequence[tuple[int, NamedInput]]) -> None:
        """Measure one block of ``(index, input)`` pairs and merge it in."""
        items = [item for _, item in pairs]
        check_inputs(items, what=WHAT)
        self.target.check_feeds(items, WHAT)
        with _block_measurement():
            _merge(self.amax, self.target.activation_amax(items))
            self.flushed |= self.target.flushed_values(items)
            _merge(self.base, self.target.activation_amax(items, prepared=False))
        self.labels += [(i, item.label) for i, item in pairs]

    def reduce(self) -> None:
        """Merge every rank's ranges (a collective: every rank calls it); the labels in data-set order."""
        if distributed.active():
            self.amax = distributed.max_by_name(self.amax)
            self.base = distributed.max_by_name(self.base)
            self.flushed = distributed.union(self.flushed)
            self.labels = list(enumerate(distributed.interleave(self.labels)))
        else:
            self.labels.sort(key=lambda p: p[0])


class MeasuredTarget:
    """A :class:`~fp16guard.fixing.targets.FixTarget` whose ranges are already measured: what
    :func:`~fp16guard.fixing.calibration.calibrate_target` asks of the inputs comes from
    :class:`StreamRanges`; everything else is the target's own."""

    def __init__(self, target: FixTarget, ranges: StreamRanges, source: DataSource):
        self.__dict__.update(_target=target, _ranges=ranges, _source=source)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def activation_amax(self, inputs: Sequence[NamedInput], *, prepared: bool = True) -> dict[str, float]:
        """The merged amax of the prepared (or base) graph, measured during the pass."""
        advance(len(inputs))
        return dict(self._ranges.amax if prepared else self._ranges.base)

    def flushed_values(self, inputs: Sequence[NamedInput]) -> set[str]:
        """The merged values FP16 flushes, measured during the pass."""
        return set(self._ranges.flushed)

    def input_floors(self, names: Sequence[str], amax: Mapping[str, float]) -> dict[str, float]:
        """:func:`~fp16guard.fixing.calibration.input_floors` of the data set, for graph inputs beyond
        FP16: a second pass that keeps those inputs' nonzero magnitudes (the quantile needs them
        all; merged across ranks), run only when a graph input exceeds 65504."""
        big = [k for k, name in enumerate(names) if amax.get(name, 0.0) > FP16_MAX]
        if not big:
            return {}
        if not self._source.reiterable:
            raise FixError(f"graph input {names[big[0]]} exceeds 65504: its scale floor needs a second pass over "
                           f"the data set, and a generator reads once; give a list, files or a DataLoader")
        values: dict[str, list[np.ndarray]] = {}
        with step("calibration: the magnitudes of the graph inputs beyond FP16 (second pass)",
                  total=self._source.share()) as count:
            for _, item in self._source.indexed():
                collect_magnitudes(self._target, item, names, big, values)
                count()
        out = {}
        for k in big:
            parts = [p for rank_values in distributed.gather(values) for p in rank_values.get(names[k], [])]
            nonzero = np.concatenate(parts) if parts else np.zeros(0)
            if nonzero.size:
                out[names[k]] = float(np.quantile(nonzero, INPUT_FLOOR_QUANTILE))
        return out


def _control_notes(target: FixTarget, amax: Mapping[str, float]) -> None:
    """An ONNX target's notes of the subgraphs that never ran in the whole pass (every rank's)."""
    if not isinstance(target, OnnxFixTarget):
        return
    target.control_notes = []
    for owner, attr in control_flow.unmeasured(target.prepared, [amax]):
        what = f"{control_flow.branch_label(owner, attr)} never ran in calibration: converted to FP16 unmeasured"
        logger.warning("%s", what)
        target.control_notes.append(RewriteNote("control_flow", owner.name, what))


def measure(target: FixTarget, source: DataSource, *, early_stop: int | None = None,
            block: int = BLOCK) -> StreamRanges:
    """Stream ``source`` (this rank's shard) through ``target`` and merge its ranges (across ranks too).

    With ``early_stop``, the pass ends once no value's power of two moved for that many inputs
    (under a process group: once every rank stopped or ran out; one small collective per block).
    """
    ranges = StreamRanges(target)
    watch = RangeWatch(early_stop)
    size = min(block, early_stop) if early_stop else block
    pending = blocks(source.indexed(), size)
    agree = early_stop is not None and distributed.active()
    done = False
    with step(f"calibration: FP32 activation ranges, streamed from {source.describe()}", total=source.share()) as count:
        while True:
            if not done:
                chunk = next(pending, None)
                done = chunk is None
                if chunk is not None:
                    ranges.add(chunk)
                    count(len(chunk))
                    done = watch.update(ranges.amax, len(chunk))
            if (distributed.all_true(done) if agree else done):
                break
    if watch.stopped:
        logger.warning("calibration %s", watch.note(source.share()))
    ranges.reduce()
    _control_notes(target, ranges.amax)
    return ranges


def calibrate_stream(capture: Callable[[list[NamedInput]], FixTarget], data, *,
                     target_log2: int = DEFAULT_TARGET_LOG2, raise_underflow: bool = False,
                     submodule: str | None = None, early_stop: int | None = None, block: int = BLOCK) -> RewritePlan:
    """:func:`fp16guard.calibrate` on a streamed data set (see the module docstring).

    Args:
        capture: the model's target from its first inputs (:func:`fp16guard.calibrate` passes
            :func:`~fp16guard.fixing.pipeline.make_target` of the model).
        data: a :class:`~fp16guard.datasets.DataSource`, or what one takes (paths, an iterable, a DataLoader).
        target_log2, raise_underflow: as :func:`fp16guard.calibrate`.
        submodule: not taken: a submodule is calibrated on inputs the whole model computes (give a list).
        early_stop: stop once the ranges have not moved for this many inputs.
        block: inputs measured at once.

    A PyTorch module is captured on the first :data:`~fp16guard.datasets.CAPTURE_INPUTS` inputs of
    the data set (the same on every rank): dimensions that differ among them are dynamic.

    Raises:
        FixError: no input; as :func:`fp16guard.calibrate` otherwise. UsageError: ``submodule``.
    """
    if submodule is not None:
        raise UsageError(f"submodule {submodule!r}: a submodule is calibrated on the inputs the whole model gives it, "
                         f"which a stream does not hold; give the inputs as a list")
    src = DataSource(data, what=getattr(data, "what", None) or WHAT)
    head = src.peek(CAPTURE_INPUTS)
    if not head:
        raise FixError("calibration needs at least one input")
    check_inputs(head, what=WHAT)
    target = capture(head)
    ranges = measure(target, src, early_stop=early_stop, block=block)
    if not ranges.labels:
        raise FixError("calibration needs at least one input")
    labels = [NamedInput(label, ()) for _, label in ranges.labels]
    return calibrate_target(MeasuredTarget(target, ranges, src), labels, target_log2=target_log2,
                            raise_underflow=raise_underflow)
