"""Terminal rendering of a rewrite plan, a fix result and verification tables with rich.

:func:`print_fix` prints a fix result in full (:func:`fix_renderables`, also the result's
``__rich_console__``), ending with its verdict: the worst error against the tolerance beside the
FP32 fallback's and the plain conversion's (:func:`fix_verdict`), and the rewrites in a user's
terms (:func:`rewrite_summary`); :func:`summary` is its few-line plain-text form (``__str__``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterator

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table

#: Table columns holding op, tensor or scope names: wrapped, never cut with an ellipsis.
_NAME = {"overflow": "fold"}


def plan_renderables(plan) -> Iterator[RenderableType]:
    """What :func:`print_plan` prints, one renderable at a time."""
    yield (f"plan for [bold]{escape(plan.source)}[/] ({plan.framework}), calibrated on {len(plan.calibration)} "
           f"input(s), headroom target amax <= 2^{plan.target_log2} = {2 ** plan.target_log2:g}")
    if plan.regions:
        t = Table(title="Scale regions (stored = true / 2^k; the factors fold into the weights)")
        for col in ("k", "values", "opened by", "closed by", "scope", "amax before", "amax after"):
            t.add_column(col, justify="right" if col.startswith(("k", "values", "amax")) else "left",
                         **(_NAME if col in ("opened by", "closed by", "scope") else {}))
        for r in plan.regions:
            t.add_row(str(r.exponent), str(len(r.tensors)), escape(", ".join(r.opened_by[:3])),
                      escape(", ".join(r.closed_by[:3])), escape(", ".join(r.scopes[:2])), f"{r.amax:.4g}",
                      f"{r.amax_after:.4g}")
        yield t
    else:
        yield "no scale region needed: every activation is within the target after folding"
    for r in plan.rescale_ops:
        yield f"  explicit rescale: {escape(r['tensor'])} x 2^{r['exponent']} ({escape(r['reason'])})"
    for u in plan.unfixable:
        yield (f"  [red]unfixable[/]: {escape(u['tensor'])}: {escape(u['reason'])}; kept in FP32: "
               f"{escape(', '.join(u['nodes']))}")
    for t in plan.tight:
        yield (f"  [yellow]tight[/]: {escape(t['tensor'])} amax {t['amax']:.4g} is above the target but within "
               f"65504; left unscaled (scaling it would add ops)")
    islands = {u["tensor"] for u in plan.unfixable}
    quiet = [u for u in plan.underflow if not u.consent and u.tensor not in islands]
    for u in plan.underflow:
        if u in quiet:
            continue
        state = (f"will be raised to {u.raise_to:.3g}" if u.consent else
                 "its readers run in FP32 (unfixable above; --raise-underflow raises it instead)")
        yield (f"  [yellow]underflow[/]: constant {escape(u.tensor)} (amax {u.amax:.3g}, read by "
               f"{escape(', '.join(u.readers[:3]))}) flushes to 0 in FP16; {state}")
    if quiet:
        yield (f"  underflow: {len(quiet)} constant(s) flush to 0 in FP16 ({escape(quiet[0].tensor)}, amax "
               f"{quiet[0].amax:.3g}, ...), but no value beside them came near them in calibration: "
               f"left as they are")


def print_plan(plan, console: Console) -> None:
    """A rewrite plan (:class:`fp16guard.plan.RewritePlan`): its scale regions, explicit rescales,
    unfixable values, tight values and flushed constants."""
    for renderable in plan_renderables(plan):
        console.print(renderable)


#: Rewrite notes that change what the fixed model takes or returns: printed in full.
INTERFACE_NOTES = ("float64_to_float32", "initializer_inputs")
#: Notes on how the graph was made (an ONNX export route other than the first): printed in full too.
EXPORT_NOTES = ("onnx_export",)


#: Variant labels of :func:`fp16guard.fixing.delivery.variant_label`, in words.
VARIANTS = {"fixed": "fixed model", "fixed_bf16": "fixed model (BF16 islands)", "fallback": "FP32 fallback",
            "fallback_bf16": "BF16 fallback", "naive": "plain FP16 conversion"}


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 BatchNorm``, ``2 BatchNorms``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def rewrite_summary(result) -> str:
    """The rewrites of a :class:`~fp16guard.fixing.FixResult` in a user's terms, e.g. ``2 BatchNorms
    folded into convs, 2 scale regions, 1 FP32 island`` (``none`` when nothing changed)."""
    kinds = Counter(n.kind for n in result.notes)
    fallback = result.verification.variant.startswith("fallback")
    parts = []
    if kinds["fold_batchnorm"]:
        parts.append(f"{_count(kinds['fold_batchnorm'], 'BatchNorm')} folded into convs")
    if kinds["batchnorm_to_affine"]:
        parts.append(f"{_count(kinds['batchnorm_to_affine'], 'BatchNorm')} as per-channel scale and shift")
    if kinds["fold_affine"]:
        parts.append(f"{_count(kinds['fold_affine'], 'per-channel Mul/Add', 'per-channel Mul/Adds')} folded "
                     f"into weights")
    if result.plan.regions and not fallback:
        parts.append(_count(len(result.plan.regions), "scale region"))
    if kinds["rescale_op"]:
        parts.append(f"{_count(kinds['rescale_op'], 'power-of-two rescale')} inserted")
    if kinds["raise_constant"]:
        parts.append(f"{_count(kinds['raise_constant'], 'tiny constant')} raised to 2^-14")
    if kinds["saturate_constant"]:
        parts.append(f"{_count(kinds['saturate_constant'], 'attention mask')} saturated to -2^15")
    if kinds["mask_guard"]:
        parts.append(f"{_count(kinds['mask_guard'], 'attention')} guarded for fully masked rows")
    if getattr(result, "delivered", "fixed") == "islands":
        kept = result.conversion.fp32_nodes or result.conversion.bf16_nodes
        parts.append(f"{_count(len(kept), 'op')} in {result.islands.upper()} islands to meet the bar")
    elif result.plan.unfixable and not fallback:
        parts.append(_count(len(result.plan.unfixable), f"{result.islands.upper()} island"))
    if fallback and (kept := result.conversion.fp32_nodes or result.conversion.bf16_nodes):
        parts.append(f"{_count(len(kept), 'op')} kept in {result.islands.upper()} (fallback)")
    return ", ".join(parts) or "none"


def _worst(v) -> float:
    """Worst relative L2 error of a verification over its inputs (inf when any is non-finite)."""
    return max((r.rel_l2 if not r.nonfinite else math.inf for r in v.rows), default=math.nan)


def _err(e: float) -> str:
    return "inf/NaN" if math.isinf(e) else f"{e:.3g}"


def fix_verdict(result) -> tuple[bool, str]:
    """``(accepted, plain text)``: whether the fixed model is finite and within tolerance, in one
    line with its worst error against the tolerance and the FP32 fallback's and plain conversion's."""
    v = result.verification
    label = VARIANTS.get(v.variant, v.variant)
    if not v.finite:
        bad = [r for r in v.rows if r.nonfinite]
        worst = max(bad, key=lambda r: r.nonfinite)
        return False, (f"{label} in FP16: still produces inf/NaN on {len(bad)} of {len(v.rows)} input(s) "
                       f"({worst.nonfinite} values on {worst.label})")
    worst = max(v.rows, key=lambda r: r.rel_l2)
    tolerance = getattr(result, "tolerance", None)
    accepted = True  # finite: the fix wrote the best model it found (delivery_lines say which, and why)
    if tolerance is not None and any(u.consent for u in result.plan.underflow):  # the fix does not apply it then
        against = f" (tolerance {tolerance:g} not applied: tiny constants raised by consent)"
    else:
        above = tolerance is not None and worst.rel_l2 > tolerance
        against = "" if tolerance is None else f" against tolerance {tolerance:g}{' (above it: the floor)' if above else ''}"
    others = [f"{VARIANTS[o.variant]} {_err(_worst(o))}" for o in (result.fallback, result.naive)
              if o is not None and o is not v]
    return accepted, (f"{label} runs in FP16: finite on {len(v.rows)} input(s), worst rel. L2 error "
                      f"{worst.rel_l2:.3g}{against} (on {worst.label})" + (f"; {', '.join(others)}" if others else ""))


def delivery_lines(result) -> list[str]:
    """Why the written model is not the pure fix, and the model's floor, in plain lines (empty
    when the pure fix was written within the tolerance)."""
    lines = []
    delivered = getattr(result, "delivered", "fixed")
    search = getattr(result, "island_search", None)
    fallback_count = len(result.plan.fallback_fp32)
    if delivered != "fixed" and result.refusal:
        lines.append(f"pure FP16 missed the bar: {result.refusal}")
    if delivered == "islands":
        kept = result.conversion.fp32_nodes or result.conversion.bf16_nodes
        runs = len(search.trials) if search is not None else 0
        lines.append(f"written: the fixed model with {_count(len(kept), 'node')} in {result.islands.upper()} "
                     f"({', '.join(kept[:6])}{' ...' if len(kept) > 6 else ''}), the fewest of "
                     f"{len(search.candidates) if search else 0} candidates that meet the bar ({_count(runs, 'run')}); "
                     f"the FP32 fallback keeps {fallback_count}")
    elif delivered == "fallback":
        lines.append(f"written: the {result.islands.upper()} fallback ({_count(fallback_count, 'node')} in "
                     f"{result.islands.upper()}): no island set on the scaled model met the bar")
    if getattr(result, "floor", None):
        lines.append(result.floor)
    return lines


def _next_step(result) -> str:
    """What to do with the fixed model (Python API terms)."""
    if not result.verification.finite:
        return "see the plan's unfixable entries (result.plan.unfixable), or fix(..., fallback='fp32')"
    if type(result.fixed).__name__ == "ModelProto":
        return 'onnx.save(result.fixed, "fixed.onnx"), then trtexec --onnx=fixed.onnx --stronglyTyped'
    return 'fp16guard.fixing.torch_pass.save_program(result.fixed, [example_args], "fixed.pt2")'


def summary(result) -> str:
    """A few plain lines of a fix result: the verdict with its errors, the rewrites, the next step."""
    _, verdict = fix_verdict(result)
    conv = result.conversion
    return "\n".join([f"fix {result.plan.source}: {verdict}", *submodule_lines(result),
                      *(n.detail for n in result.notes if n.kind in EXPORT_NOTES), *delivery_lines(result),
                      f"rewrites: {rewrite_summary(result)}; {_count(len(conv.fp32_nodes), 'op')} left in FP32, "
                      f"{_count(conv.casts, 'Cast')}",
                      f"next: {_next_step(result)}"])


def submodule_lines(result) -> list[str]:
    """When one submodule was fixed (``result.submodule``): what, what stays FP32, how to reproduce
    an automatic choice, the end-to-end errors; else nothing."""
    sub = getattr(result, "submodule", None)
    return sub.lines() if sub is not None else []


def fix_renderables(result) -> Iterator[RenderableType]:
    """What :func:`print_fix` prints, one renderable at a time."""
    yield from plan_renderables(result.plan)
    yield f"rewrites: {escape(rewrite_summary(result))}"
    for note in result.notes:
        if note.kind in INTERFACE_NOTES + EXPORT_NOTES:  # the fixed model's inputs/outputs differ, or its export route
            yield f"  [yellow]note[/]: {escape(note.detail)}"
    bf16 = f"{len(result.conversion.bf16_nodes)} in BF16, " if result.conversion.bf16_nodes else ""
    yield (f"FP16 conversion: {len(result.conversion.fp32_nodes)} node(s) left in FP32, {bf16}"
           f"{result.conversion.casts} Cast(s)")
    for node, reason in result.conversion.bf16_refused.items():
        yield f"  [yellow]not BF16[/]: {escape(node)} stays FP32: {escape(reason)}"
    yield verification_table([result.verification, result.other_islands, result.naive,
                              result.fallback, result.fallback_bf16])
    for line in delivery_lines(result):
        yield f"[yellow]{escape(line)}[/]"
    for line in submodule_lines(result):
        yield f"[yellow]{escape(line)}[/]"
    accepted, verdict = fix_verdict(result)
    head, _, rest = verdict.partition(": ")
    yield f"[{'green' if accepted else 'bold red'}]{escape(head)}[/]: {escape(rest)}"


def print_fix(result, console: Console) -> None:
    """A :class:`fp16guard.fixing.FixResult`: the plan, the rewrites in a user's terms, the
    verification of the fixed model beside the plain FP16 conversion and the fallbacks, per input,
    and the verdict (worst error against the tolerance, and the FP32 fallback's)."""
    for renderable in fix_renderables(result):
        console.print(renderable)


def verification_table(verifications) -> Table:
    """One table of :class:`fp16guard.compare.Verification` rows (variant, input, split, errors,
    inf/NaN count, task metrics) against FP32; ``None`` entries are skipped."""
    verifications = [v for v in verifications if v is not None]
    t = Table(title=f"Verification on {verifications[0].backend.split(':')[0]} against FP32")
    metrics = sorted({k for v in verifications for r in v.rows for k in r.task})
    for col in ("model", "input", "split", "rel. L2", "max |err|", "inf/NaN", *metrics):
        t.add_column(col, justify="left" if col in ("model", "input", "split") else "right",
                     **(_NAME if col == "input" else {}))
    for v in verifications:
        for r in v.rows:
            t.add_row(v.variant, escape(r.label), r.split, f"{r.rel_l2:.3g}", f"{r.max_abs:.3g}", str(r.nonfinite),
                      *(f"{r.task[m]:.4f}" if m in r.task else "" for m in metrics))
    return t


def print_verification(verifications, console: Console) -> None:
    """Print :func:`verification_table` of ``verifications``."""
    console.print(verification_table(verifications))
