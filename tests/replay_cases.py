"""Helpers of the FInspect.run tests (tests/test_replay.py on the CPU, tests/test_cuda_graph.py on
CUDA): the eager reports that ``run`` must reproduce, merged record by record."""

import torch

from fp16guard import FInspect
from fp16guard.stats import RangeStats


def batches(shape, scales, seed=0):
    """Normal float32 tensors of ``shape``, one per scale (so amax and underflow differ per batch)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * s for s in scales]


def eager_reports(model, batches, **kw):
    """One report per batch, each from its own probe and plain ``model(x)``."""
    reports = []
    for x in batches:
        with torch.no_grad(), FInspect(model, **kw) as probe:
            model(x)
        reports.append(probe.report())
    return reports


def merged(reports, level="calls"):
    """Record i of every report merged: what run() must give for batches of one signature."""
    rows = list(zip(*(getattr(r, level) for r in reports)))
    return [(recs[0].name, recs[0].kind, RangeStats.merge(r.inputs for r in recs),
             RangeStats.merge(r.outputs for r in recs)) for recs in rows]


def as_rows(records):
    """``(name, kind, inputs, outputs)`` of each record: what must agree value for value."""
    return [(r.name, r.kind, r.inputs, r.outputs) for r in records]
