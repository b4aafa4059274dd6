"""Per-layer activation amax in execution order, on a log scale, with FP16's limits (matplotlib).

Figures are drawn on a ``matplotlib.figure.Figure`` and saved directly, without ``pyplot``: the
caller's matplotlib backend (a notebook's inline one) is never switched.
"""

from __future__ import annotations

from pathlib import Path

from fp16guard.fp16 import FP16_MAX, FP16_MIN_SUBNORMAL
from fp16guard.inspect.report import InspectionReport, LayerSummary, StaticFinding

#: Where a layer whose outputs are all zero is drawn (a log axis cannot show 0).
FLOOR = 2.0**-30
#: Where inf/NaN outputs are drawn, and static findings whose tensor holds inf/NaN.
NONFINITE_Y = FP16_MAX * 4
#: The y range of the axes.
YLIM = (FLOOR / 2, FP16_MAX * 64)
#: At most this many static findings are listed in the text box; the rest are counted.
STATIC_LINES = 5
#: Marker colour of a static finding, by severity.
SEVERITY_COLORS = {"error": "tab:red", "warning": "tab:orange", "info": "tab:gray"}
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def _short(name: str, width: int = 40) -> str:
    """``name``, cut in the middle with an ellipsis when longer than ``width`` characters."""
    if len(name) <= width:
        return name
    keep = (width - 1) // 2
    return f"{name[:keep]}…{name[len(name) - (width - 1 - keep):]}"


def static_value(f: StaticFinding) -> str:
    """The number behind a static finding, in a few words."""
    if f.rule == "nonfinite":
        return f"{f.count} inf/NaN"
    if f.rule == "flush_to_zero":
        return f"{f.count} values < 2^-24"
    if f.rule == "bn_fold":
        return f"var amax {f.extra.get('var_amax', f.stats.amax):.3g}, scale amax {f.extra.get('scale_amax', 0):.3g}"
    return f"amax {f.stats.amax:.3g}"


def static_y(f: StaticFinding) -> float:
    """Where a static finding's marker is drawn: the tensor's amax, clipped below the top of the axes
    (inf/NaN at :data:`NONFINITE_Y`, a flush-to-zero finding on the 2^-24 line)."""
    if f.rule == "nonfinite":
        return NONFINITE_Y
    if f.rule == "flush_to_zero":
        return FP16_MIN_SUBNORMAL
    return min(max(f.stats.amax, FLOOR), YLIM[1] / 2)


def static_lines(static: tuple[StaticFinding, ...], placed: set[str], limit: int = STATIC_LINES) -> list[str]:
    """The text box's lines: errors first, findings not drawn on a layer before those that are, then
    ``+N more`` past ``limit``."""
    order = sorted(static, key=lambda f: (_SEVERITY_ORDER.get(f.severity, 3), f.layer in placed))
    lines = [f"{f.severity} {f.rule}: {_short(f.tensor)}, {static_value(f)}"
             + ("" if f.layer in placed else " (no plotted layer)") for f in order[:limit]]
    if len(order) > limit:
        lines.append(f"+{len(order) - limit} more (see the report)")
    return lines


def verdict(report: InspectionReport) -> str:
    """One line: where activations overflow (or that none does) and how many static findings there are."""
    errors = [f for f in report.findings() if f.severity == "error"]
    if errors:
        first = errors[0]
        text = f"{len(errors)} activation error(s), first: {first.rule} at {_short(first.name)} ({first.kind})"
    else:
        text = "no activation crosses 65504"
    if report.static:
        counts = {s: sum(f.severity == s for f in report.static) for s in _SEVERITY_ORDER}
        text += "; static findings (weights, buffers): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return text


def _place_peak_label(fig, ax, label, lines: list[float]) -> None:
    """Move the peak label above or below its point, or past the nearest line, so that its box crosses
    none of the horizontal ``lines`` (data y) and stays inside the axes; the nearest such place wins."""
    from matplotlib.text import Text

    fig.draw_without_rendering()  # lays the figure out: the positions below are final
    box = label.get_bbox_patch().get_window_extent()
    frame = ax.get_window_extent()
    height, gap, margin = box.height, fig.dpi * 6 / 72, 3.0
    y_point = ax.transData.transform(label.xy)[1]
    y_lines = [ax.transData.transform((label.xy[0], y))[1] for y in lines]
    bottoms = [y_point + gap, y_point - gap - height]  # above, then below the point
    for y in y_lines:
        bottoms += [y + gap, y - gap - height]

    def clear(bottom: float) -> bool:
        """Inside the axes and off every line."""
        return (frame.y0 + margin <= bottom and bottom + height <= frame.y1 - margin
                and not any(bottom - margin <= y <= bottom + height + margin for y in y_lines))

    fits = [b for b in bottoms if clear(b)]
    if fits:
        bottom = min(fits, key=lambda b: abs(b + height / 2 - y_point))
        pad = Text.get_window_extent(label).y0 - box.y0  # the box's pad under the text
        label.set_position((label.get_position()[0], (bottom + pad - y_point) * 72 / fig.dpi))


