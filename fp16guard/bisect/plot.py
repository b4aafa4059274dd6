"""The bisect plot: the error at every tried cut against the cut's position (matplotlib, no pyplot)."""

from __future__ import annotations

import math
from pathlib import Path

#: Where a zero error is drawn (a log axis cannot show 0).
FLOOR = 2.0**-30


def plot_bisect(result, path: str | Path) -> Path:
    """Write a PNG of the metric at every tried cut against the cut's position (log scale).

    Good cuts are blue dots, bad ones red crosses (non-finite errors are drawn at the top edge);
    the tolerance is a dashed line, the rounding noise it was set from (if measured) a dotted one,
    and each offender a vertical line. Returns ``path``.
    """
    from matplotlib.figure import Figure

    n = max(len(result.candidates), 1)
    trials = [t for t in result.trials if t.stage in ("module", "node")]
    finite = [t.error for t in trials if math.isfinite(t.error) and t.error > 0]
    top = max(finite + [result.tolerance]) * 10
    fig = Figure(figsize=(10, 4.2), dpi=110)
    ax = fig.subplots()
    for bad, style, color, label in ((False, "o", "tab:blue", "good cut"), (True, "x", "tab:red", "bad cut")):
        pts = [(t.cut, min(t.error, top) if t.error > 0 else FLOOR) for t in trials if t.bad == bad]
        if pts:
            ax.semilogy(*zip(*pts), style, color=color, label=label)
    ax.axhline(result.tolerance, color="gray", ls="--", lw=1, label=f"tolerance {result.tolerance:g}")
    if result.noise is not None and math.isfinite(result.noise) and result.noise > 0:
        ax.axhline(result.noise, color="gray", ls=":", lw=1,
                   label=f"rounding noise {result.noise:.3g} (cut {result.noise_cut})")
    for o in result.offenders:
        ax.axvline(o.cut, color="tab:red", lw=0.8, alpha=0.6)
        ax.annotate(o.name, (o.cut, top), rotation=90, va="top", ha="right", fontsize=8, color="tab:red")
    ax.set_xlim(0, n + 1)
    ax.set_xlabel(f"cut: candidates run in FP16 (of {n}, execution order)")
    ax.set_ylabel(f"{result.metric} of the hybrid output")
    ax.set_title(f"fp16guard bisect: {result.source}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
