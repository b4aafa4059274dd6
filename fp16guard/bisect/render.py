"""Terminal rendering of a :class:`~fp16guard.bisect.BisectResult` with rich."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from fp16guard.bisect.search import NOISE_CAP, NOISE_FACTOR


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


def print_bisect(result, console: Console | None = None) -> None:
    """Print a :class:`~fp16guard.bisect.BisectResult`: the verdict, then every tried cut.

    Args:
        result: what :func:`fp16guard.bisect` returned.
        console: where (default: a new stdout console).
    """
    console = console or Console()
    console.print(f"backend: {result.backend}")
    console.print(f"metric: {result.metric}, bad when > {result.tolerance:g} or non-finite "
                  f"({_source(result)}); {len(result.candidates)} candidate cuts")
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
