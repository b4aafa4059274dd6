"""Reports of several processes merged into one: the records of one call site (name, kind, scope,
call) merged across the ranks of a ``torch.distributed`` group (max for amax, sums for counts), the
labels gathered in data-set order. :meth:`fp16guard.inspect.hooks.FInspect.report` and
:func:`fp16guard.inspect.streaming.inspect_stream` end with :func:`reduce_report`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from fp16guard import distributed
from fp16guard.inspect.report import CallRecord, InspectionReport
from fp16guard.stats import RangeStats

#: The fields of a :class:`~fp16guard.stats.RangeStats` in a reduced row (inputs', then outputs').
FIELDS = ("amax", "numel", "nonfinite", "nonzero", "flush_to_zero", "subnormal")


def record_key(rec: CallRecord) -> tuple:
    """A call site: what identifies one record across processes."""
    return rec.name, rec.kind, rec.scope, rec.call, rec.leaf


def _row(rec: CallRecord) -> list[float]:
    return [float(getattr(s, f)) for s in (rec.inputs, rec.outputs) for f in FIELDS]


def _stats(row: Sequence[float]) -> RangeStats:
    return RangeStats(float(row[0]), *(int(v) for v in row[1:len(FIELDS)]))


def reduce_records(records: Sequence[CallRecord]) -> tuple[CallRecord, ...]:
    """Every rank's records merged by call site (:func:`record_key`): max of amax, sums of counts;
    call sites in rank 0's order, then the other ranks' new ones; ``index`` renumbered. A
    collective: every rank calls it."""
    keys = [record_key(r) for r in records]
    if len(set(keys)) != len(keys):
        raise ValueError("records with the same call site: merge them before reducing")
    keys, rows = distributed.reduce_rows(keys, {k: _row(r) for k, r in zip(keys, records)},
                                         [0, len(FIELDS)])
    width = len(FIELDS)
    return tuple(CallRecord(i, name, kind, scope, call, _stats(row[:width]), _stats(row[width:]), leaf)
                 for i, ((name, kind, scope, call, leaf), row) in enumerate(zip(keys, rows)))


def reduce_report(report: InspectionReport, labels: Sequence[tuple[int, str]] | None = None) -> InspectionReport:
    """The report of the whole data set from each rank's report of its shard: records merged by
    call site (:func:`reduce_records`), labels gathered (``labels``: this rank's ``(index in the
    data set, label)`` pairs, put back in data-set order; else every rank's ``report.inputs`` in
    rank order). Without a process group, ``report`` as it is (labels in their order where given).
    A collective: every rank calls it."""
    if not distributed.active():
        return report if labels is None else dataclasses.replace(
            report, inputs=tuple(label for _, label in sorted(labels, key=lambda p: p[0])))
    inputs = (tuple(distributed.interleave(labels)) if labels is not None
              else tuple(x for part in distributed.gather(list(report.inputs)) for x in part))
    return dataclasses.replace(
        report, calls=reduce_records(report.calls), ops=reduce_records(report.ops), inputs=inputs,
        mode=f"merged over {distributed.world_size()} processes ({distributed.backend()})"
             f"{'; rank 0: ' + report.mode if report.mode else ''}")
