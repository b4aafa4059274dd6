"""The plots draw on their own Figure: the caller's matplotlib backend is never switched."""

import matplotlib
import numpy as np
import pytest
import torch

from fp16guard import FInspect
from fp16guard.bisect import BisectResult, Offender, Trial, plot_bisect
from fp16guard.inspect import plot_report
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
    result = BisectResult("m", "emulate", "relative_l2", 0.07, ["a", "b", "c", "d"])
    result.trials = [Trial("node", 0, 4, "d", float("inf"), True, 0.1, True),
                     Trial("node", 0, 2, "b", 1e-3, False, 0.1, True),
                     Trial("node", 0, 3, "c", 0.5, True, 0.1, True)]
    result.offenders = [Offender(name="c", kind="Mul", op=None, onnx_nodes=("c",), cut=3, error=0.5, amax=1e5,
                                 round=0)]
    _png(plot_bisect(result, tmp_path / "b.png"))
    assert matplotlib.get_backend() == "svg"
