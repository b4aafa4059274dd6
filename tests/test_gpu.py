"""GPU-only checks (skipped without CUDA): the Triton reduction agrees with the eager one."""

import math

import pytest
import torch

from fp16guard import FInspect
from fp16guard.stats import RangeStats, tensor_stats

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 4095, 4096, 100_003, 3_000_000])
def test_triton_stats_equal_eager_stats(dtype, n):
    from fp16guard.triton_stats import StatsArena

    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, device="cuda", generator=g) * torch.logspace(-12, 6, n, device="cuda")
    x[:: max(1, n // 7)] = 0
    if n > 10:
        x[3], x[5], x[7] = math.inf, -math.inf, math.nan
        x[9] = 7e4
    x = x.to(dtype)
    arena = StatsArena(x.device, rows=2)
    slots = [arena.reduce(x), arena.reduce(x[: n // 2]), arena.reduce(x[:0])]
    rows = arena.read()
    for slot, part in zip(slots, [x, x[: n // 2], x[:0]]):
        got = RangeStats.from_row(rows[slot], part.numel())
        want = RangeStats.from_row(tensor_stats(part).tolist(), part.numel())
        assert got == want


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
