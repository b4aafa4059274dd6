"""Terminal rendering of an :class:`~fp16guard.report.InspectionReport` with rich."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from .fp16 import FP16_MAX
from .report import InspectionReport
from .stats import RangeStats

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _amax(s: RangeStats) -> str:
    text = f"{s.amax:.4g}"
    if s.nonfinite:
        text += f" +{s.nonfinite} inf/NaN"
    return f"[bold red]{text}[/]" if s.out_of_range else text


def _headroom(s: RangeStats) -> str:
    h = s.headroom
    if math.isinf(h):
        return "-" if h > 0 else "[bold red]-inf[/]"
    return f"[bold red]{h:.2f}[/]" if h < 0 else (f"[yellow]{h:.2f}[/]" if h < 2 else f"{h:.2f}")


def print_report(report: InspectionReport, console: Console | None = None, *, top: int = 10) -> None:
    """Print the worst layers, the from/to transitions, the first inf/NaN and the static findings.

    Args:
        report: what to print.
        console: where (default: a new stdout console).
        top: how many layers the worst-offenders table lists.
    """
    console = console or Console()
    layers = report.layers(leaves_only=True)
    console.rule(f"[bold]fp16guard inspect[/]: {report.source}")
    if report.inputs:
        console.print(f"inputs: {', '.join(report.inputs)}")
    peak = report.peak
    if peak is not None:
        console.print(f"{len(layers)} layers, {len(report.calls)} calls; peak activation "
                      f"{peak.outputs.amax:.4g} = {peak.outputs.amax / FP16_MAX:.2f}x the FP16 limit at "
                      f"[bold]{peak.display_name}[/] ({peak.kind})")

    t = Table(title=f"Worst offenders (top {top} by output amax)", title_justify="left")
    for col in ("#", "layer", "type", "scope", "input amax", "output amax", "x limit", "headroom (bits)",
                "flush-to-zero"):
        t.add_column(col, justify="right" if col not in ("layer", "type", "scope") else "left")
    for s in report.worst(top):
        t.add_row(str(s.first_index), s.display_name, s.kind, s.scope if s.scope != s.name else "",
                  _amax(s.inputs), _amax(s.outputs), f"{s.outputs.amax / FP16_MAX:.3f}",
                  _headroom(s.outputs), f"{s.outputs.flush_to_zero_fraction:.1%}")
    console.print(t)

    for level in ("calls", "ops"):
        trans = report.transitions(level=level)
        if level == "ops" and not report.ops:
            continue
        if trans:
            t = Table(title=f"Transitions ({'op' if level == 'ops' else 'layer'} level): from = overflow "
                            "starts, to = absorbed", title_justify="left")
            for col in ("#", "flag", "layer", "type", "input amax", "output amax"):
                t.add_column(col)
            for r in trans[:30]:
                t.add_row(str(r.index), f"[bold red]{r.transition}[/]" if r.transition == "from" else r.transition,
                          r.display_name, r.kind, _amax(r.inputs), _amax(r.outputs))
            console.print(t)
        first = report.first_nonfinite(level=level)
        if first is not None:
            console.print(f"[bold red]first inf/NaN from finite inputs ({level}):[/] {first.display_name} "
                          f"({first.kind}), call {first.call}")
    if not report.transitions():
        console.print("[green]no activation crosses 65504[/]")

    warnings = [f for f in report.findings() if f.rule in ("near_limit", "underflow")]
    if warnings:
        t = Table(title="Warnings", title_justify="left")
        for col in ("rule", "layer", "type", "reason"):
            t.add_column(col)
        for f in warnings[:top]:
            t.add_row(f"[yellow]{f.rule}[/]", f.name, f.kind, f.reason)
        console.print(t)

    if report.static:
        t = Table(title="Static findings (weights, buffers, constants)", title_justify="left")
        for col in ("severity", "tensor", "rule", "count", "used by", "reason"):
            t.add_column(col)
        for s in report.static:
            t.add_row(f"[{_STYLE[s.severity]}]{s.severity}[/]", s.tensor, s.rule, str(s.count), s.layer, s.reason)
        console.print(t)
    verdict = "[bold red]FP16 overflow found[/]" if report.overflow_found else "[green]no FP16 overflow found[/]"
    console.print(verdict)


def _err(e: float, tolerance: float) -> str:
    text = "inf" if math.isinf(e) else f"{e:.3g}"
    return f"[bold red]{text}[/]" if not e <= tolerance else text


def print_bisect(result, console: Console | None = None) -> None:
    """Print a :class:`~fp16guard.bisect.BisectResult`: the verdict, then every tried cut.

    Args:
        result: what :func:`fp16guard.bisect` returned.
        console: where (default: a new stdout console).
    """
    console = console or Console()
    console.print(f"backend: {result.backend}")
    console.print(f"metric: {result.metric}, bad when > {result.tolerance:g} or non-finite; "
                  f"{len(result.candidates)} candidate cuts")
    table = Table(title="tried cuts (FP16 prefix up to and including 'last')", title_justify="left")
    for col, kw in (("round", {"justify": "right"}), ("stage", {}), ("cut", {"justify": "right"}),
                    ("last in FP16", {}), ("error", {"justify": "right"}), ("verdict", {}),
                    ("s", {"justify": "right"})):
        table.add_column(col, **kw)
    for t in result.trials:
        table.add_row(str(t.round), t.stage, str(t.cut), t.last, _err(t.error, result.tolerance),
                      "[bold red]bad[/]" if t.bad else "good", f"{t.seconds:.1f}")
    console.print(table)
    if result.unfit:
        over = [u for u in result.unfit if u.overflow]
        flushed = [u for u in result.unfit if u.flushed and not u.overflow]
        for u in over:
            console.print(f"[bold red]does not fit FP16[/]: {u.name}: {u.overflow}/{u.numel} values > 65504 "
                          f"(amax {u.amax:.4g}) become inf")
        if flushed:
            n = sum(u.flushed for u in flushed)
            console.print(f"[yellow]flushed to zero in FP16[/]: {n} tiny weight values in {len(flushed)} tensors "
                          f"(e.g. {flushed[0].name})")
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}")
    console.print(f"{result.builds} engine builds (bound per round: ceil(log2 N) + 2 = {result.build_bound}), "
                  f"{result.runs} prefix runs, {result.seconds:.1f} s; search "
                  f"{'monotonic' if result.monotonic else '[bold red]NOT monotonic[/]'}")
    if not result.offenders:
        console.print("[bold green]verdict: the whole model runs in FP16 within tolerance; nothing to blame[/]")
        return
    for o in result.offenders:
        where = f" -> op {o.op}" if o.op else ""
        nodes = f"; ONNX nodes: {', '.join(o.onnx_nodes[:4])}" if o.onnx_nodes else ""
        amax = f"; amax at the cut {o.amax:.4g}" if o.amax is not None else ""
        console.print(f"[bold red]offender {o.round + 1}[/]: [bold]{o.name}[/] ({o.kind}){where}; "
                      f"first bad cut {o.cut}, error {_err(o.error, result.tolerance)}{amax}{nodes}")


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
    for u in plan.underflow:
        state = "will be raised" if u.consent else "not raised (pass --raise-underflow or set consent)"
        console.print(f"  [yellow]underflow[/]: constant {u.tensor} (amax {u.amax:.3g}, read by "
                      f"{', '.join(u.readers[:3])}) flushes to 0 in FP16; {state} to {u.raise_to:.3g}")


def print_fix(result, console: Console) -> None:
    """A :class:`fp16guard.fixing.FixResult`: the plan, the rewrites by kind, and the verification
    of the fixed model beside the plain FP16 conversion, per input."""
    from collections import Counter

    print_plan(result.plan, console)
    kinds = Counter(n.kind for n in result.notes)
    console.print("rewrites: " + ", ".join(f"{k} x{v}" for k, v in kinds.items()) if kinds else "rewrites: none")
    console.print(f"FP16 conversion: {len(result.conversion.fp32_nodes)} node(s) left in FP32, "
                  f"{result.conversion.casts} Cast(s)")
    print_verification([result.verification, result.naive], console)
    verdict = "[green]finite[/]" if result.verification.finite else "[red]still produces inf/NaN[/]"
    console.print(f"fixed model in FP16: {verdict}")


def print_verification(verifications, console: Console) -> None:
    """One table of :class:`fp16guard.fixing.Verification` rows (variant, input, split, errors,
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