def report_figure(report: InspectionReport, title: str | None = None):
    """Draw the inspect plot of ``report`` on a new ``Figure`` and return it (see :func:`plot_report`)."""
    from matplotlib.figure import Figure

    layers: list[LayerSummary] = report.layers(leaves_only=True)
    xs = list(range(len(layers)))
    amax = [max(s.outputs.amax, FLOOR) for s in layers]
    fig = Figure(figsize=(13, 4.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.semilogy(xs, amax, ".-", lw=0.8, ms=3, color="tab:blue", label="output amax")
    over = [(x, a) for x, a, s in zip(xs, amax, layers) if s.outputs.overflows]
    if over:
        ax.semilogy(*zip(*over), "o", color="tab:red", ms=5, label="beyond 65504")
    bad = [x for x, s in zip(xs, layers) if s.outputs.nonfinite]
    if bad:
        ax.semilogy(bad, [NONFINITE_Y] * len(bad), "x", color="red", ms=7, label="inf/NaN")
    ax.axhline(FP16_MAX, color="tab:red", ls="--", lw=1, label="FP16 max 65504")
    ax.axhline(FP16_MIN_SUBNORMAL, color="tab:purple", ls=":", lw=1, label="flush to zero 2^-24")

    # Static findings: a diamond at the layer that uses the tensor, coloured by the worst severity there.
    where = {s.name: x for x, s in zip(xs, layers)}
    placed = {f.layer for f in report.static if f.layer in where}
    worst: dict[tuple[int, float], str] = {}
    for f in sorted(report.static, key=lambda f: -_SEVERITY_ORDER.get(f.severity, 3)):
        if f.layer in where:
            worst[(where[f.layer], static_y(f))] = f.severity
    for severity, color in SEVERITY_COLORS.items():
        pts = [xy for xy, s in worst.items() if s == severity]
        if pts:
            ax.plot(*zip(*pts), "D", color=color, mec="black", mew=0.6, ms=7, ls="none", zorder=4,
                    label=f"static {severity}: weight/buffer at its layer")

    peak = max(range(len(layers)), key=lambda i: amax[i], default=None)
    label = None
    if peak is not None:
        right = peak > 0.7 * max(len(layers) - 1, 1)
        label = ax.annotate(
            f"peak: {_short(layers[peak].display_name)} ({layers[peak].kind})\n{layers[peak].outputs.amax:.3g}"
            f" = {layers[peak].outputs.amax / FP16_MAX:.2g}x FP16 max", (peak, amax[peak]),
            textcoords="offset points", xytext=(-6 if right else 6, 6), ha="right" if right else "left",
            va="bottom", fontsize=8, zorder=5,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.set_xlabel("layer, in execution order")
    ax.set_ylabel("max |activation|")
    fig.suptitle(title or f"fp16guard inspect: {report.source}")
    ax.set_title(verdict(report), fontsize=9, loc="left",
                 color="tab:red" if report.overflow_found else "tab:green")
    ax.set_ylim(*YLIM)
    ax.grid(True, which="major", alpha=0.3)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8)
    if report.static:
        ax.annotate("\n".join([f"static findings ({len(report.static)}):"] + static_lines(report.static, placed)),
                    xy=(0, 0), xycoords=legend, xytext=(0, -10), textcoords="offset points", va="top",
                    ha="left", fontsize=7.5, family="monospace",
                    bbox={"boxstyle": "round,pad=0.4", "fc": "white", "ec": "0.7"})
    if label is not None:
        _place_peak_label(fig, ax, label, [FP16_MAX, FP16_MIN_SUBNORMAL])
    return fig


def plot_report(report: InspectionReport, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of every leaf layer's output amax, in order of first call (log scale).

    Draws the 65504 overflow line and the 2**-24 flush-to-zero line; layers beyond 65504 get a red
    dot, layers whose outputs hold inf/NaN a red cross at the top. The largest layer is labelled
    (name, kind, amax) off both lines. Static findings (weights, buffers, BatchNorm folds: the exit
    status 1 that no activation explains) are diamonds at the layer that uses the tensor, coloured
    by the worst severity there, at the tensor's amax (clipped to the top of the axes; on the 2^-24
    line for flush-to-zero), and are listed (tensor, rule, value; errors first, at most
    :data:`STATIC_LINES` lines) in a box under the legend, to the right of the axes and off the
    data. The line under the title is the verdict. Returns ``path``.
    """
    path = Path(path)
    report_figure(report, title).savefig(path)
    return path
