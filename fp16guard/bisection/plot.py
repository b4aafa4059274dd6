"""The bisect plot: the error at every tried cut against the cut's position (matplotlib, no pyplot).

Figures are drawn on a ``matplotlib.figure.Figure`` and saved directly, without ``pyplot``: the
caller's matplotlib backend (a notebook's inline one) is never switched.
"""

from __future__ import annotations

import math
from pathlib import Path

from fp16guard.bisection.search import NOISE_CAP, NOISE_FACTOR

#: Where a zero error is drawn (a log axis cannot show 0).
FLOOR = 2.0**-30
#: Colours of the offender lines, by round (cycled).
OFFENDER_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def short(name: str, width: int = 48) -> str:
    """``name``, cut in the middle with an ellipsis when longer than ``width`` characters."""
    if len(name) <= width:
        return name
    keep = (width - 1) // 2
    return f"{name[:keep]}…{name[len(name) - (width - 1 - keep):]}"


def verdict(result) -> str:
    """One line: the first offender with its cut and error, or why nothing was blamed."""
    if not result.offenders:
        if all(not t.bad for t in result.trials):
            return f"no offender: every cut within tolerance {result.tolerance:g}"
        return f"no offender found (tolerance {result.tolerance:g}; see the notes of the result)"
    o = result.offenders[0]
    error = (f"{result.metric} {o.error:.3g} > tolerance {result.tolerance:g}" if math.isfinite(o.error)
             else "non-finite output")
    more = f"; +{len(result.offenders) - 1} more offender(s)" if len(result.offenders) > 1 else ""
    return f"first bad: {short(o.name)} ({o.kind}) at cut {o.cut}, {error}{more}"


def _tolerance_label(result) -> str:
    """The tolerance line's legend entry: its value and where it came from."""
    source = {"explicit": "given", "floor": "default floor", "noise": f"{NOISE_FACTOR:g} x rounding noise",
              "cap": f"noise capped at {NOISE_CAP:g}"}.get(result.tolerance_source, result.tolerance_source)
    return f"tolerance {result.tolerance:g} ({source}); bad above"


def bisect_figure(result):
    """Draw the bisect plot of ``result`` on a new ``Figure`` and return it (see :func:`plot_bisect`)."""
    from matplotlib.figure import Figure

    n = max(len(result.candidates), 1)
    trials = [t for t in result.trials if t.stage in ("module", "node")]
    finite = [t.error for t in trials if math.isfinite(t.error) and t.error > 0]
    top = max(finite + [result.tolerance]) * 10
    fig = Figure(figsize=(11, 4.5), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.set_yscale("log")
    groups = (
        ("good cut (error <= tolerance)", "o", "tab:blue", lambda t: not t.bad),
        ("bad cut (error > tolerance)", "X", "tab:red", lambda t: t.bad and math.isfinite(t.error)),
        ("bad cut, non-finite output (drawn at the top)", "^", "tab:red",
         lambda t: t.bad and not math.isfinite(t.error)),
    )
    for label, marker, color, member in groups:
        pts = [(t.cut, min(t.error, top) if t.error > 0 else FLOOR) for t in trials if member(t)]
        if pts:
            ax.plot(*zip(*pts), marker, color=color, ms=7, ls="none", label=label, zorder=3)
    ax.axhline(result.tolerance, color="gray", ls="--", lw=1, label=_tolerance_label(result))
    if result.noise is not None and math.isfinite(result.noise) and result.noise > 0:
        ax.axhline(result.noise, color="gray", ls=":", lw=1,
                   label=f"rounding noise {result.noise:.3g} (cut {result.noise_cut})")
    for i, o in enumerate(result.offenders):
        tag = "offender" if len(result.offenders) == 1 else f"offender {i + 1}"
        ax.axvline(o.cut, color=OFFENDER_COLORS[i % len(OFFENDER_COLORS)], lw=1.2, alpha=0.7, zorder=2,
                   label=f"{tag}: {short(o.name)} ({o.kind}), first bad cut {o.cut}")
    if result.offenders:
        # Each offender line named at the top edge, outside the data.
        top_axis = ax.secondary_xaxis("top")
        top_axis.set_xticks([o.cut for o in result.offenders],
                            [short(o.name, 32) if len(result.offenders) == 1 else str(i + 1)
                             for i, o in enumerate(result.offenders)])
        for i, label in enumerate(top_axis.get_xticklabels()):
            label.set_color(OFFENDER_COLORS[i % len(OFFENDER_COLORS)])
            label.set_fontsize(8)
    ax.set_xlim(0, n + 1)
    ax.set_xlabel(f"cut: candidates run in FP16 (of {n}, execution order)")
    ax.set_ylabel(f"{result.metric} of the hybrid output")
    ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(f"fp16guard bisect: {result.source}")
    ax.set_title(verdict(result), fontsize=9, color="tab:red" if result.offenders else "tab:green", loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8)
    return fig


def plot_bisect(result, path: str | Path) -> Path:
    """Write a PNG of the metric at every tried cut against the cut's position (log scale).

    The title line under the model's name is the verdict (the first offender, its cut and error, or
    "no offender"). Good cuts are blue dots, bad ones red crosses, cuts whose output went non-finite
    red triangles at the top edge; the tolerance is a dashed line (its value and source in the
    legend), the rounding noise it was set from (if measured) a dotted one, and each offender a
    vertical line, named with its kind in the legend and on the top edge. The legend sits to the
    right of the axes, off the data. Returns ``path``.
    """
    bisect_figure(result).savefig(path)
    return Path(path)
