"""Per-layer activation amax in execution order, on a log scale, with FP16's limits (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from .fp16 import FP16_MAX, FP16_MIN_SUBNORMAL
from .report import InspectionReport

#: Where a layer whose outputs are all zero is drawn (a log axis cannot show 0).
FLOOR = 2.0**-30


def plot_report(report: InspectionReport, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of every leaf layer's output amax, in order of first call.

    Draws the 65504 overflow line and the 2**-24 flush-to-zero line; layers whose outputs hold
    inf/NaN are marked with a red cross at the top. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.layers(leaves_only=True)
    xs = list(range(len(layers)))
    amax = [max(s.outputs.amax, FLOOR) for s in layers]
    fig, ax = plt.subplots(figsize=(12, 4.5), dpi=110)
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
    plt.close(fig)
    return path


def plot_bisect(result, path: str | Path) -> Path:
    """Write a PNG of the metric at every tried cut against the cut's position (log scale).

    Good cuts are blue dots, bad ones red crosses (non-finite errors are drawn at the top edge);
    the tolerance is a dashed line and each offender a vertical line. Returns ``path``.
    """
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(result.candidates), 1)
    trials = [t for t in result.trials if t.stage in ("module", "node")]
    finite = [t.error for t in trials if math.isfinite(t.error) and t.error > 0]
    top = max(finite + [result.tolerance]) * 10
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    for bad, style, color, label in ((False, "o", "tab:blue", "good cut"), (True, "x", "tab:red", "bad cut")):
        pts = [(t.cut, min(t.error, top) if t.error > 0 else FLOOR) for t in trials if t.bad == bad]
        if pts:
            ax.semilogy(*zip(*pts), style, color=color, label=label)
    ax.axhline(result.tolerance, color="gray", ls="--", lw=1, label=f"tolerance {result.tolerance:g}")
    for o in result.offenders:
        ax.axvline(o.cut, color="tab:red", lw=0.8, alpha=0.6)
        ax.annotate(o.name, (o.cut, top), rotation=90, va="top", ha="right", fontsize=8, color="tab:red")
    ax.set_xlim(0, n + 1)
    ax.set_xlabel(f"cut: candidates run in FP16 (of {n}, execution order)")
    ax.set_ylabel(f"{result.metric} of the hybrid output")
    ax.set_title(f"fp16guard bisect: {result.source}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
