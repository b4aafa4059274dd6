"""FInspect.run on CUDA: the hooked forward captured once and replayed (GPU only). Graph mode must
give the very numbers of eager mode: same kernels, same order, same arena slots."""

import logging

import pytest
import torch
import torch.nn as nn

from fp16guard import FInspect
from tests.models import Overflowing, residual_net
from tests.replay_cases import as_rows, batches, eager_reports, merged

pytestmark = pytest.mark.gpu


def _cuda_batches(shape, scales, dtype, seed=0):
    return [x.to("cuda", dtype) for x in batches(shape, scales, seed)]


@pytest.fixture(params=[True, False], ids=["statistics-on-a-side-stream", "statistics-inline"])
def overlap(request, monkeypatch):
    from fp16guard.inspect import replay

    monkeypatch.setattr(replay, "OVERLAP_STATISTICS", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_replays_give_the_eager_numbers_value_for_value(dtype, overlap):
    model = residual_net().to("cuda", dtype)
    a = _cuda_batches((4, 3, 16, 16), [1, 30, 0.01, 3, 100, 0.5], dtype)  # 1 eager, 1 warm-up + capture, 4 replays
    b = _cuda_batches((2, 3, 8, 8), [2, 7], dtype, seed=1)  # another signature: captured, never replayed
    with torch.no_grad(), FInspect(model) as probe:
        outs = [probe.run(x) for x in a[:3] + b + a[3:]]
    report = probe.report()
    assert report.mode == "CUDA graph: 2 captures, 4 replays; eager: 4 forwards"
    want = merged(eager_reports(model, a, cuda_graph=False)) + merged(eager_reports(model, b, cuda_graph=False))
    assert as_rows(report.calls) == want
    with torch.no_grad():
        for x, out in zip(a[:3] + b + a[3:], outs):
            torch.testing.assert_close(out, model(x), rtol=0, atol=0, equal_nan=True)
    assert len({o.data_ptr() for o in outs}) == len(outs)  # copies, not the graph's output buffer


def test_replays_make_no_host_sync_and_hold_no_more_memory():
    model = Overflowing().cuda().eval()
    xs = _cuda_batches((64, 8), [1] * 40, torch.float32)
    with torch.no_grad(), FInspect(model) as probe:
        for x in xs[:3]:
            probe.run(x)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in xs[3:]:
                probe.run(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before <= 64 * 4 * 4 * 37  # at most the returned copies
    report = probe.report()
    assert report.mode == "CUDA graph: 1 capture, 38 replays; eager: 2 forwards"
    up = next(r for r in report.calls if r.name == "up")
    assert up.outputs.numel == 40 * 64 * 8 and up.transition == "from"


class InPlace(nn.Module):
    """Overwrites measured tensors in place: an in-place ReLU after a BatchNorm, ``out += x`` in
    forward (torchvision's Bottleneck), and ``relu_()`` on a conv output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3).eval()
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        out = self.relu(self.bn(self.conv(x)))
        out += x
        return self.conv2(out).relu_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensors_overwritten_in_place_are_measured_before_they_change(dtype, overlap):
    model = InPlace().to("cuda", dtype).eval()
    xs = _cuda_batches((8, 3, 32, 32), [1, 5, 0.1, 2, 40], dtype)
    with torch.no_grad(), FInspect(model) as probe:
        for x in xs:
            probe.run(x)
    assert probe.mode == "CUDA graph: 1 capture, 3 replays; eager: 2 forwards"
    assert as_rows(probe.report().calls) == merged(eager_reports(model, xs, cuda_graph=False))


class Syncs(nn.Module):
    """Reads a value on the host in forward: cannot be captured."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return y * float(y.abs().max().item() > 0)


def test_a_forward_that_cannot_be_captured_runs_eagerly_with_one_warning(caplog):
    model = Syncs().cuda().eval()
    xs = _cuda_batches((4, 8), [1, 2, 3, 4, 5], torch.float32)
    with caplog.at_level(logging.INFO, logger="fp16guard"), torch.no_grad(), FInspect(model) as probe:
        for x in xs:
            probe.run(x)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA graph capture failed" in warnings[0]
    report = probe.report()
    assert report.mode.startswith("eager: 5 forwards (no CUDA graph: CUDA graph capture failed")
    assert as_rows(report.calls) == merged(eager_reports(model, xs, cuda_graph=False))
    # the process is as it was: the current stream, the random generator, a later capture
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(3, device="cuda")
    with torch.no_grad(), FInspect(residual_net().cuda()) as probe:
        for x in _cuda_batches((1, 3, 8, 8), [1, 2, 3], torch.float32):
            probe.run(x)
    assert probe.mode == "CUDA graph: 1 capture, 1 replay; eager: 2 forwards"


def test_autograd_and_the_op_view_run_eagerly():
    model = Overflowing().cuda().eval()
    xs = _cuda_batches((4, 8), [1, 2, 3], torch.float32)
    with FInspect(model) as probe:  # no torch.no_grad()
        for x in xs:
            probe.run(x)
    assert "autograd is on" in probe.mode and probe.mode.startswith("eager: 3 forwards")
    with torch.no_grad(), FInspect(model, ops=True) as probe:
        for x in xs:
            probe.run(x)
    assert "op view" in probe.mode
    assert as_rows(probe.report().ops) == merged(eager_reports(model, xs, ops=True), "ops")


def test_inference_mode_and_a_second_entry_recapture():
    model = residual_net().cuda().half()
    xs = _cuda_batches((2, 3, 16, 16), [1, 2, 3, 4], torch.float16)
    probe = FInspect(model)
    with torch.inference_mode():
        with probe:
            for x in xs[:3]:
                probe.run(x)
        with probe:  # graphs are dropped on exit and captured again
            probe.run(xs[3])
    assert probe.mode == "CUDA graph: 2 captures, 1 replay; eager: 3 forwards"
    assert as_rows(probe.report().calls) == merged(eager_reports(model, xs, cuda_graph=False))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_calls_in_the_block_replay_by_themselves(dtype):
    """``model(x)`` inside ``with FInspect(model)`` goes through ``run``: the same merged rows and
    graph replays, outputs the caller can keep, and the model's own class back on exit."""
    model = residual_net().to("cuda", dtype)
    cls, state = type(model), {k: v.clone() for k, v in model.state_dict().items()}
    xs = _cuda_batches((4, 3, 16, 16), [1, 30, 0.01, 3, 100], dtype)
    with torch.no_grad(), FInspect(model) as probe:
        outs = [model(x) for x in xs]
        assert isinstance(model, cls) and type(model).__name__ == cls.__name__
    assert type(model) is cls and "_fp16guard_routed" not in vars(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert probe.mode == "CUDA graph: 1 capture, 3 replays; eager: 2 forwards"
    assert as_rows(probe.report().calls) == merged(eager_reports(model, xs, cuda_graph=False))
    with torch.no_grad():
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, model(x), rtol=0, atol=0, equal_nan=True)
    assert len({o.data_ptr() for o in outs}) == len(outs)


def test_model_calls_with_autograd_on_stay_eager_with_one_line(caplog):
    model = residual_net().cuda()
    xs = _cuda_batches((2, 3, 8, 8), [1, 2, 3], torch.float32)
    with caplog.at_level(logging.INFO, logger="fp16guard"), FInspect(model) as probe:
        for x in xs:
            model(x).sum().backward()  # autograd works through the routed call
    assert probe.mode.startswith("eager: 3 forwards") and "autograd is on" in probe.mode
    assert sum("autograd is on" in r.getMessage() for r in caplog.records) == 1
    assert as_rows(probe.report().calls) == merged(eager_reports(model, xs, cuda_graph=False))
