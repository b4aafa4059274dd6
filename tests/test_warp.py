"""Property tests of fp16guard.fixing.warp: the warp identities, bitwise folding, and the FP16 point.

Tolerances (float32, unit roundoff u = 2**-24). For one output element let S = sum |W||x| over its
n products and b its bias. Any summation order (blocked, FMA) gives
|fl(W x + b) - (W x + b)| <= gamma_{n+1} (S + |b|), gamma_m = m u / (1 - m u) (Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., eq. 3.5). For warp_conv, conv(x / F) is evaluated on
x / F (exact) and has error <= gamma_{n+1} (S / F + |b|); "* F" is exact and multiplies that by F;
fl((F - 1) b) adds u (F - 1)|b|; the final subtraction adds u |result| <= u (S + |b|). Altogether
|warp_conv - exact| <= (n + 4) u (S + (F + 1)|b|) =: tol. The sum part is NOT F times worse (the
/F and *F cancel); only the bias part grows with F (cancellation). conv(x) meets the same tol, so
|warp_conv - conv(x)| <= 2 tol. S is computed elementwise by running the float64 layer with |W|, no
bias, on |x|. The exact value is the float64 layer on the same float32 data.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fp16guard.fixing.warp import scaled_conv, scaled_linear, warp_bn, warp_conv, warp_linear
from fp16guard.fp16 import FP16_MAX

U32 = 2.0 ** -24  # float32 unit roundoff (eps32 / 2)
U16 = 2.0 ** -11  # float16 unit roundoff

CONVS = {(False, 1): nn.Conv1d, (False, 2): nn.Conv2d, (False, 3): nn.Conv3d,
         (True, 1): nn.ConvTranspose1d, (True, 2): nn.ConvTranspose2d, (True, 3): nn.ConvTranspose3d}

many = settings(max_examples=500, deadline=None)


def randn(gen: torch.Generator, shape, exponent: int) -> torch.Tensor:
    """Standard normal float32 data times 10**exponent."""
    return torch.randn(*shape, generator=gen) * 10.0 ** exponent


def n_terms(m: nn.Module) -> int:
    """Products per output element (upper bound): the n of the error bound."""
    w = m.weight
    if isinstance(m, nn.Linear):
        return w.shape[1]
    if m.transposed:  # weight [C_in, C_out / groups, *k]: an output sees C_in / groups channels
        return w.shape[0] // m.groups * math.prod(w.shape[2:])
    return w[0].numel()


def exact_and_sum(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m(x) in float64, sum |W||x| per output element in float64)."""
    m64 = copy.deepcopy(m).double()
    exact = m64(x.double())
    with torch.no_grad():
        m64.weight.abs_()
        m64.bias = None
    return exact, m64(x.double().abs())


