"""GPU-only checks (skipped without CUDA): the Triton reduction agrees with the eager one."""

import math

import pytest
import torch

from fp16guard import FInspect
from fp16guard.stats import RangeStats, tensor_stats

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["partials", "atomic"])
def reduction(request, monkeypatch):
    """Both ways a program's numbers reach its row (fp16guard.inspect.triton_stats.REDUCTION)."""
    import fp16guard.inspect.triton_stats as T

    monkeypatch.setattr(T, "REDUCTION", request.param)
    return request.param


@pytest.mark.parametrize("direct", [True, False], ids=["direct-launch", "triton-launch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 4095, 4096, 100_003, 3_000_000])
def test_triton_stats_equal_eager_stats(dtype, n, direct, reduction):
    from fp16guard.inspect.triton_stats import StatsArena


    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, device="cuda", generator=g) * torch.logspace(-12, 6, n, device="cuda")
    x[:: max(1, n // 7)] = 0
    if n > 10:
        x[3], x[5], x[7] = math.inf, -math.inf, math.nan
        x[9] = 7e4
    x = x.to(dtype)
    arena = StatsArena(x.device, rows=2, direct=direct)
    # whole, a prefix, empty, and an unaligned view (its own specialization); each twice, so the
    # second launch of every specialization goes through the direct launcher
    parts = [x, x[: n // 2], x[:0], x[1:]] * 2
    slots = [arena.reduce(p) for p in parts]
    rows = arena.read()
    for slot, part in zip(slots, parts):
        got = RangeStats.from_row(rows[slot], part.numel())
        want = RangeStats.from_row(tensor_stats(part).tolist(), part.numel())
        assert got == want


@pytest.mark.parametrize("direct", [True, False], ids=["direct-launch", "triton-launch"])
def test_triton_stats_past_2_30_elements_use_wide_offsets(direct, reduction):
    """A 2 GB FP16 tensor of 2**30 + 3 elements (64-bit offsets), with the values that matter
    planted past element 2**30, before and after a small tensor (32-bit offsets) of the same dtype."""
    from fp16guard.inspect.triton_stats import WIDE_ABOVE, StatsArena

    n = 2**30 + 3
    x = torch.full((n,), 0.5, dtype=torch.float16, device="cuda")
    x[-1], x[-2], x[-3] = 6e4, math.nan, 1e-6  # amax, non-finite, subnormal: all past 2**30
    small = x[-1000:].clone()
    assert n > WIDE_ABOVE >= small.numel()
    arena = StatsArena(x.device, direct=direct)
    parts = [small, x, small, x]
    slots = [arena.reduce(p) for p in parts]
    rows = arena.read()
    for slot, part in zip(slots, parts):
        want = RangeStats.from_row(tensor_stats(part).tolist(), part.numel())
        assert RangeStats.from_row(rows[slot], part.numel()) == want
    amax, nonfinite = rows[slots[1]][:2]
    assert amax == float(torch.tensor(6e4, dtype=torch.float16)) and nonfinite == 1  # the planted values


def test_fused_and_eager_reports_agree_on_a_conv_net():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(inplace=True),
                                torch.nn.Conv2d(16, 4, 3)).cuda().eval().half()
    x = torch.randn(2, 3, 32, 32, device="cuda").half() * 1e3
    reports = []
    for fused in (True, False):
        with torch.no_grad(), FInspect(model, fused=fused) as probe:
            model(x)
        reports.append(probe.report())
    assert reports[0].calls == reports[1].calls


def test_channels_last_and_strided_tensors_are_measured_whole():
    from fp16guard.inspect.triton_stats import StatsArena

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 8, 16, 16, device="cuda", generator=g) * 1e3
    x[1, 2, 3, 4] = 9e4
    parts = [x.to(memory_format=torch.channels_last), x[:, ::2], x.transpose(2, 3)]
    arena = StatsArena(x.device)
    slots = [arena.reduce(p) for p in parts * 2]
    rows = arena.read()
    for slot, part in zip(slots, parts * 2):
        want = RangeStats.from_row(tensor_stats(part).tolist(), part.numel())
        assert RangeStats.from_row(rows[slot], part.numel()) == want
    assert rows[slots[0]][0] == pytest.approx(9e4, rel=1e-6)


def _ort_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDA EP) is not installed")


def _example(name: str):
    """A bundled example with its weights, or a skip naming why they cannot be had here (the lent GPU
    machine has no network: run ``fp16guard fetch-examples`` where there is one and carry the cache)."""
    from fp16guard.errors import AssetError
    from fp16guard.examples import get_example

    ex = get_example(name)
    try:
        ex.load()
    except AssetError as e:
        pytest.skip(f"{name}: {e}")
    return ex


def test_bisect_crepe_real_fp16_kernels_agree_with_the_emulation():
    """torch (FP16 CUDA module) and onnxruntime (CUDA EP) name the same module as emulate."""
    from fp16guard.bisection import bisect

    ex = _example("crepe-full")
    model, inputs = ex.load(), ex.inputs()
    verdicts = {}
    for backend in ("emulate", "torch"):
        verdicts[backend] = [o.name for o in bisect(model, inputs, backend=backend).offenders]
    assert verdicts["torch"] == verdicts["emulate"] == ["conv2_BN"]
    _ort_cuda()
    assert [o.name for o in bisect(model, inputs, backend="onnxruntime").offenders] == ["conv2_BN"]


def test_bisect_ppocr_on_the_cuda_ep_agrees_with_the_emulation():
    _ort_cuda()
    from fp16guard.bisection import bisect

    ex = _example("ppocr-det")
    inputs = ex.inputs()[:1]
    names = {b: [o.name for o in bisect(ex.load(), inputs, backend=b).offenders] for b in ("emulate", "onnxruntime")}
    assert names["onnxruntime"] == names["emulate"] == ["p2o.BatchNormalization.1"]


def test_fixed_crepe_program_on_real_fp16_cuda_kernels_matches_the_emulation():
    """The .pt2 program fp16guard fix writes for crepe-full, run by PyTorch's FP16 CUDA kernels."""
    from fp16guard.fixing import fix_model

    ex = _example("crepe-full")
    runs = {b: fix_model(ex.load(), ex.calibration(), validation=ex.validation(), metrics=ex.task_metrics,
                         backend=b) for b in ("emulate", "torch")}
    assert runs["torch"].plan.exponents == runs["emulate"].plan.exponents
    for cuda_row, emu_row in zip(runs["torch"].verification.rows, runs["emulate"].verification.rows):
        assert cuda_row.nonfinite == 0 and cuda_row.task["pitch_within_1_bin"] >= 0.99
        assert cuda_row.task["1-max_prob_error"] >= 0.99
        assert cuda_row.rel_l2 < 3 * emu_row.rel_l2 + 1e-4
    assert min(r.task["1-max_prob_error"] for r in runs["torch"].naive.rows) < 0.9


def test_arena_slots_accumulate_and_compact(reduction):
    """Reducing twice into one slot adds (what a graph replay does); compaction keeps the rows."""
    from fp16guard.inspect.triton_stats import StatsArena

    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(n, device="cuda", generator=g).half() * s for n, s in ((5000, 1e3), (77, 1e-6), (10**6, 3))]
    arena = StatsArena(torch.device("cuda"), rows=2)
    first = [arena.reduce(x) for x in xs[:2]]
    arena.compact()
    third = arena.reduce(xs[2])
    rows = arena.read()
    want = [RangeStats.from_row(tensor_stats(x).tolist(), x.numel()) for x in xs]
    assert [RangeStats.from_row(rows[s], x.numel()) for s, x in zip(first + [third], xs)] == want
    arena.clear()
    arena.reserve(1)
    arena.reduce(xs[0])
    arena.used = 0  # reduce into slot 0 again: the numbers add up
    arena.reduce(xs[0])
    twice = RangeStats.from_row(arena.read()[0], 2 * xs[0].numel())
    assert twice == RangeStats.merge([want[0], want[0]])
