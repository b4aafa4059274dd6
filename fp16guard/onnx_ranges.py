"""The FP32 measurement of every activation of an ONNX model, :func:`value_ranges`: what the
inspector reports and the fix calibrates on.

It stands above the graph layer (:mod:`fp16guard.onnx_graph`), the in-graph statistics
(:mod:`fp16guard.onnx_stats`) and the control flow replay (:mod:`fp16guard.control_flow`), and uses
all three: the main graph's values are measured by reductions added to the graph itself, one ONNX
Runtime run per input that returns scalars only (``method="graph"``, the default); the values inside
``If``/``Loop``/``Scan`` subgraphs by replaying them (:func:`fp16guard.control_flow.inner_ranges`).

The earlier way stays as ``method="expose"``: every intermediate value is exposed as a graph output
in *chunks* whose total size, estimated by ONNX shape inference for the actual input shapes, fits a
memory budget (default 1 GiB), each chunk one ONNX Runtime run reduced on the host with
:func:`fp16guard.stats.tensor_stats`. It ran the whole model once per chunk: PP-OCRv4's detector on
its two calibration photos took 37 runs, and 19.6 s against 0.59 s for the in-graph amax and 4.0 s
for the in-graph amax and counts (2 shared cores, ``benchmarks/fix_cost.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import onnx

from fp16guard import progress
from fp16guard.control_flow import inner_ranges
from fp16guard.errors import InputError, ModelLoadError
from fp16guard.onnx_graph import (
    Feeds,
    activation_values,
    cpu_session,
    expose,
    feed_list,
    constant_names,
    load_onnx,
    plan_chunks,
    subgraph_nodes,
    value_bytes,
    value_types,
)
from fp16guard.onnx_stats import read_statistics, statistics_model, statistics_session
from fp16guard.stats import RangeStats, tensor_stats

logger = logging.getLogger("fp16guard")


#: The ways :func:`value_ranges` measures the main graph (module docstring).
METHODS = ("graph", "expose")


def value_ranges(model: str | Path | onnx.ModelProto, feeds: Feeds | Sequence[Feeds], *,
                 providers: Sequence[str] | None = None, labels: Sequence[str] = (),
                 memory_budget: int = 1 << 30, counts: bool | Collection[str] = True,
                 method: str = "graph", outputs: list | None = None,
                 consume: bool = False) -> list[dict[str, RangeStats]]:
    """Range statistics of every activation of an FP32 ONNX model, per run.

    The values measured are :func:`~fp16guard.onnx_graph.activation_values` (graph inputs and node
    outputs of floating type that depend on an input), by reductions inside the graph
    (:func:`fp16guard.onnx_stats.statistics_model`): one ONNX Runtime run per feed. Values inside ``If``/``Loop``/``Scan`` subgraphs are measured by replaying them
    (:func:`fp16guard.control_flow.inner_ranges`): only where a branch or an iteration ran.

    Args:
        model, feeds, providers, labels, memory_budget: as in
            :func:`~fp16guard.inspect.onnx_inspector.inspect_onnx` (``memory_budget``: the bytes
            held at once by ``method="expose"`` and by the subgraph replay).
        counts: measure the zero, flush-to-zero and subnormal counts of every value (``True``), of
            none (``False``: amax and inf/NaN counts only, what a fix calibrates on; the counts
            of :class:`RangeStats` are then 0) or of the values named.
        method: ``"graph"`` or ``"expose"`` (:data:`METHODS`, module docstring).
        outputs: a list that receives, per run, the model's own outputs from the same run (numpy
            arrays in graph output order; ``method="graph"`` only).
        consume: ``model`` (a ``ModelProto``) is the caller's to give away: the statistics are added
            to it in place instead of to a copy (one copy of the weights less).

    Returns:
        One ``{value name: RangeStats}`` per run.

    Raises:
        ModelLoadError: ONNX Runtime cannot load the model.
        InputError: a feed does not match the graph's inputs, or ONNX Runtime fails on it.
    """
    if method not in METHODS or outputs is not None and method != "graph":
        raise ValueError(f"method must be one of {METHODS}, not {method!r}; outputs are kept by 'graph' only")
    proto = load_onnx(model)
    consts = constant_names(proto)
    runs = feed_list(proto, feeds, consts)
    types = value_types(proto)
    measured, _ = activation_values(proto, types, consts)
    largest = max(runs, key=lambda f: sum(a.nbytes for a in f.values()))
    sizes = value_bytes(proto, largest)
    name = Path(model).name if not isinstance(model, onnx.ModelProto) else proto.graph.name
    inner = bool(subgraph_nodes(proto))  # before the statistics (their If nodes) are added in place
    if method == "graph":
        stats = _in_graph(proto, runs, measured, types, sizes, counts, providers, labels, name, outputs,
                          consume and proto is model)
    else:
        stats = _exposed(proto, runs, measured, types, sizes, memory_budget, providers, labels, name)
    if inner:  # values inside If/Loop/Scan subgraphs: replayed (fp16guard.control_flow)
        for run, inner in enumerate(inner_ranges(proto, runs, memory_budget=memory_budget)):
            stats[run].update(inner)
    return stats


def _run(sess, feed: dict, run: int, labels: Sequence[str]) -> list:
    """One ONNX Runtime run; a failure is the input's fault (:class:`InputError` naming it)."""
    try:
        return sess.run(None, feed)
    except Exception as e:
        label = labels[run] if run < len(labels) else f"run {run}"
        raise InputError(f"ONNX Runtime failed on {label}: {e}") from None


