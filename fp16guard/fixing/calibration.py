"""Step 1 of the fix, calibration: a target measured on calibration inputs, and its rewrite plan.

:func:`calibrate_target` runs the prepared graph in FP32, hands its activation ranges to the scale
solver (:func:`fp16guard.fixing.solver.solve`), finds the constants FP16 flushes to zero and the
islands they need (:func:`underflow_islands`), the per-input scale floors (:func:`input_floors`) and
the nodes the FP32 fallback would keep (:func:`fallback_nodes`), and returns the
:class:`~fp16guard.plan.RewritePlan`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from fp16guard.errors import FixError
from fp16guard.fixing.solver import ScaleOp, ScaleSolution, Unfixable, solve
from fp16guard.fixing.targets import FixTarget, NodeIO, OnnxFixTarget, TorchFixTarget
from fp16guard.fp16 import FP16_MAX, FP16_MIN_NORMAL
from fp16guard.inputs import NamedInput, torch_args
from fp16guard.plan import DEFAULT_TARGET_LOG2, PlanRegion, PlanUnderflow, RewritePlan
from fp16guard.progress import step


def fallback_nodes(nodes: Sequence[NodeIO], amax: Mapping[str, float], overflowing_constants: set[str],
                   target_log2: int) -> list[dict]:
    """Nodes the FP32 fallback keeps in FP32: readers of constants that overflow FP16, writers of
    values above ``2**target_log2`` and readers of values above 65504.

    Args:
        nodes: ``(node, inputs, outputs)`` of the unrewritten graph, in graph order.
        amax: calibration amax per value of that graph.
        overflowing_constants: names of its constants beyond 65504.
        target_log2: the plan's headroom target.

    Returns:
        ``[{"node", "reason"}]`` in graph order.
    """
    out = []
    for name, inputs, outputs in nodes:
        reason = ""
        big_in = [t for t in inputs if amax.get(t, 0.0) > FP16_MAX]
        big_out = [t for t in outputs if amax.get(t, 0.0) > 2.0 ** target_log2]
        if any(t in overflowing_constants for t in inputs):
            reason = "reads a constant beyond 65504"
        elif big_out:
            reason = f"writes {big_out[0]} (amax {amax[big_out[0]]:.4g} > 2^{target_log2})"
        elif big_in:
            reason = f"reads {big_in[0]} (amax {amax[big_in[0]]:.4g} > 65504)"
        if reason:
            out.append({"node": name, "reason": reason})
    return out


def underflow_islands(ops: Sequence[ScaleOp], underflow: Sequence[PlanUnderflow], flushed: set[str]) -> list[Unfixable]:
    """FP32 islands for constants FP16 flushes to zero where the values beside them flush too.

    ``log(p + 1e-10)`` on a silent frame (``p = 0``) is -23 in FP32 and ``log(0) = -inf`` in FP16,
    where 1e-10 is 0. Where the constant's reader writes values FP16 flushes (calibration saw
    them), the reader runs in FP32, and so does every op reading a value that still holds flushed
    values (the ``Log``), until the values are back in FP16's range. A reader whose outputs never
    come near the constant (BERT's ``var + 1e-12``, ``var`` ~1) stays in FP16: the constant then
    changes nothing.

    Args:
        ops: the graph (the solver's view), in execution order.
        underflow: flushed constants the plan may not raise (no consent).
        flushed: values with nonzero elements below FP16's smallest subnormal in calibration.

    Returns:
        One :class:`~fp16guard.fixing.solver.Unfixable` per constant that needs an island.
    """
    readers: dict[str, list[ScaleOp]] = {}
    for op in ops:
        for t in dict.fromkeys(op.inputs):
            readers.setdefault(t, []).append(op)
    by_name = {op.name: op for op in ops}
    out = []
    for u in underflow:
        island: list[str] = []
        todo = [by_name[r] for r in u.readers if r in by_name and any(t in flushed for t in by_name[r].outputs)]
        while todo:
            op = todo.pop(0)
            if op.name in island:
                continue
            island.append(op.name)
            todo += [r for t in op.outputs if t in flushed for r in readers.get(t, [])]
        if island:
            out.append(Unfixable(u.tensor, tuple(island), u.amax,
                                 f"{u.tensor} ({u.amax:.3g}) is 0 in FP16 and {island[0]} writes values that small "
                                 f"(calibration): the island keeps them in FP32"))
    return out


#: The share of a scaled graph input's nonzero calibration values its scale may store below FP16's
#: normal range (:func:`input_floors`).
INPUT_FLOOR_QUANTILE = 1e-3


def input_floors(target: FixTarget, inputs: Sequence[NamedInput], names: Sequence[str],
                 amax: Mapping[str, float]) -> dict[str, float]:
    """Per graph input beyond FP16, the magnitude below which only :data:`INPUT_FLOOR_QUANTILE` of its
    nonzero calibration values lie: the solver scales the input no more than keeps that magnitude
    a normal FP16 number (down to the exponent that just fits 65504; ``input_floor`` of
    :func:`~fp16guard.fixing.solver.solve`).

    A power spectrum whose quiet frames are 2^37 below its loud ones loses them to subnormals at
    any scale, and a per-frame LayerNorm after it makes each frame count: scaled at 2^-17 (loud
    frames at 8192) its relative error is 1.4e-2, at 2^-14 (65504) 4.8e-3, against the FP32
    fallback's 4.8e-4, which reads the input in FP32.
    """
    big = [k for k, name in enumerate(names) if amax.get(name, 0.0) > FP16_MAX]
    own = getattr(target, "input_floors", None)  # a streamed calibration's (fp16guard.fixing.streaming)
    if big and own is not None:
        return own(names, amax)
    if not big or not isinstance(target, (OnnxFixTarget, TorchFixTarget)):
        return {}
    values: dict[str, list[np.ndarray]] = {}
    for item in inputs:
        collect_magnitudes(target, item, names, big, values)
    out = {}
    for name, parts in values.items():
        nonzero = np.concatenate(parts)
        if nonzero.size:
            out[name] = float(np.quantile(nonzero, INPUT_FLOOR_QUANTILE))
    return out


def collect_magnitudes(target: FixTarget, item: NamedInput, names: Sequence[str], big: Sequence[int],
                       values: dict[str, list[np.ndarray]]) -> None:
    """Append to ``values[name]`` the nonzero finite magnitudes (float64, flat) of the graph inputs
    ``names[k]`` for ``k`` in ``big`` in one calibration input (what :func:`input_floors` takes
    the quantile of)."""
    if isinstance(target, OnnxFixTarget):
        feed = target.feed(item)
        arrays = [feed.get(name) for name in names]
    else:
        arrays = [a.numpy() if isinstance(a, torch.Tensor) else None for a in torch_args(item)]
    for k in big:
        a = arrays[k] if k < len(arrays) else None
        if a is not None and np.issubdtype(np.asarray(a).dtype, np.floating):
            a = np.abs(np.asarray(a, dtype=np.float64)).reshape(-1)
            values.setdefault(names[k], []).append(a[(a > 0) & np.isfinite(a)])


def calibrate_target(target: FixTarget, inputs: Sequence[NamedInput], *, target_log2: int = DEFAULT_TARGET_LOG2,
                     raise_underflow: bool = False) -> RewritePlan:
    """Measure a target on calibration inputs and decide its rewrite plan.

    Args:
        target: the model (:class:`OnnxFixTarget` or :class:`TorchFixTarget`).
        inputs: calibration inputs.
        target_log2: headroom target: stored activations at or below ``2**target_log2``
            (default :data:`~fp16guard.plan.DEFAULT_TARGET_LOG2`, 13, i.e. 8192: 3 bits below 65504, room
            for inputs 8x larger than seen).
        raise_underflow: consent to raising constants FP16 flushes to zero (see
            :class:`~fp16guard.plan.PlanUnderflow`).

    Returns:
        The :class:`~fp16guard.plan.RewritePlan` (``framework`` and ``model_sha256`` from the target;
        for a PyTorch target also its per-module scales, ``modules``).

    Raises:
        FixError: no inputs, or the FP32 model itself outputs inf/NaN on them (inf/NaN inside the
            graph, such as a masked ``log(0)``, is allowed: FP16 computes the same).
    """
    if not inputs:
        raise FixError("calibration needs at least one input")
    with step(f"calibration: FP32 activation ranges on {len(inputs)} input(s)", total=len(inputs)):
        amax = target.activation_amax(inputs)
    graph_inputs, graph_outputs = target.graph_io()
    bad = [t for t in graph_outputs if not math.isfinite(amax.get(t, 0.0))]
    if bad:
        raise FixError(f"the FP32 model already outputs inf/NaN at {bad[0]} on the calibration inputs; "
                       f"no rewrite can fix that")
    # Intermediate values that are inf/NaN in FP32 too (T5's relative-position buckets take log(0)
    # and then mask it): FP16 gives the same inf, scaled or not, so only finite values size a region.
    amax = {t: (a if math.isfinite(a) else 0.0) for t, a in amax.items()}
    with step("calibration: scale regions (solver)"):
        sol = solve(target.scale_ops(), amax, graph_inputs=graph_inputs, graph_outputs=graph_outputs,
                    target_log2=target_log2, input_floor=input_floors(target, inputs, graph_inputs, amax))
    underflow = [PlanUnderflow(name, readers, value, flushed, FP16_MIN_NORMAL, raise_underflow)
                 for name, readers, value, flushed in target.flushed_constants()]
    ops = target.scale_ops()
    with step("calibration: values FP16 flushes to zero"):
        islands = underflow_islands(ops, [u for u in underflow if not u.consent], target.flushed_values(inputs))
    sol.unfixable += islands
    nodes, overflowing = target.fallback_graph()
    with step("calibration: the FP32 fallback's ranges", total=len(inputs)):
        fallback = fallback_nodes(nodes, target.activation_amax(inputs, prepared=False), overflowing, target_log2)
    known = {name for name, _, _ in nodes}
    fallback += [{"node": n, "reason": u.reason} for u in islands for n in u.ops if n in known]
    return target.complete_plan(_plan(target, target_log2, [i.label for i in inputs], sol, underflow, fallback), amax)


def _plan(target: FixTarget, target_log2: int, labels: list[str], sol: ScaleSolution,
          underflow: list[PlanUnderflow], fallback: list[dict]) -> RewritePlan:
    """The :class:`RewritePlan` of a solved graph."""
    return RewritePlan(
        framework=target.framework, source=target.source, model_sha256=target.model_sha256,
        target_log2=target_log2, calibration=labels,
        regions=[PlanRegion(r.exponent, list(r.tensors), list(r.ops), list(r.scopes), r.amax, r.amax_after,
                            list(r.opened_by), list(r.closed_by)) for r in sol.regions],
        rescale_ops=[{"tensor": r.tensor, "exponent": r.exponent, "consumer": r.consumer, "reason": r.reason}
                     for r in sol.rescales],
        underflow=underflow,
        unfixable=[{"tensor": u.tensor, "nodes": list(u.ops), "amax": u.amax, "reason": u.reason}
                   for u in sol.unfixable],
        fallback_fp32=fallback,
        tight=[{"tensor": t, "amax": a} for t, a in sol.tight],
    )