def worst_ratio(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> float:
    """max |actual - expected| / tol (0/0 counts as 0): <= 1 means within tolerance."""
    err = (actual.double() - expected.double()).abs()
    assert torch.isfinite(err).all()
    return float(torch.where(err == 0, 0.0, err / tol).max())


def check_warp_linear_layer(m: nn.Module, x: torch.Tensor, f: float, warped: torch.Tensor) -> float:
    """warped == m(x): within tol of the exact value, and within 2 tol of float32 m(x).

    Returns the worst ratio error / tol of ``warped`` against the exact value (<= 1 when it passes)."""
    ref = m(x)
    assert warped.shape == ref.shape and warped.dtype == ref.dtype
    exact, s = exact_and_sum(m, x)
    if m.bias is None:
        b = 0.0
    elif isinstance(m, nn.Linear):
        b = m.bias.double().abs()
    else:
        b = m.bias.double().abs().view(-1, *[1] * len(m.kernel_size))
    tol = (n_terms(m) + 4) * U32 * (s + (f + 1) * b)
    assert worst_ratio(ref, exact, tol) <= 1.0  # the bound is sound for the plain layer
    ratio = worst_ratio(warped, exact, tol)
    assert ratio <= 1.0
    assert worst_ratio(warped, ref, 2 * tol) <= 1.0
    return ratio


@st.composite
def conv_cases(draw, dims=(1, 2), transposed=(False,), max_spatial=9):
    t = draw(st.sampled_from(transposed))
    d = draw(st.sampled_from(dims))
    groups = draw(st.integers(1, 4))
    cin = groups * draw(st.integers(1, 8 // groups))
    cout = groups * draw(st.integers(1, 8 // groups))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    pad = draw(st.integers(0, 1))
    # output size >= 1: conv needs L + 2p >= k; transposed needs (L - 1) s + k - 2p >= 1.
    lo = max(1, k - 2 * pad) if not t else max(1, 1 + -(-(2 * pad + 1 - k) // stride))
    spatial = draw(st.lists(st.integers(lo, max(lo, max_spatial)), min_size=d, max_size=d))
    return dict(
        cls=CONVS[(t, d)], cin=cin, cout=cout, k=k, stride=stride, pad=pad, groups=groups,
        bias=draw(st.booleans()), batch=draw(st.integers(1, 2)), spatial=spatial,
        k2=draw(st.integers(0, 10)), seed=draw(st.integers(0, 2**32 - 1)),
        ew=draw(st.integers(-3, 3)), ex=draw(st.integers(-3, 3)), eb=draw(st.integers(-3, 3)))


def build_conv(c: dict, exponents=None) -> tuple[nn.Module, torch.Tensor]:
    gen = torch.Generator().manual_seed(c["seed"])
    conv = c["cls"](c["cin"], c["cout"], c["k"], stride=c["stride"], padding=c["pad"],
                    groups=c["groups"], bias=c["bias"])
    ew, ex, eb = exponents or (c["ew"], c["ex"], c["eb"])
    with torch.no_grad():
        conv.weight.copy_(randn(gen, conv.weight.shape, ew))
        if conv.bias is not None:
            conv.bias.copy_(randn(gen, conv.bias.shape, eb))
    return conv, randn(gen, (c["batch"], c["cin"], *c["spatial"]), ex)


def warp_conv_ratio(c: dict) -> float:
    """Build the case's conv and input, and check warp_conv against it (:func:`check_warp_linear_layer`)."""
    conv, x = build_conv(c)
    f = 2 ** c["k2"]
    with torch.no_grad():
        return check_warp_linear_layer(conv, x, f, warp_conv(x, conv, f))


@many
@given(conv_cases(dims=(1, 2)))
@pytest.mark.slow
def test_warp_conv_equals_conv(c):
    assert warp_conv_ratio(c) <= 1.0


@pytest.mark.slow
@many
@given(conv_cases(dims=(2,), transposed=(True,), max_spatial=5))
def test_warp_conv_transpose2d_equals_conv(c):
    assert warp_conv_ratio(c) <= 1.0


@many
@given(conv_cases(dims=(3, 1), transposed=(False, True), max_spatial=4))
@pytest.mark.slow
def test_warp_conv_3d_and_transpose1d(c):
    assert warp_conv_ratio(c) <= 1.0


@many
@given(st.integers(1, 32), st.integers(1, 8), st.lists(st.integers(1, 3), max_size=2), st.booleans(),
       st.integers(0, 10), st.integers(0, 2**32 - 1), st.integers(-3, 3), st.integers(-3, 3),
       st.integers(-3, 3))
@pytest.mark.slow
def test_warp_linear_equals_linear(n_in, n_out, lead, bias, k2, seed, ew, ex, eb):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(randn(gen, lin.weight.shape, ew))
        if bias:
            lin.bias.copy_(randn(gen, (n_out,), eb))
    x = randn(gen, (*lead, n_in), ex)
    with torch.no_grad():
        assert check_warp_linear_layer(lin, x, 2 ** k2, warp_linear(x, lin, 2 ** k2)) <= 1.0


@many
@given(st.sampled_from([(1, 0), (1, 1), (2, 2), (3, 3)]), st.integers(1, 8), st.integers(1, 3),
       st.booleans(), st.sampled_from([1e-5, 1e-3]), st.integers(0, 10), st.integers(0, 2**32 - 1),
       st.integers(-2, 3), st.integers(-2, 4), st.integers(-2, 2), st.integers(-2, 2))
@torch.no_grad()
@pytest.mark.slow
def test_warp_bn_equals_bn(kind, c, batch, affine, eps, k2, seed, em, ex, eg, eb):
    dims, n_spatial = kind
    gen = torch.Generator().manual_seed(seed)
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dims - 1](c, eps=eps, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.copy_(randn(gen, (c,), em))
        bn.running_var.copy_(10.0 ** (torch.rand(c, generator=gen) * 12 - 4))  # 1e-4 .. 1e8
        if affine:
            bn.weight.copy_(randn(gen, (c,), eg))
            bn.bias.copy_(randn(gen, (c,), eb))
    x = randn(gen, (batch, c, *[3] * n_spatial), ex) + bn.running_mean.view(-1, *[1] * n_spatial)
    f = 2 ** k2
    with torch.no_grad():
        ref, got = bn(x), warp_bn(x, bn, f)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # Exact: float64 affine map. Error of bn(x / F) in float32 (PyTorch CPU: x * alpha + beta with
    # alpha = gamma / sqrt(var + eps), beta = bias - mean * alpha, each a few roundings) is about
    # 4u|x scale| / F + 4u(|beta| + |mean scale|); times F, plus u F |shift| for the cast
    # (F - 1) shift and u |y| for the subtraction: 8u (|x scale| + F (|beta| + |mean scale|) + |y|).
    g = bn.weight.double() if affine else torch.ones(c, dtype=torch.float64)
    be = bn.bias.double() if affine else torch.zeros(c, dtype=torch.float64)
    scale = g / torch.sqrt(bn.running_var.double() + eps)
    shape = (-1, *[1] * n_spatial)
    exact = x.double() * scale.view(shape) + (be - bn.running_mean.double() * scale).view(shape)
    big = (be.abs() + (bn.running_mean.double() * scale).abs()).view(shape)
    tol = 8 * U32 * ((x.double() * scale.view(shape)).abs() + f * big + exact.abs())
    assert worst_ratio(ref, exact, tol) <= 1.0
    assert worst_ratio(got, exact, tol) <= 1.0
    assert worst_ratio(got, ref, 2 * tol) <= 1.0


# Bitwise: folding powers of two commutes with rounding. Every float op inside the layer sees
# operands that are the original ones times 2**(a-b) (weights), 2**-a (inputs), 2**-b (products,
# partial sums, bias), so each rounds to the original result times 2**-b: the same kernel on the
# same shapes gives the same bits. Magnitudes 1e-2..1e2 and |a|, |b| <= 6 keep everything far from
# float32's subnormal range (1e-38) and overflow.

@many
@given(conv_cases(dims=(1, 2, 3), transposed=(False, True), max_spatial=5),
       st.integers(-6, 6), st.integers(-6, 6), st.tuples(*[st.integers(-2, 2)] * 3))
@pytest.mark.slow
def test_scaled_conv_is_bitwise_exact(c, a, b, mags):
    conv, x = build_conv(c, mags)
    xs = x * 2.0 ** -a
    assert torch.equal(xs * 2.0 ** a, x)  # input scaling exact (nothing subnormal)
    with torch.no_grad():
        ref = conv(x)
        got = scaled_conv(conv, a, b)(xs) * 2.0 ** b
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


@many
@given(st.integers(1, 64), st.integers(1, 16), st.integers(1, 4), st.booleans(), st.integers(-6, 6),
       st.integers(-6, 6), st.integers(0, 2**32 - 1), st.tuples(*[st.integers(-2, 2)] * 3))
def test_scaled_linear_is_bitwise_exact(n_in, n_out, batch, bias, a, b, seed, mags):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(randn(gen, lin.weight.shape, mags[0]))
        if bias:
            lin.bias.copy_(randn(gen, (n_out,), mags[2]))
        x = randn(gen, (batch, n_in), mags[1])
        ref = lin(x)
        got = scaled_linear(lin, a, b)(x * 2.0 ** -a) * 2.0 ** b
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


def test_scaled_weights_follow_the_folding_convention():
    conv = nn.Conv2d(3, 4, 3)
    s = scaled_conv(conv, 2, 5)
    assert torch.equal(s.weight, conv.weight * 2.0 ** -3)
    assert torch.equal(s.bias, conv.bias * 2.0 ** -5)
    lin = nn.Linear(3, 2, bias=False)
    assert torch.equal(scaled_linear(lin, -1, 4).weight, lin.weight * 2.0 ** -5)
    assert scaled_linear(lin, -1, 4).bias is None


def overflowing_conv() -> tuple[nn.Conv2d, torch.Tensor]:
    """A conv whose FP32 output peaks near 2.6e5 (4x FP16's 65504) on positive data."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(1400 + 100 * torch.rand(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.tensor([3.0, -5.0, 0.5, 10.0]))
    return conv, 2 + torch.rand(1, 8, 6, 6, generator=gen)


@torch.no_grad()
def test_fp16_overflow_is_real_and_the_warped_conv_stays_in_range():
    conv, x = overflowing_conv()
    ref = conv(x)
    assert FP16_MAX < ref.abs().max() < 8 * FP16_MAX
    conv16, x16 = copy.deepcopy(conv).half(), x.half()  # CPU half conv (accumulates in FP32)
    assert torch.isinf(conv16(x16)).any()  # plain FP16 conv overflows

    mid = conv16(x16 / 8)  # warp_conv's intermediate, F = 8
    assert torch.isfinite(mid).all() and mid.abs().max() <= FP16_MAX
    # All products are positive, so the relative error is that of rounding x and W to FP16 (u16
    # each) plus rounding the output (u16): 3 u16, plus 1 u16 margin. Restore in FP32.
    restored = mid.float() * 8 - 7 * conv.bias.view(-1, 1, 1)
    torch.testing.assert_close(restored, ref, rtol=4 * U16, atol=0)
    # Folded form: the factor travels as out_exponent 3 instead of being undone in FP16.
    folded = scaled_conv(conv, 0, 3).half()(x16)
    assert torch.isfinite(folded).all()
    torch.testing.assert_close(folded.float() * 8, ref, rtol=4 * U16, atol=0)
    # The restore itself cannot fit FP16: conv(x) does not, so all-FP16 warp_conv is inf too.
    assert torch.isinf(warp_conv(x16, conv16, 8)).any()
    # ...and in FP32 warp_conv is conv(x).
    torch.testing.assert_close(warp_conv(x, conv, 8), ref, rtol=1e-6, atol=0)


@torch.no_grad()
def test_tolerance_catches_an_off_by_one_bias():
    """The bounds above are tight enough to see a warp that forgets to cancel one bias."""
    conv, x = overflowing_conv()
    x = x - 2.5  # mixed signs: sums and bias of comparable size
    f = 64
    wrong = conv(x / f) * f - f * conv.bias.view(-1, 1, 1)  # conv(x) - b
    with pytest.raises(AssertionError):
        check_warp_linear_layer(conv, x, f, wrong)
    check_warp_linear_layer(conv, x, f, warp_conv(x, conv, f))


@torch.no_grad()
def test_unbatched_input_and_no_bias():
    conv = nn.Conv2d(3, 5, 3)
    x = torch.randn(3, 7, 7)  # [C, H, W]: the channel dim is 0, not 1
    check_warp_linear_layer(conv, x, 16, warp_conv(x, conv, 16))
    conv.bias = None
    assert torch.equal(warp_conv(x, conv, 16), conv(x / 16) * 16)
    bn = nn.BatchNorm1d(4).eval()
    bn.running_mean.fill_(3.0)
    x = torch.randn(2, 4)  # [N, C]
    torch.testing.assert_close(warp_bn(x, bn, 4), bn(x))


BAD_FACTORS = [3, 0, -2, 0.5, 2 ** -3, 6.0, -8, True, math.inf, math.nan, "8", 2 ** 1100, None]


@pytest.mark.parametrize("factor", BAD_FACTORS, ids=repr)
def test_bad_factor_raises(factor):
    x = torch.randn(1, 2, 4, 4)
    msg = re.escape(f"factor must be a power of two >= 1, got {factor!r}")
    with pytest.raises(ValueError, match=msg):
        warp_conv(x, nn.Conv2d(2, 2, 1), factor)
    with pytest.raises(ValueError, match=msg):
        warp_bn(x, nn.BatchNorm2d(2).eval(), factor)
    with pytest.raises(ValueError, match=msg):
        warp_linear(x, nn.Linear(4, 3), factor)


def test_bad_factor_message_is_exact():
    with pytest.raises(ValueError) as e:
        warp_linear(torch.ones(2), nn.Linear(2, 2), 3)
    assert str(e.value) == "factor must be a power of two >= 1, got 3"


@pytest.mark.parametrize("factor", [1, 2, 32, 2.0 ** 20, np.int64(8), np.float64(16.0)], ids=repr)
@torch.no_grad()
def test_good_factors(factor):
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(warp_linear(x, lin, factor), lin(x), rtol=1e-5, atol=1e-5 * float(factor))


def test_bn_in_training_mode_or_without_running_stats_raises():
    x = torch.randn(2, 3, 4, 4)
    bn = nn.BatchNorm2d(3)  # training mode by default
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3.*eval mode"):
        warp_bn(x, bn, 8)
    with pytest.raises(ValueError, match="running statistics"):
        warp_bn(x, nn.BatchNorm2d(3, track_running_stats=False).eval(), 8)


def test_wrong_module_type_raises():
    with pytest.raises(TypeError, match="got Linear"):
        warp_conv(torch.randn(1, 4), nn.Linear(4, 4), 2)
    with pytest.raises(TypeError, match="got Conv2d"):
        warp_linear(torch.randn(1, 4, 2, 2), nn.Conv2d(4, 4, 1), 2)
    with pytest.raises(TypeError, match="got LayerNorm"):
        warp_bn(torch.randn(1, 4), nn.LayerNorm(4), 2)
    with pytest.raises(TypeError):
        scaled_conv(nn.Linear(2, 2), 0, 1)
    with pytest.raises(TypeError):
        scaled_linear(nn.Conv1d(2, 2, 1), 0, 1)


def test_scaled_bad_exponents_and_overflow_raise():
    with pytest.raises(ValueError, match="in_exponent must be an integer"):
        scaled_conv(nn.Conv1d(2, 2, 1), 1.5, 0)
    with pytest.raises(ValueError, match="out_exponent must be an integer"):
        scaled_linear(nn.Linear(2, 2), 0, 2.0)
    conv = nn.Conv1d(2, 2, 1).half()
    with torch.no_grad():
        conv.weight.fill_(1000.0)
    with pytest.raises(ValueError, match=r"2\*\*7 overflows torch.float16"):
        scaled_conv(conv, 7, 0)  # 1000 * 128 > 65504


def bits(module: nn.Module) -> dict:
    return {k: v.detach().clone().numpy().tobytes() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(3, 4, 3), (1, 3, 5, 5)), (lambda: nn.ConvTranspose2d(4, 2, 2, groups=2), (1, 4, 3, 3)),
    (lambda: nn.Conv1d(2, 2, 1, bias=False), (1, 2, 4)), (lambda: nn.Linear(5, 3), (2, 5))])
def test_modules_are_not_modified(make, shape):
    m = make()
    before = bits(m)
    x = torch.randn(shape)
    fold = scaled_linear if isinstance(m, nn.Linear) else scaled_conv
    s = fold(m, 3, -2)
    (warp_linear if isinstance(m, nn.Linear) else warp_conv)(x, m, 8)
    assert bits(m) == before
    assert type(s) is type(m) and s.weight.data_ptr() != m.weight.data_ptr()
    assert not torch.equal(s.weight, m.weight)  # the copy was scaled, the original was not
    bn = nn.BatchNorm2d(3).eval()
    bn.running_var.fill_(4.0)
    before = bits(bn)
    warp_bn(torch.randn(1, 3, 2, 2), bn, 8)
    assert bits(bn) == before and not bn.training
