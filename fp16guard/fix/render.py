"""Terminal rendering of a rewrite plan, a fix result and verification tables with rich."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table


def print_plan(plan, console: Console) -> None:
    """A rewrite plan (:class:`fp16guard.plan.RewritePlan`): its scale regions, explicit rescales,
    unfixable values, tight values and flushed constants."""
    console.print(f"plan for [bold]{plan.source}[/] ({plan.framework}), calibrated on {len(plan.calibration)} "
                  f"input(s), headroom target amax <= 2^{plan.target_log2} = {2 ** plan.target_log2:g}")
    if plan.regions:
        t = Table(title="Scale regions (stored = true / 2^k; the factors fold into the weights)")
        for col in ("k", "values", "opened by", "closed by", "scope", "amax before", "amax after"):
            t.add_column(col, justify="right" if col.startswith(("k", "values", "amax")) else "left")
        for r in plan.regions:
            t.add_row(str(r.exponent), str(len(r.tensors)), ", ".join(r.opened_by[:3]), ", ".join(r.closed_by[:3]),
                      ", ".join(r.scopes[:2]), f"{r.amax:.4g}", f"{r.amax_after:.4g}")
        console.print(t)
    else:
        console.print("no scale region needed: every activation is within the target after folding")
    for r in plan.rescale_ops:
        console.print(f"  explicit rescale: {r['tensor']} x 2^{r['exponent']} ({r['reason']})")
    for u in plan.unfixable:
        console.print(f"  [red]unfixable[/]: {u['tensor']}: {u['reason']}; kept in FP32: {', '.join(u['nodes'])}")
    for t in plan.tight:
        console.print(f"  [yellow]tight[/]: {t['tensor']} amax {t['amax']:.4g} is above the target but within "
                      f"65504; left unscaled (scaling it would add ops)")
    islands = {u["tensor"] for u in plan.unfixable}
    quiet = [u for u in plan.underflow if not u.consent and u.tensor not in islands]
    for u in plan.underflow:
        if u in quiet:
            continue
        state = (f"will be raised to {u.raise_to:.3g}" if u.consent else
                 "its readers run in FP32 (unfixable above; --raise-underflow raises it instead)")
        console.print(f"  [yellow]underflow[/]: constant {u.tensor} (amax {u.amax:.3g}, read by "
                      f"{', '.join(u.readers[:3])}) flushes to 0 in FP16; {state}")
    if quiet:
        console.print(f"  underflow: {len(quiet)} constant(s) flush to 0 in FP16 ({quiet[0].tensor}, amax "
                      f"{quiet[0].amax:.3g}, ...), but no value beside them came near them in calibration: "
                      f"left as they are")


def print_fix(result, console: Console) -> None:
    """A :class:`fp16guard.fix.FixResult`: the plan, the rewrites by kind, and the verification
    of the fixed model beside the plain FP16 conversion, per input."""
    print_plan(result.plan, console)
    kinds = Counter(n.kind for n in result.notes)
    console.print("rewrites: " + ", ".join(f"{k} x{v}" for k, v in kinds.items()) if kinds else "rewrites: none")
    bf16 = f"{len(result.conversion.bf16_nodes)} in BF16, " if result.conversion.bf16_nodes else ""
    console.print(f"FP16 conversion: {len(result.conversion.fp32_nodes)} node(s) left in FP32, {bf16}"
                  f"{result.conversion.casts} Cast(s)")
    for node, reason in result.conversion.bf16_refused.items():
        console.print(f"  [yellow]not BF16[/]: {node} stays FP32: {reason}")
    print_verification([result.verification, result.other_islands, result.naive,
                        result.fallback, result.fallback_bf16], console)
    verdict = "[green]finite[/]" if result.verification.finite else "[red]still produces inf/NaN[/]"
    console.print(f"fixed model in FP16: {verdict}")


def print_verification(verifications, console: Console) -> None:
    """One table of :class:`fp16guard.compare.Verification` rows (variant, input, split, errors,
    inf/NaN count, task metrics) against FP32; ``None`` entries are skipped."""
    verifications = [v for v in verifications if v is not None]
    t = Table(title=f"Verification on {verifications[0].backend.split(':')[0]} against FP32")
    metrics = sorted({k for v in verifications for r in v.rows for k in r.task})
    for col in ("model", "input", "split", "rel. L2", "max |err|", "inf/NaN", *metrics):
        t.add_column(col, justify="left" if col in ("model", "input", "split") else "right")
    for v in verifications:
        for r in v.rows:
            t.add_row(v.variant, r.label, r.split, f"{r.rel_l2:.3g}", f"{r.max_abs:.3g}", str(r.nonfinite),
                      *(f"{r.task[m]:.4f}" if m in r.task else "" for m in metrics))
    console.print(t)
