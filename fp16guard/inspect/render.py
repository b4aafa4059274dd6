"""Terminal rendering of an :class:`~fp16guard.inspect.report.InspectionReport` with rich.

:func:`print_report` prints the full report (:func:`report_renderables`; :func:`rich_console` is
the report's ``__rich_console__``); :func:`summary` is its few-line plain-text form (the report's
``__str__``); :func:`verdict` names what breaks FP16 by cause class (input, activation, weight) and
the next step. The report's two hooks are attached by the package (``fp16guard/inspect/__init__.py``),
so the report itself imports no renderer.
"""

from __future__ import annotations

import math
from typing import Iterator

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

from fp16guard.fp16 import FP16_MAX
from fp16guard.inspect.report import InspectionReport
from fp16guard.stats import RangeStats

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
#: Columns holding layer or tensor names: wrapped, never cut to ``model.encode…``.
_NAME = {"overflow": "fold"}


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


def _count(n: int, noun: str) -> str:
    """``1 weight``, ``2 weights``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(names: list[str], shown: int = 2) -> str:
    """``a, b`` or ``a, b, +3 more``."""
    more = f", +{len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def fix_command(model: str | None) -> str:
    """The fix to run next: the command line when ``model`` says how it named the model
    (``--example ppocr-det``, ``m.onnx --input x.npy``), else the Python call."""
    return f"fp16guard fix {model} -o fixed.onnx" if model else "fixed, plan = fp16guard.fix(model, inputs)"


def causes(report: InspectionReport) -> list[str]:
    """What breaks FP16, one phrase per cause class, input first, then activations, then weights
    (``1 weight beyond 65504 (batch_norm_0.w_2)``); empty when nothing does."""
    findings = report.findings()

    def named(*rules: str) -> list[str]:
        """Names of the findings of ``rules``, each once, in report order."""
        return list(dict.fromkeys(f.name for f in findings if f.rule in rules))

    out = []
    if names := named("input_nonfinite"):
        out.append(f"the input holds inf/NaN (read by {_names(names)})")
    if names := named("input_overflow"):
        out.append(f"the input exceeds 65504 (read by {_names(names)})")
    if names := named("overflow_from"):
        out.append(f"{_count(len(names), 'activation')} beyond 65504 (from {_names(names)})")
    if names := named("nonfinite_origin"):
        out.append(f"inf/NaN born in {_count(len(names), 'layer')} ({_names(names)})")
    for rule, what in (("overflow", "beyond 65504"), ("nonfinite", "already inf/NaN"),
                       ("bn_fold", "whose folded scale or shift exceeds 65504")):
        tensors = list(dict.fromkeys(s.tensor for s in report.static if s.severity == "error" and s.rule == rule))
        if tensors:
            noun = "BatchNorm" if rule == "bn_fold" else "weight"
            out.append(f"{_count(len(tensors), noun)} {what} ({_names(tensors)})")
    return out


def verdict(report: InspectionReport, model: str | None = None) -> tuple[str, str | None]:
    """``(verdict, next step or None)`` in plain text; ``model`` as in :func:`fix_command`."""
    findings = report.findings()
    if any(f.rule == "input_nonfinite" for f in findings):
        return "the input holds inf/NaN: FP16 cannot be judged on it (clean the input)", None
    if report.overflow_found:
        return f"FP16 overflow found: {'; '.join(causes(report))}", fix_command(model)
    masks = [f.name for f in findings if f.rule == "attention_mask"]
    mask = (f" (the attention mask at finfo(float32).min read by {masks[0]} is not an overflow; fix rewrites it "
            f"to -2^15)") if masks else ""
    return f"no FP16 overflow found{mask}", None


def _peak(report: InspectionReport) -> str | None:
    peak = report.peak
    if peak is None:
        return None
    return (f"peak activation {peak.outputs.amax:.4g} = {peak.outputs.amax / FP16_MAX:.2f}x the FP16 limit at "
            f"{peak.display_name} ({peak.kind})")


def summary(report: InspectionReport, model: str | None = None) -> str:
    """A few plain lines: what ran, the verdict by cause, the peak, the largest layers, the next step."""
    inputs = f", {_count(len(report.inputs), 'input')}" if report.inputs else ""
    layers = _count(len(report.layers(leaves_only=True)), "layer")
    lines = [f"fp16guard inspect: {report.source}{inputs}, {layers}"]
    text, next_step = verdict(report, model)
    lines.append(text)
    if (peak := _peak(report)) is not None:
        lines.append(peak)
        top = report.worst(4)[1:]
        if top:
            lines.append("next largest outputs: " + ", ".join(f"{s.display_name} {s.outputs.amax:.4g}" for s in top))
    if next_step:
        lines.append(f"next: {next_step}")
    return "\n".join(lines)


def report_renderables(report: InspectionReport, *, top: int = 10, model: str | None = None
                       ) -> Iterator[RenderableType]:
    """What :func:`print_report` prints, one renderable at a time (arguments as there)."""
    layers = report.layers(leaves_only=True)
    yield Rule(f"[bold]fp16guard inspect[/]: {escape(report.source)}")
    if report.inputs:
        yield f"inputs: {escape(', '.join(report.inputs))}"
    if report.mode:
        yield f"ran: {report.mode}"
    peak = report.peak
    if peak is not None:
        yield (f"{len(layers)} layers, {len(report.calls)} calls; peak activation "
               f"{peak.outputs.amax:.4g} = {peak.outputs.amax / FP16_MAX:.2f}x the FP16 limit at "
               f"[bold]{escape(peak.display_name)}[/] ({peak.kind})")

    t = Table(title=f"Worst offenders (top {top} by output amax)", title_justify="left")
    for col in ("#", "layer", "type", "scope", "input amax", "output amax", "x limit", "headroom (bits)",
                "flush-to-zero"):
        t.add_column(col, justify="right" if col not in ("layer", "type", "scope") else "left",
                     **(_NAME if col in ("layer", "scope") else {}))
    for s in report.worst(top):
        t.add_row(str(s.first_index), escape(s.display_name), s.kind, escape(s.scope) if s.scope != s.name else "",
                  _amax(s.inputs), _amax(s.outputs), f"{s.outputs.amax / FP16_MAX:.3f}",
                  _headroom(s.outputs), f"{s.outputs.flush_to_zero_fraction:.1%}")
    yield t

    for level in ("calls", "ops"):
        trans = report.transitions(level=level)
        if level == "ops" and not report.ops:
            continue
        if trans:
            t = Table(title=f"Transitions ({'op' if level == 'ops' else 'layer'} level): from = overflow "
                            "starts, to = absorbed", title_justify="left")
            for col in ("#", "flag", "layer", "type", "input amax", "output amax"):
                t.add_column(col, **(_NAME if col == "layer" else {}))
            for r in trans[:30]:
                t.add_row(str(r.index), f"[bold red]{r.transition}[/]" if r.transition == "from" else r.transition,
                          escape(r.display_name), r.kind, _amax(r.inputs), _amax(r.outputs))
            yield t
        first = report.first_nonfinite(level=level)
        if first is not None:
            yield (f"[bold red]first inf/NaN from finite inputs ({level}):[/] {escape(first.display_name)} "
                   f"({first.kind}), call {first.call}")
    for f in report.findings():  # the model's input itself (or a mask): said plainly, before any verdict on layers
        if f.rule in ("input_overflow", "input_nonfinite", "attention_mask"):
            yield f"[{_STYLE[f.severity]}]{f.rule}[/] at {escape(f.name)} ({f.kind}): {escape(f.reason)}"
    if not report.transitions():
        yield "[green]no activation crosses 65504[/]"

    warnings = [f for f in report.findings() if f.rule in ("near_limit", "underflow")]
    if warnings:
        t = Table(title="Warnings", title_justify="left")
        for col in ("rule", "layer", "type", "reason"):
            t.add_column(col, **(_NAME if col == "layer" else {}))
        for f in warnings[:top]:
            t.add_row(f"[yellow]{f.rule}[/]", escape(f.name), f.kind, escape(f.reason))
        yield t

    if report.static:
        t = Table(title="Static findings (weights, buffers, constants)", title_justify="left")
        for col in ("severity", "tensor", "rule", "count", "used by", "reason"):
            t.add_column(col, **(_NAME if col in ("tensor", "used by") else {}))
        for s in report.static:
            t.add_row(f"[{_STYLE[s.severity]}]{s.severity}[/]", escape(s.tensor), s.rule, str(s.count),
                      escape(s.layer), escape(s.reason))
        yield t
    text, next_step = verdict(report, model)
    style = "bold red" if report.overflow_found else "green"
    head, _, rest = text.partition(": ") if report.overflow_found else (text, "", "")
    yield (f"[{style}]{escape(head)}[/]" + (f": {escape(rest)}" if rest else "")
           + (f"; next: [bold]{escape(next_step)}[/]" if next_step else ""))


def rich_console(report: InspectionReport, console, options) -> Iterator[RenderableType]:
    """The rich protocol's ``__rich_console__``: the full report (``rich.print(report)``, a notebook),
    as :func:`print_report` prints it."""
    yield from report_renderables(report)


def print_report(report: InspectionReport, console: Console | None = None, *, top: int = 10,
                 model: str | None = None) -> None:
    """Print the worst layers, the from/to transitions, the first inf/NaN, the static findings,
    and the verdict by cause with the next step.

    Args:
        report: what to print.
        console: where (default: a new stdout console).
        top: how many layers the worst-offenders table lists.
        model: how the command line named the model and its inputs (``--example ppocr-det``), for
            the next command; None: the next step is the Python call.
    """
    console = console or Console()
    for renderable in report_renderables(report, top=top, model=model):
        console.print(renderable)
