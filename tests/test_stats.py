import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fp16guard.fp16 import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, headroom_bits
from fp16guard.stats import CPU_CHUNK, RangeStats, array_stats, tensor_stats


def stats_of(t: torch.Tensor) -> RangeStats:
    return RangeStats.from_row(tensor_stats(t).tolist(), t.numel())


def test_known_values_float32():
    x = torch.tensor([0.0, 1e-9, -3e-6, 2.0, math.inf, math.nan, -7e4, 1e-30])
    s = stats_of(x)
    assert s == RangeStats(amax=70000.0, numel=8, nonfinite=2, nonzero=5, flush_to_zero=2, subnormal=1)
    assert s.overflows and s.out_of_range
    assert s.flush_to_zero_fraction == pytest.approx(2 / 5)


def test_fp16_cast_of_same_values_shows_what_fp16_does():
    # 1e-9 and 1e-30 become 0, -7e4 becomes -inf, -3e-6 stays a subnormal.
    s = stats_of(torch.tensor([0.0, 1e-9, -3e-6, 2.0, math.inf, math.nan, -7e4, 1e-30]).half())
    assert s == RangeStats(amax=2.0, numel=8, nonfinite=3, nonzero=2, flush_to_zero=0, subnormal=1)


def test_empty_tensor():
    assert stats_of(torch.zeros(0)) == RangeStats()


def test_headroom():
    assert headroom_bits(FP16_MAX) == 0.0
    assert headroom_bits(FP16_MAX / 8) == pytest.approx(3.0)
    assert headroom_bits(FP16_MAX * 2) == pytest.approx(-1.0)
    assert headroom_bits(0.0) == math.inf
    assert headroom_bits(math.inf) == -math.inf


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.integers(0, 64), elements=floats))
def test_torch_and_numpy_statistics_agree(a):
    assert stats_of(torch.from_numpy(a)) == array_stats(a)


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(-2.0**20, 2.0**20, width=32)))
def test_overflow_flag_predicts_fp16_cast(a):
    s = array_stats(a)
    with np.errstate(over="ignore"):
        cast_inf = bool(np.isinf(a.astype(np.float16)).any())
    # Conservative: whatever FP16 turns into inf is flagged; (65504, 65520) is flagged but rounds down.
    if cast_inf:
        assert s.overflows
    if s.amax >= 65520:
        assert cast_inf


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(-2.0**-10, 2.0**-10, width=32, allow_subnormal=False)))
def test_flush_to_zero_count_covers_fp16_zeros(a):
    s = array_stats(a)
    became_zero = int(((a != 0) & (a.astype(np.float16) == 0)).sum())
    assert s.flush_to_zero >= became_zero
    assert s.flush_to_zero == int(((a != 0) & (np.abs(a) < 2.0**-24)).sum())


@pytest.mark.parametrize("numel", [CPU_CHUNK + 1, 3 * CPU_CHUNK + 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_the_chunked_cpu_path_gives_the_whole_tensor_numbers(numel, dtype):
    from fp16guard import stats

    assert numel > CPU_CHUNK  # the chunked path
    g = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=g, dtype=torch.float64) * 1e5).to(dtype)
    x[:: 997] = 0
    x[5 :: 1009] = 3e-8  # flushes in FP16
    x[7 :: 1013] = 1e-5  # subnormal in FP16
    x[CPU_CHUNK - 1] = float("nan")
    x[-1] = float("-inf")
    x[CPU_CHUNK] = -6e4  # the largest finite (FP16 too), in the second chunk
    chunked = stats.tensor_stats(x)
    a = x.abs()
    finite = int(torch.isfinite(x).sum())
    zero = int((x == 0).sum())
    want = [float(torch.where(torch.isfinite(a), a, torch.zeros_like(a)).max()), numel - finite, finite - zero,
            int(((a < FP16_MIN_SUBNORMAL) & (a > 0)).sum()),
            int(((a < FP16_MIN_NORMAL) & (a >= FP16_MIN_SUBNORMAL)).sum())]
    assert chunked.tolist() == want


def _torch_stats(x):
    """The whole-tensor torch formula the CPU path replaced (the reference it must equal)."""
    a = x.detach().abs()
    n = a.numel()
    finite = torch.count_nonzero(a <= torch.finfo(a.dtype).max)
    zero = torch.count_nonzero(a == 0)
    tiny = torch.count_nonzero(a < FP16_MIN_SUBNORMAL)
    small = torch.count_nonzero(a < FP16_MIN_NORMAL)
    amax = torch.nan_to_num(a, nan=0.0, posinf=0.0).amax() if n else torch.zeros((), dtype=a.dtype)
    return [float(amax), n - int(finite), int(finite - zero), int(tiny - zero), int(small - tiny)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [0, 1, 1000, CPU_CHUNK, 2 * CPU_CHUNK + 5])
@pytest.mark.parametrize("case", ["finite", "nonfinite", "all-nan", "no-small", "all-zero"])
def test_the_numpy_cpu_path_equals_the_torch_formula(dtype, numel, case):
    """Every dtype (BF16 and FP16 widened to FP32), sizes around the chunk, chunks with NaN/inf
    (then the finite max), chunks whose early exits skip comparisons, and a strided view."""
    g = torch.Generator().manual_seed(numel + len(case))
    x = torch.randn(numel, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-10, 7, (numel,), generator=g)
    x[torch.rand(numel, generator=g) < 0.2] = 0
    if case == "nonfinite":
        x[torch.rand(numel, generator=g) < 0.01] = float("nan")
        x[torch.rand(numel, generator=g) < 0.01] = -float("inf")
    elif case == "all-nan":
        x[:] = float("nan")
    elif case == "no-small":
        x = x.abs() + 1.0
    elif case == "all-zero":
        x[:] = 0.0
    x = x.to(dtype).requires_grad_(dtype != torch.float16 or numel == 0)
    assert tensor_stats(x).tolist() == _torch_stats(x)
    if numel >= 2:
        view = x.detach()[::2]
        assert tensor_stats(view).tolist() == _torch_stats(view)
