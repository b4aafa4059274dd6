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


@pytest.fixture(params=[(True, True, 1), (True, False, 1), (True, False, 3), (False, True, 1), (False, False, 1)],
                ids=["side-stream-grouped", "side-stream-per-tensor", "3-side-streams-model-first", "inline-grouped",
                     "inline-per-tensor"])
def overlap(request, monkeypatch):
    """Statistics on a side stream or inline; in multi-tensor launches (groups of at most 4 KiB,
    so a forward of these small models makes several) or one launch per tensor; or per tensor on
    three side streams in turn, the model's stream of higher priority."""
    from fp16guard.inspect import replay, triton_stats

    overlap, grouped, streams = request.param
    monkeypatch.setattr(replay, "OVERLAP_STATISTICS", overlap)
    monkeypatch.setattr(replay, "GROUP_STATISTICS", grouped)
    monkeypatch.setattr(replay, "STATISTICS_STREAMS", streams)
    monkeypatch.setattr(replay, "PRIORITIZE_MODEL", streams > 1)
    monkeypatch.setattr(triton_stats, "GROUP_BYTES", 4096)
    return overlap


def _special_values(n, dtype, seed):
    """``n`` values of ``dtype`` spanning the statistics: normal, zeros, values FP16 flushes or keeps
    subnormal, beyond 65504 (FP32/BF16), inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-9, 6, (n,), generator=g)
    pick = torch.rand(n, generator=g)
    x[pick < 0.1] = 0.0
    x[(pick > 0.995)] = float("inf")
    x[(pick > 0.99) & (pick <= 0.995)] = float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_group_launch_gives_the_per_tensor_numbers_exactly(dtype):
    """StatsArena.reduce_group over tensors of many sizes (one element, a partial chunk, whole
    chunks, several programs' worth, a 16-byte-aligned view) equals one launch per tensor."""
    from fp16guard.inspect.triton_stats import BLOCK, UNROLL, StatsArena

    chunk = BLOCK * UNROLL
    sizes = [1, 7, chunk, chunk + 1, 3 * chunk - 5, 100_003, 1 << 20, 5_000_000, 33]
    tensors = [_special_values(n, dtype, i).cuda() for i, n in enumerate(sizes)]
    tensors.append(_special_values(4096, dtype, 99).cuda()[64:])  # a view, 16-byte aligned
    one, group = StatsArena(torch.device("cuda")), StatsArena(torch.device("cuda"))
    for t in tensors:
        one.reduce(t)
    assert group.warm_group()
    slots = [group.take() for _ in tensors]
    for _ in range(2):  # launched twice: the slots accumulate, as CUDA-graph replays do
        host, grid = group.group_table(tensors, slots)
        group.reduce_group(tensors, slots, host.cuda(), grid)
    for t in tensors:
        one.reduce(t)
    want = one.device_rows().view(2, len(tensors), 5)
    want = torch.cat([want.amax(0)[:, :1], want.sum(0)[:, 1:]], 1)
    got = group.device_rows()
    assert torch.equal(got, want), (got - want).abs().max()
    assert got[:, 1].sum() > 0 and got[:, 4].sum() > 0  # the values reached the counts
    if dtype != torch.float16:  # FP16 holds nothing nonzero below 2**-24
        assert got[:, 3].sum() > 0


def test_grouped_capture_of_a_resnet_stage_equals_eager(monkeypatch):
    """Bottlenecks (BatchNorm, in-place ReLU, ``out += identity``) captured with grouped statistics
    on a side stream: the report equals the eager one value for value, with groups small enough
    that some launch before, some after an in-place write."""
    torchvision = pytest.importorskip("torchvision")
    from fp16guard.inspect import replay, triton_stats

    monkeypatch.setattr(replay, "GROUP_STATISTICS", True)
    monkeypatch.setattr(replay, "OVERLAP_STATISTICS", True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torchvision.models.resnet50().layer1, torch.nn.ReLU()).cuda().half().eval()
    xs = [x.half() for x in _cuda_batches((4, 64, 32, 32), [1, 3, 0.5, 2], torch.float32)]
    # (group size, largest tensor that joins a group): the stage's tensors are 512 KiB and 2 MiB,
    # so the last case groups the small ones and launches the large ones alone.
    for group_bytes, tensor_bytes in ((1 << 16, 0), (1 << 30, 0), (1 << 30, 1 << 20)):
        monkeypatch.setattr(triton_stats, "GROUP_BYTES", group_bytes)
        monkeypatch.setattr(triton_stats, "GROUP_TENSOR_BYTES", tensor_bytes)
        with torch.no_grad(), FInspect(model) as probe:
            for x in xs:
                probe.run(x)
        assert probe.mode == "CUDA graph: 1 capture, 2 replays; eager: 2 forwards"
        assert as_rows(probe.report().calls) == merged(eager_reports(model, xs, cuda_graph=False))


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


def test_inference_mode_forwards_are_captured_with_version_counters(overlap):
    """Under ``torch.inference_mode()`` the graph is captured under ``no_grad`` instead: a tensor
    read by two calls is reduced once (fewer rows in the graph than in the eager record, mapped
    back row by row), in-place writes are seen (in-place ReLU, ``out += identity``), the report
    equals the eager one value for value, and the outputs are inference tensors, as eager ones.
    The probe exits outside inference mode, where the graph's rows are folded into the record's."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchvision.models.resnet50().layer1, torch.nn.ReLU()).cuda().half().eval()
    xs = [x.half() for x in _cuda_batches((4, 64, 32, 32), [1, 3, 0.5, 2], torch.float32)]
    with FInspect(model) as probe:  # left outside inference mode: the graph's rows fold in there
        with torch.inference_mode():
            outs = [probe.run(x) for x in xs]
        (record,) = probe._signatures.values()
        assert record.graph_rows is not None and len(record.graph_store.numel) < len(record.numel)
    assert probe.mode == "CUDA graph: 1 capture, 2 replays; eager: 2 forwards"
    assert all(out.is_inference() for out in outs)
    assert as_rows(probe.report().calls) == merged(eager_reports(model, xs, cuda_graph=False))
    with torch.no_grad():
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, model(x), rtol=0, atol=0)


class _ScalesItsInputInPlace(nn.Module):
    """``x.mul_(2)`` on its input: allowed on an inference tensor only inside inference mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x.mul_(2))


