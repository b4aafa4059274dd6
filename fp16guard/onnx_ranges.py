"""The FP32 measurement of every activation of an ONNX model, :func:`value_ranges`: what the
inspector reports and the fix calibrates on.

It stands above the graph layer (:mod:`fp16guard.onnx_graph`) and the control flow replay
(:mod:`fp16guard.control_flow`), and uses both: the main graph's values are measured in ONNX
Runtime runs, the values inside ``If``/``Loop``/``Scan`` subgraphs by replaying them
(:func:`fp16guard.control_flow.inner_ranges`).

Exposing every intermediate tensor as a graph output at once would keep them all alive (gigabytes
for a 2880x2048 image). :func:`value_ranges` instead exposes them in *chunks* whose total size,
estimated by ONNX shape inference for the actual input shapes, fits a memory budget (default
1 GiB; a value whose size cannot be inferred counts as a sixteenth of the budget). Each chunk is
one ONNX Runtime run; its outputs are reduced on the host with :func:`fp16guard.stats.tensor_stats`
and freed before the next chunk runs. A model whose activations fit the budget runs once.

(Reducing inside the graph, with ``ReduceMax``/``ReduceSum`` nodes appended per value, was tried
first: ONNX Runtime's CPU kernels for the boolean masks made it 80x slower than a plain run, and it
scheduled the reductions late enough to hold 7 GB for a 736x1472 image.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
    graph_constants,
    load_onnx,
    plan_chunks,
    subgraph_nodes,
    value_bytes,
    value_types,
)
from fp16guard.stats import RangeStats, tensor_stats

logger = logging.getLogger("fp16guard")


def value_ranges(model: str | Path | onnx.ModelProto, feeds: Feeds | Sequence[Feeds], *,
                 providers: Sequence[str] | None = None, labels: Sequence[str] = (),
                 memory_budget: int = 1 << 30) -> list[dict[str, RangeStats]]:
    """Range statistics of every activation of an FP32 ONNX model, per run.

    The values measured are :func:`~fp16guard.onnx_graph.activation_values` (graph inputs and node
    outputs of floating type that depend on an input). They are exposed as graph outputs in chunks
    of at most ``memory_budget`` bytes and reduced to :class:`RangeStats` as each run returns.
    Values inside ``If``/``Loop``/``Scan`` subgraphs are measured by replaying them
    (:func:`fp16guard.control_flow.inner_ranges`): only where a branch or an iteration ran.

    Args:
        model, feeds, providers, labels, memory_budget: as in
            :func:`~fp16guard.inspect.onnx_inspector.inspect_onnx`.

    Returns:
        One ``{value name: RangeStats}`` per run.

    Raises:
        ModelLoadError: ONNX Runtime cannot load the model.
        InputError: a feed does not match the graph's inputs, or ONNX Runtime fails on it.
    """
    import onnxruntime as ort
    import torch

    proto = load_onnx(model)
    consts = graph_constants(proto)
    runs = feed_list(proto, feeds, set(consts))
    types = value_types(proto)
    measured, _ = activation_values(proto, types, consts)
    largest = max(runs, key=lambda f: sum(a.nbytes for a in f.values()))
    chunks = plan_chunks(measured, value_bytes(proto, largest), memory_budget)
    name = Path(model).name if not isinstance(model, onnx.ModelProto) else proto.graph.name
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
            try:
                values = sess.run(None, feed)
            except Exception as e:
                label = labels[run] if run < len(labels) else f"run {run}"
                raise InputError(f"ONNX Runtime failed on {label}: {e}") from None
            progress.advance()
            for value_name, v in zip(chunk, values):
                t = torch.from_numpy(np.ascontiguousarray(v))
                stats[run][value_name] = RangeStats.from_row(tensor_stats(t).tolist(), t.numel())
            del values
    if subgraph_nodes(proto):  # values inside If/Loop/Scan subgraphs: replayed (fp16guard.control_flow)
        for run, inner in enumerate(inner_ranges(proto, runs, memory_budget=memory_budget)):
            stats[run].update(inner)
    return stats
