"""Terminal rendering of an :class:`~fp16guard.inspect.report.InspectionReport` with rich."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from fp16guard.fp16 import FP16_MAX
from fp16guard.inspect.report import InspectionReport
from fp16guard.stats import RangeStats

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
    if report.mode:
        console.print(f"ran: {report.mode}")
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
    for f in report.findings():  # the model's input itself: said plainly, before any verdict on layers
        if f.rule in ("input_overflow", "input_nonfinite"):
            console.print(f"[bold red]{f.rule}[/] at {f.name} ({f.kind}): {f.reason}")
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
    if any(f.rule == "input_nonfinite" for f in report.findings()):
        verdict = "[bold red]the input holds inf/NaN[/]: FP16 cannot be judged on it (clean the input)"
    console.print(verdict)
