"""Per-layer activation amax in execution order, on a log scale, with FP16's limits (matplotlib).

Figures are drawn on a ``matplotlib.figure.Figure`` and saved directly, without ``pyplot``: the
caller's matplotlib backend (a notebook's inline one) is never switched.
"""

from __future__ import annotations

from pathlib import Path

from fp16guard.fp16 import FP16_MAX, FP16_MIN_SUBNORMAL
from fp16guard.inspect.report import InspectionReport

#: Where a layer whose outputs are all zero is drawn (a log axis cannot show 0).
FLOOR = 2.0**-30


def plot_report(report: InspectionReport, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of every leaf layer's output amax, in order of first call.

    Draws the 65504 overflow line and the 2**-24 flush-to-zero line; layers whose outputs hold
    inf/NaN are marked with a red cross at the top. Returns ``path``.
    """
    from matplotlib.figure import Figure

    layers = report.layers(leaves_only=True)
    xs = list(range(len(layers)))
    amax = [max(s.outputs.amax, FLOOR) for s in layers]
    fig = Figure(figsize=(12, 4.5), dpi=110)
    ax = fig.subplots()
    ax.semilogy(xs, amax, ".-", lw=0.8, ms=3, color="tab:blue", label="output amax")
    over = [(x, a) for x, a, s in zip(xs, amax, layers) if s.outputs.overflows]
    if over:
        ax.semilogy(*zip(*over), "o", color="tab:red", ms=5, label="beyond 65504")
    bad = [x for x, s in zip(xs, layers) if s.outputs.nonfinite]
    if bad:
        ax.semilogy(bad, [FP16_MAX * 4] * len(bad), "x", color="red", ms=7, label="inf/NaN")
    ax.axhline(FP16_MAX, color="tab:red", ls="--", lw=1, label="FP16 max 65504")
    ax.axhline(FP16_MIN_SUBNORMAL, color="tab:purple", ls=":", lw=1, label="flush to zero 2^-24")
    peak = max(range(len(layers)), key=lambda i: amax[i], default=None)
    if peak is not None:
        ax.annotate(f"{layers[peak].display_name}\n{layers[peak].outputs.amax:.3g}", (peak, amax[peak]),
                    textcoords="offset points", xytext=(5, 8), fontsize=8)
    ax.set_xlabel("layer, in execution order")
    ax.set_ylabel("max |activation|")
    ax.set_title(title or f"fp16guard inspect: {report.source}")
    ax.set_ylim(FLOOR / 2, FP16_MAX * 64)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