def test_a_forward_that_needs_inference_mode_is_captured_in_it(caplog):
    """The capture outside inference mode fails on the in-place update of an inference tensor (no
    data touched: a capture only records); the forward is then captured in inference mode."""
    model = _ScalesItsInputInPlace().cuda().eval()
    xs = _cuda_batches((2, 3, 8, 8), [1, 2, 3, 4], torch.float32)
    with caplog.at_level(logging.INFO, logger="fp16guard"), torch.inference_mode(), FInspect(model) as probe:
        outs = [probe.run(x.clone()) for x in xs]
        (record,) = probe._signatures.values()
        assert record.graph_rows is None
    assert probe.mode == "CUDA graph: 1 capture, 2 replays; eager: 2 forwards"
    assert sum("captures in inference mode" in r.getMessage() for r in caplog.records) == 1
    expected = merged(eager_reports(model, [x.clone() for x in xs], cuda_graph=False))
    assert as_rows(probe.report().calls) == expected
    with torch.no_grad():
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, model(x.clone()), rtol=0, atol=0)


class _BranchesOnInferenceMode(nn.Module):
    """Calls ``self.act`` only in inference mode: other calls outside it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.act(y) if torch.is_inference_mode_enabled() else y.relu()


def test_a_forward_whose_calls_change_outside_inference_mode_is_captured_in_it(caplog):
    model = _BranchesOnInferenceMode().cuda().eval()
    xs = _cuda_batches((2, 3, 8, 8), [1, 2, 3, 4], torch.float32)
    with caplog.at_level(logging.INFO, logger="fp16guard"), torch.inference_mode(), FInspect(model) as probe:
        for x in xs:
            probe.run(x)
        (record,) = probe._signatures.values()
        assert record.captured is not None and record.graph_rows is None
    assert probe.mode == "CUDA graph: 1 capture, 2 replays; eager: 2 forwards"
    assert sum("calls differ" in r.getMessage() for r in caplog.records) == 1
    with torch.inference_mode():
        expected = merged(eager_reports(model, xs, cuda_graph=False))
    assert as_rows(probe.report().calls) == expected
