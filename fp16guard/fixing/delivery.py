"""What the fix delivers: the fixed model when it meets the bar, else the fewest FP32 (BF16) islands
that do, else the fallback (:func:`deliver`); and the variants verified beside it for comparison
(:func:`comparisons`: the naive conversion, both fallbacks, the other islands' precision).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from fp16guard.backends import Backend
from fp16guard.compare import Metric, Verification
from fp16guard.fixing.apply import Applied, apply_plan, verify
from fp16guard.fixing.result import FixResult
from fp16guard.fixing.targets import FixTarget
from fp16guard.inputs import NamedInput
from fp16guard.plan import RewritePlan
from fp16guard.progress import step

logger = logging.getLogger("fp16guard")


def variant_label(fallback: str | None, islands: str) -> str:
    """The verification row label of a fixed (``fallback=None``) or fallback model with islands in
    ``islands`` (or the fallback's precision): ``fixed``, ``fixed_bf16``, ``fallback``, ``fallback_bf16``."""
    precision = fallback or islands
    return ("fallback" if fallback else "fixed") + ("_bf16" if precision == "bf16" else "")


def comparisons(target: FixTarget, plan: RewritePlan, inputs: Sequence[NamedInput], splits: Sequence[str],
                 refs: list[list[np.ndarray]], *, fallback: str | None, islands: str, backend: str | Backend,
                 metrics: Mapping[str, Metric] | None, compare_naive: bool,
                 compare_fallback: bool) -> dict[str, Verification | None]:
    """The variants verified beside the written model, on the same inputs and backend, and only those
    asked for or needed: the fallback whose islands have the fixed model's precision (``fallback``
    for FP32 islands, ``fallback_bf16`` for BF16) whenever the fix is not itself a fallback, since
    the bar is relative to it (:func:`deliver`); with ``compare_naive``, ``naive`` (the plain FP16
    conversion); with ``compare_fallback``, the fallback in the other precision and
    ``other_islands`` (the fixed model with its islands in the other precision, when the plan has
    islands). A BF16 variant the backend cannot build or run (a GPU
    before Ampere, an ONNX Runtime EP without BF16 kernels) is left out with a warning; on
    ``emulate`` every failure is raised."""
    out: dict[str, Verification | None] = dict.fromkeys(("naive", "fallback", "fallback_bf16", "other_islands"))

    def run(variant: str, what: str, make) -> Verification | None:
        """Verify one comparison model, softly for BF16 on a real backend."""
        try:
            with step(f"rewrite: {what}, for comparison"):
                model = make()
            return verify(target, model, inputs, splits, backend=backend, variant=variant, metrics=metrics,
                          references=refs)[0]
        except Exception as e:  # noqa: BLE001 - a comparison row must not stop the fix on a real backend
            if "bf16" not in variant or getattr(backend, "name", backend) == "emulate":
                raise
            logger.warning("%s not verified on %s: %s", variant, getattr(backend, "name", backend),
                           next(iter(str(e).splitlines()), type(e).__name__))
            return None
    if compare_naive:
        out["naive"] = run("naive", "the naive FP16 conversion", lambda: target.convert(target.base, [])[0])
    for precision in ("fp32", "bf16"):
        needed = fallback is None and precision == islands  # the bar's reference (deliver)
        if precision != fallback and (needed or compare_fallback):
            variant = variant_label(precision, precision)  # fallback, fallback_bf16: the keys of ``out``
            out[variant] = run(variant, f"the {precision.upper()} fallback",
                               lambda p=precision: apply_plan(target, plan, fallback=p, check_hash=False).fixed)
    other = "bf16" if islands == "fp32" else "fp32"
    if compare_fallback and fallback is None and plan.unfixable_nodes:
        out["other_islands"] = run(variant_label(None, other), f"the fixed model with {other.upper()} islands",
                                   lambda: apply_plan(target, plan, islands=other, check_hash=False).fixed)
    return out


def deliver(result: FixResult, target: FixTarget, plan: RewritePlan, applied: Applied, inputs: Sequence[NamedInput],
             splits: Sequence[str], refs: list[list[np.ndarray]], *, backend: str | Backend,
             metrics: Mapping[str, Metric] | None, same: Verification | None, naive: Verification | None) -> FixResult:
    """``result`` with the best deployable model: the fixed one when it meets the bar
    (:func:`~fp16guard.compare.misses_bar` against the fallback with islands in the same
    precision, else the naive conversion); otherwise the fewest islands on the rewritten graph that
    do (:func:`~fp16guard.fixing.islands.search_islands`); otherwise the fallback itself, which other
    tools would give. The copy returned has ``delivered``, ``refusal`` (why the pure fix was not
    written), ``island_search`` and ``floor`` set.

    A plan that raises flushed constants (with consent) changes the model's math on purpose: its
    fixed model is then judged only for finiteness.
    """
    from fp16guard.compare import floor_note, misses_bar
    from fp16guard.fixing.islands import search_islands

    reference = same or naive
    consented = any(u.consent for u in plan.underflow)
    reason = misses_bar(result.verification, None if consented else reference, None if consented else result.tolerance)
    if consented and result.verification.finite:
        reason = None
    kept = len(result.conversion.fp32_nodes) + len(result.conversion.bf16_nodes)
    fallback_count = len(plan.fallback_fp32)
    if reason is None and kept > fallback_count and same is not None and same.finite and not consented:
        result = _with_fallback(result, target, plan, same, refusal=(
            f"the pure fix keeps {kept} node(s) in {result.islands.upper()} (its islands and their rescales), more "
            f"than the fallback's {fallback_count}, which meets the bar too"))
        return replace(result, floor=floor_note(result.verification, reference, result.tolerance))
    if reason is None:
        floor = None if consented else floor_note(result.verification, reference, result.tolerance)
        return replace(result, floor=floor)
    logger.info("the pure fix misses the bar (%s); searching for the fewest islands", reason)
    variant = result.verification.variant

    def check(fixed):
        """Verify a candidate; does it meet the bar?"""
        v = verify(target, fixed, inputs, splits, backend=backend, variant=variant, metrics=metrics, references=refs)[0]
        return v, misses_bar(v, reference, result.tolerance) is None

    fallback_nodes_ = [e["node"] for e in plan.fallback_fp32]
    with step("islands: the fewest FP32 nodes that meet the bar"):
        found = search_islands(applied.rewritten, plan.unfixable_nodes, fallback_nodes_,
                               _true_amax(plan),
                               lambda nodes: target.convert(applied.rewritten, nodes, islands=result.islands),
                               check, limit=max(len(fallback_nodes_), len(plan.unfixable_nodes)))
    kept = (found.conversion.fp32_nodes + found.conversion.bf16_nodes) if found.nodes is not None else []
    if found.nodes is not None and len(kept) > len(fallback_nodes_) and same is not None and same.finite:
        found.nodes = None  # its restoring rescales make it larger than the fallback: the fallback is no worse
    if found.nodes is not None:
        result = replace(result, fixed=found.fixed, conversion=found.conversion, verification=found.verification,
                         delivered="islands", refusal=reason, island_search=found)
    elif same is not None and same.finite:
        result = _with_fallback(result, target, plan, same, refusal=reason, island_search=found)
    else:
        result = replace(result, refusal=reason, island_search=found)
    return replace(result, floor=floor_note(result.verification, reference, result.tolerance))


def _with_fallback(result: FixResult, target: FixTarget, plan: RewritePlan, verified: Verification,
                   **changes) -> FixResult:
    """``result`` holding the fallback in its islands' precision (already ``verified``), with
    ``changes`` (``refusal``, ``island_search``) too."""
    fb = apply_plan(target, plan, fallback=result.islands, check_hash=False)
    return replace(result, fixed=fb.fixed, rewritten_fp32=fb.rewritten, notes=fb.notes, conversion=fb.conversion,
                   verification=verified, delivered="fallback", **changes)


def _true_amax(plan: RewritePlan) -> dict[str, float]:
    """The true (unscaled) calibration amax of every value a plan's regions scale (0 elsewhere)."""
    out: dict[str, float] = {}
    for region in plan.regions:
        for t in region.tensors:
            out[t] = max(out.get(t, 0.0), float(region.amax))
    return out
