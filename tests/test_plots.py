"""The plots draw on their own Figure (the caller's matplotlib backend is never switched), keep their
legends and text off the data, name the verdict and the offender, and mark static findings."""

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.text import Text
from torch import nn

from fp16guard import FInspect
from fp16guard.bisection import BisectResult, Offender, Trial, plot_bisect
from fp16guard.bisection.plot import bisect_figure
from fp16guard.fp16 import FP16_MAX, FP16_MIN_SUBNORMAL
from fp16guard.inspect import plot_report
from fp16guard.inspect.plot import STATIC_LINES, report_figure
from fp16guard.inspect.report import CallRecord, InspectionReport, StaticFinding
from fp16guard.stats import RangeStats
from tests.models import Overflowing


@pytest.fixture
def svg_backend():
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(before)


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    return data


def test_plot_report_keeps_the_callers_backend(tmp_path, svg_backend):
    model = Overflowing().eval()
    with torch.no_grad(), FInspect(model) as probe:
        model(torch.from_numpy(np.ones((1, 8), np.float32)))
    _png(plot_report(probe.report(), tmp_path / "r.png"))
    assert matplotlib.get_backend() == "svg"


def test_plot_bisect_keeps_the_callers_backend(tmp_path, svg_backend):
    trials = [Trial("node", 0, 4, "d", float("inf"), True, 0.1, True), Trial("node", 0, 2, "b", 1e-3, False, 0.1, True),
              Trial("node", 0, 3, "c", 0.5, True, 0.1, True)]
    offenders = [Offender(name="c", kind="Mul", op=None, onnx_nodes=("c",), cut=3, error=0.5, amax=1e5, round=0)]
    result = BisectResult("m", "emulate", "relative_l2", 0.07, ["a", "b", "c", "d"], trials=trials, offenders=offenders)
    _png(plot_bisect(result, tmp_path / "b.png"))
    assert matplotlib.get_backend() == "svg"


# -- what the figures show -----------------------------------------------------------------------

def _drawn(fig):
    """Lay out and draw ``fig`` on an Agg canvas (display coordinates become final)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig


def _texts(fig):
    """Every string drawn on the figure: titles, annotations, legend labels, tick labels."""
    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text()]


def _apart(a, b):
    """True when two display-space boxes do not overlap."""
    return a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0


def _bisect_result(offenders=True):
    trials = [Trial("node", 0, 8, "layer.7", float("inf"), True, 0.1, True),
              Trial("node", 0, 4, "layer.3", 1e-3, False, 0.1, True),
              Trial("node", 0, 6, "layer.5", 0.5, True, 0.1, True),
              Trial("node", 0, 5, "layer.4", 2e-3, False, 0.1, True)]
    found = [Offender(name="layer.5.norm", kind="Mul", op=None, onnx_nodes=(), cut=6, error=0.5, amax=1e5, round=0)]
    return BisectResult("m", "emulate", "relative_l2", 0.07, [f"layer.{i}" for i in range(8)],
                        trials=trials if offenders else trials[1:2], offenders=found if offenders else [])


def test_bisect_plot_names_the_offender_and_keeps_the_legend_off_the_data():
    fig = _drawn(bisect_figure(_bisect_result()))
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert _apart(legend.get_window_extent(), ax.get_window_extent())
    labels = [t.get_text() for t in legend.get_texts()]
    assert any("layer.5.norm (Mul)" in s and s.startswith("offender") for s in labels)
    assert any(s.startswith("tolerance 0.07") for s in labels)
    assert any(s.startswith("good cut") for s in labels) and any(s.startswith("bad cut") for s in labels)
    assert ax.get_title(loc="left").startswith("first bad: layer.5.norm (Mul) at cut 6")
    # The offender's vertical line is at its cut and carries its label.
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("offender"))
    assert list(line.get_xdata()) == [6, 6]


def test_bisect_plot_without_offender_says_so():
    fig = _drawn(bisect_figure(_bisect_result(offenders=False)))
    ax = fig.axes[0]
    assert ax.get_title(loc="left") == "no offender: every cut within tolerance 0.07"
    assert not any(s.startswith("offender") for s in _texts(fig))


def _report(peak, static=()):
    """A report of 20 layers, the largest (index 7) at ``peak``, the others around 10 or below it."""
    calls = []
    for i in range(20):
        amax = peak if i == 7 else min(10.0 + i, peak / (2 + i % 3))
        calls.append(CallRecord(i, f"layer{i}", "Conv2d", "", 0, RangeStats(1.0, 8, 0, 8),
                                RangeStats(amax, 8, 0, 8)))
    return InspectionReport("synthetic", tuple(calls), static=tuple(static))


@pytest.mark.parametrize("peak", [1.66e4, 6.0e4, FP16_MAX, 7.0e4, 2.0e5, 2.0e6, 1e-7, 6e-8])
def test_inspect_peak_label_stays_off_the_fp16_lines(peak):
    fig = _drawn(report_figure(_report(peak)))
    ax = fig.axes[0]
    label = next(t for t in ax.texts if t.get_text().startswith("peak: layer7 (Conv2d)"))
    boxes = [label.get_bbox_patch().get_window_extent(), Text.get_window_extent(label)]
    frame = ax.get_window_extent()
    for line_y in (FP16_MAX, FP16_MIN_SUBNORMAL):
        y = ax.transData.transform((0, line_y))[1]
        for box in boxes:
            assert not box.y0 <= y <= box.y1, (peak, line_y, box)
    for box in boxes:
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1
    assert _apart(ax.get_legend().get_window_extent(), frame)


def test_inspect_plot_marks_a_static_finding_on_its_layer(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_var.fill_(1e6)
        with FInspect(model) as probe:
            model(torch.ones(2, 4))
    report = probe.report()
    assert any(f.tensor == "1.running_var" for f in report.static)
    fig = _drawn(report_figure(report))
    ax = fig.axes[0]
    box = next(t for t in ax.texts if t.get_text().startswith("static findings"))
    assert "1.running_var" in box.get_text()
    assert "(no plotted layer)" not in box.get_text()
    assert _apart(box.get_window_extent(), ax.get_window_extent())
    # The error diamond sits at the BatchNorm's position in execution order, at the variance's amax.
    x_bn = [s.name for s in report.layers(leaves_only=True)].index("1")
    marker = next(ln for ln in ax.get_lines() if ln.get_label().startswith("static error"))
    assert (x_bn, 1e6) in zip(marker.get_xdata(), marker.get_ydata())
    assert "static findings (weights, buffers): " in ax.get_title(loc="left")
    _png(plot_report(report, tmp_path / "r.png"))


def test_inspect_plot_lists_static_findings_without_a_layer_and_caps_the_list():
    stats = RangeStats(1e6, 4, 0, 4)
    static = [StaticFinding(f"const_{i}", "overflow", "error", 4, stats, "too big", layer="") for i in range(8)]
    static.append(StaticFinding("layer3.weight", "flush_to_zero", "warning", 2, RangeStats(1.0, 4, 0, 4, 2),
                                "tiny", layer="layer3"))
    fig = _drawn(report_figure(_report(100.0, static)))
    ax = fig.axes[0]
    text = next(t for t in ax.texts if t.get_text().startswith("static findings")).get_text()
    assert "error overflow: const_0, amax 1e+06 (no plotted layer)" in text
    assert text.count("\n") == STATIC_LINES + 1 and text.endswith("+4 more (see the report)")
    warning = next(ln for ln in ax.get_lines() if ln.get_label().startswith("static warning"))
    assert list(zip(warning.get_xdata(), warning.get_ydata())) == [(3, FP16_MIN_SUBNORMAL)]