def _in_graph(proto: onnx.ModelProto, runs: list[dict], measured: list[str], types: dict, sizes: dict,
              counts: bool | Collection[str], providers: Sequence[str] | None, labels: Sequence[str],
              name: str, kept: list | None = None, in_place: bool = False) -> list[dict[str, RangeStats]]:
    """``method="graph"``: one run per feed of the model with its statistics inside (and its own
    outputs appended to ``kept``, when given)."""
    subgraph_values = in_place and bool(subgraph_nodes(proto))  # the replay below reads the model as given
    width = len(proto.graph.output) if kept is not None else 0  # before the statistics are added
    graph, outputs = statistics_model(proto, measured, types, counts=counts, sizes=sizes, keep_outputs=kept is not None,
                                      in_place=in_place and not subgraph_values)
    logger.info("measuring %d values of %s inside the graph, one run per input", len(measured), name)
    progress.set_total(len(runs))  # the enclosing step counts ONNX Runtime runs
    sess = statistics_session(graph, providers)
    names = [o.name for o in sess.get_outputs()]
    stats = []
    for run, feed in enumerate(runs):
        arrays = _run(sess, feed, run, labels)
        stats.append(read_statistics(dict(zip(names, arrays[:len(arrays) - width])), outputs))
        if kept is not None:
            kept.append(arrays[len(arrays) - width:])
        progress.advance()
    return stats


def _exposed(proto: onnx.ModelProto, runs: list[dict], measured: list[str], types: dict, sizes: dict,
             memory_budget: int, providers: Sequence[str] | None, labels: Sequence[str],
             name: str) -> list[dict[str, RangeStats]]:
    """``method="expose"``: the values exposed as outputs in chunks, reduced on the host."""
    import onnxruntime as ort
    import torch

    chunks = plan_chunks(measured, sizes, memory_budget)
    logger.info("measuring %d values of %s in %d chunk(s) per run", len(measured), name, len(chunks))
    progress.set_total(len(chunks) * len(runs))  # the enclosing step counts ONNX Runtime runs
    stats: list[dict[str, RangeStats]] = [{} for _ in runs]
    for chunk in chunks:
        exposed = expose(proto, chunk, types)
        if providers is None or list(providers) == ["CPUExecutionProvider"]:
            sess = cpu_session(exposed)
        else:
            try:
                opts = ort.SessionOptions()
                opts.log_severity_level = 3
                sess = ort.InferenceSession(exposed.SerializeToString(), opts, providers=list(providers))
            except Exception as e:
                raise ModelLoadError(f"ONNX Runtime cannot load {name}: {e}") from None
        for run, feed in enumerate(runs):
            values = _run(sess, feed, run, labels)
            progress.advance()
            for value_name, v in zip(chunk, values):
                t = torch.from_numpy(np.ascontiguousarray(v))
                stats[run][value_name] = RangeStats.from_row(tensor_stats(t).tolist(), t.numel())
            del values
    return stats
