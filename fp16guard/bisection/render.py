"""Terminal rendering of a :class:`~fp16guard.bisection.BisectResult` with rich.

:func:`print_bisect` prints the full result (:func:`bisect_renderables`, also the result's
``__rich_console__``); :func:`summary` is its few-line plain-text form (the result's ``__str__``).
"""

from __future__ import annotations

import math
from typing import Iterator

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table

from fp16guard.bisection.search import NOISE_CAP, NOISE_FACTOR


def _err(e: float, tolerance: float) -> str:
    text = "inf" if math.isinf(e) else f"{e:.3g}"
    return f"[bold red]{text}[/]" if not e <= tolerance else text


def _source(result) -> str:
    """Where the tolerance came from, in words."""
    if result.tolerance_source == "explicit":
        return "tolerance given"
    if result.noise is None:
        return "default tolerance: no prefix stays in FP16 range to measure rounding noise on"
    measured = (f"FP16 rounding noise {_err(result.noise, math.inf)} measured at cut {result.noise_cut}, "
                f"the longest prefix whose FP32 values fit FP16")
    rule = {"floor": "the default floor", "noise": f"{NOISE_FACTOR:g} x noise", "cap": f"capped at {NOISE_CAP:g}"}
    return f"{measured}; tolerance = {rule[result.tolerance_source]}"


def _fix_command(model: str | None) -> str:
    """The fix to run next (see :func:`fp16guard.inspect.render.fix_command`)."""
    return f"fp16guard fix {model} -o fixed.onnx" if model else "fixed, plan = fp16guard.fix(model, inputs)"


def _offender(o) -> str:
    """``conv2_BN (BatchNorm2d) -> op batch_norm_1 (...)``, plain text."""
    where = f" -> op {o.op}" if o.op else ""
    return f"{o.name} ({o.kind}){where}"


def summary(result) -> str:
    """A few plain lines: the verdict with the offender(s), the search's cost, the next step."""
    backend = result.backend.split(":")[0]
    trials = len(result.trials)
    if result.offenders:
        first = result.offenders[0]
        err = "inf" if math.isinf(first.error) else f"{first.error:.3g}"
        more = f" (+{len(result.offenders) - 1} more: {', '.join(o.name for o in result.offenders[1:4])})" \
            if len(result.offenders) > 1 else ""
        head = (f"bisect {result.source} on {backend}: FP16 breaks the output at {_offender(first)}; first "
                f"bad cut {first.cut} of {len(result.candidates)}, error {err} > tolerance {result.tolerance:g}{more}")
    else:
        head = (f"bisect {result.source} on {backend}: the whole model runs in FP16 within tolerance "
                f"{result.tolerance:g}; nothing to blame")
    lines = [head, f"{trials} cuts tried (bound per round {result.build_bound}), {result.builds} builds, "
                   f"{result.seconds:.1f} s; search {'monotonic' if result.monotonic else 'NOT monotonic'}"]
    if result.offenders:
        lines.append(f"next: {_fix_command(None)}")
    return "\n".join(lines)


def bisect_renderables(result, *, model: str | None = None) -> Iterator[RenderableType]:
    """What :func:`print_bisect` prints, one renderable at a time (arguments as there)."""
    yield f"backend: {result.backend}"
    yield (f"metric: {result.metric}, bad when > {result.tolerance:g} or non-finite "
           f"({_source(result)}); {len(result.candidates)} candidate cuts")
    table = Table(title="tried cuts (FP16 prefix up to and including 'last')", title_justify="left")
    for col, kw in (("round", {"justify": "right"}), ("stage", {}), ("cut", {"justify": "right"}),
                    ("last in FP16", {"overflow": "fold"}), ("error", {"justify": "right"}), ("verdict", {}),
                    ("s", {"justify": "right"})):
        table.add_column(col, **kw)
    for t in result.trials:
        table.add_row(str(t.round), t.stage, str(t.cut), escape(t.last), _err(t.error, result.tolerance),
                      "[bold red]bad[/]" if t.bad else "good", f"{t.seconds:.1f}")
    yield table
    if result.unfit:
        over = [u for u in result.unfit if u.overflow]
        flushed = [u for u in result.unfit if u.flushed and not u.overflow]
        for u in over:
            yield (f"[bold red]does not fit FP16[/]: {escape(u.name)}: {u.overflow}/{u.numel} values > 65504 "
                   f"(amax {u.amax:.4g}) become inf")
        if flushed:
            n = sum(u.flushed for u in flushed)
            yield (f"[yellow]flushed to zero in FP16[/]: {n} tiny weight values in {len(flushed)} tensors "
                   f"(e.g. {escape(flushed[0].name)})")
    for note in result.notes:
        yield f"[yellow]note[/]: {escape(note)}"
    yield (f"{result.builds} engine builds (bound per round: ceil(log2 N) + 2 = {result.build_bound}), "
           f"{result.runs} prefix runs, {result.seconds:.1f} s; search "
           f"{'monotonic' if result.monotonic else '[bold red]NOT monotonic[/]'}")
    if not result.offenders:
        yield "[bold green]verdict: the whole model runs in FP16 within tolerance; nothing to blame[/]"
        return
    for o in result.offenders:
        nodes = f"; ONNX nodes: {', '.join(o.onnx_nodes[:4])}" if o.onnx_nodes else ""
        amax = f"; amax at the cut {o.amax:.4g}" if o.amax is not None else ""
        where = f" -> op {escape(o.op)}" if o.op else ""
        yield (f"[bold red]offender {o.round + 1}[/]: [bold]{escape(o.name)}[/] ({o.kind}){where}; first bad cut "
               f"{o.cut}, error {_err(o.error, result.tolerance)}{amax}{escape(nodes)}")
    yield f"next: [bold]{escape(_fix_command(model))}[/] (folds BatchNorms and scales the overflowing values)"


def print_bisect(result, console: Console | None = None, *, model: str | None = None) -> None:
    """Print a :class:`~fp16guard.bisection.BisectResult`: every tried cut, then the verdict with the
    offender(s) and the next step.

    Args:
        result: what :func:`fp16guard.bisect` returned.
        console: where (default: a new stdout console).
        model: how the command line named the model and its inputs (``--example crepe-full``), for
            the next command; None: the next step is the Python call.
    """
    console = console or Console()
    for renderable in bisect_renderables(result, model=model):
        console.print(renderable)


def short_repr(result) -> str:
    """``BisectResult(source=..., offenders=[...], trials=N, tolerance=T)``: one line."""
    return (f"BisectResult(source={result.source!r}, offenders={[o.name for o in result.offenders]!r}, "
            f"trials={len(result.trials)}, tolerance={result.tolerance:g})")


def rich_console(result, console, options):
    """The rich protocol's ``__rich_console__``: the full result, as :func:`print_bisect` prints it."""
    yield from bisect_renderables(result)
