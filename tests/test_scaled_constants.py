"""Constants checked after scaling, rescales at FP32 island boundaries, graph inputs scaled for precision.

* A constant folded into a scaled region stays in FP16's range (``ScaledConstant`` in
  :mod:`fp16guard.fixing.solver`): ``clamp(h, min=2^-23)`` (or ``h + 1e-7``) inside a region at 2^-7
  would be flushed to 0 and the ``log`` after it -inf where ``h = 0``, so the clamp and the log run
  in FP32; a weight closing a region at 2^7 would pass 65504, so the region takes a smaller
  exponent, or, where none fits, the conv runs in FP32, instead of a ``RewriteError``.
* An FP32 island's output beyond FP16 (``exp``, 3.9e11) is scaled down in FP32, the whole rescale
  chain (2^-26 = 2^-14 * 2^-12) before the cast to FP16.
* A graph input beyond FP16 whose quiet part the headroom target's scale would make subnormal is
  scaled at the exponent that just fits 65504 (a per-frame LayerNorm makes every frame count).

Each fixed model is compared with the FP32 fallback: relative L2 within ``1.5 x fallback + 2^-10``.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import pcm

from fp16guard.fixing import fix_model
from fp16guard.fixing.pipeline import calibrate


def _fix(model, calibration, validation, graph):
    """The pure fix (``force``: no island search), verified beside the naive model and the fallback."""
    return fix_model(model, calibration, validation=validation, output=graph, force=True)


def _within_fallback(result) -> None:
    assert result.verification.finite
    for fixed, fallback in zip(result.verification.rows, result.fallback.rows):
        assert fixed.rel_l2 <= 1.5 * fallback.rel_l2 + 2.0 ** -10, (fixed, fallback)


# ---------------------------------------------------------------- constants checked after scaling


class ClampLog(nn.Module):
    """``fc (x4e5) -> relu -> clamp(min=2^-23) | + 1e-7 -> log -> fc``: half of ``fc``'s rows are
    positive (outputs ~1e6: a region at 2^-7), half negative (the relu's exact zeros, which the
    clamp or the epsilon keeps away from ``log(0)``)."""

    def __init__(self, add: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.add = add
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        with torch.no_grad():
            sign = torch.where(torch.arange(32) % 2 == 0, 1.0, -1.0)[:, None]
            self.fc1.weight.copy_(self.fc1.weight.abs() * sign * 4e5)
            self.fc1.bias.zero_()

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h + 1e-7 if self.add else torch.clamp(h, min=1.19e-7)
        return self.fc2(torch.log(h))


def _positive(seed: int) -> np.ndarray:
    return np.abs(np.random.default_rng(seed).normal(size=(2, 16))).astype(np.float32) + 0.1


@pytest.mark.parametrize("graph", ["torch", "onnx"])
@pytest.mark.parametrize("add", [False, True], ids=["clamp", "add"])
def test_a_clamp_bound_or_epsilon_before_a_log_is_never_flushed_by_its_region(graph, add):
    """At 2^-7 the bound would be 2^-30 (0 in FP16) and ``log`` -inf on the calibration inputs
    themselves (before: the fixed model was as non-finite as the naive one); no exponent keeps
    both 1e6 and 2^-23 in FP16, so the clamp (the add) and the log run in FP32, and nothing else."""
    result = _fix(ClampLog(add).eval(), [_positive(s) for s in (1, 2)], [_positive(s) for s in (3, 4)], graph)
    assert not result.naive.finite
    _within_fallback(result)
    (island,) = result.plan.unfixable
    assert len(island["nodes"]) == 2 and any("log" in n.lower() for n in island["nodes"])
    assert "normal range" in island["reason"]
    assert sorted(result.conversion.fp32_nodes) == sorted(island["nodes"])
    assert [r.exponent for r in result.plan.regions] == [7]


class BigWeight(nn.Module):
    """``conv1`` writes channel 0 at ~7.6e5 and channel 1 at ~1e-2 (one region, 2^-7 by the headroom
    target); ``conv2`` weighs the small channel by up to ``gain`` and feeds a sigmoid (its output
    unscaled), so closing the region at 2^7 makes its weight ``gain * 128``: beyond 65504 (the
    EfficientNetV2 ``conv2d_109`` kind)."""

    def __init__(self, gain: float):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 4, 1)
        with torch.no_grad():
            self.conv1.weight[0].mul_(5e5)
            self.conv1.bias[0].mul_(5e5)
            self.conv1.weight[1].mul_(1e-2)
            self.conv1.bias[1].mul_(1e-2)
            self.conv2.weight[:, 0].mul_(1e-5)
            self.conv2.weight[:, 1] = torch.linspace(-gain, gain, 4)[:, None, None]

    def forward(self, x):
        return torch.sigmoid(self.conv2(torch.relu(self.conv1(x))))


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, 3, 6, 6)).astype(np.float32)


@pytest.mark.parametrize("graph", ["torch", "onnx"])
@pytest.mark.parametrize("gain, exponent, fp32", [(2000.0, 5, 0), (2e4, 7, 1)])
def test_a_weight_scaled_beyond_65504_moves_its_region_or_runs_in_fp32(graph, gain, exponent, fp32):
    """Before: ``RewriteError: rescaled constant ... exceeds 65504``. Weight 2000: the region takes
    2^-5 (2000 x 2^5 = 64000 fits; its values stored at 2.4e4, less headroom, still in range), pure
    FP16. Weight 2e4: no exponent fits both (the values need 2^-4 at least, the weight 2^1 at most),
    so ``conv2`` runs in FP32 with its weight scaled exactly, the region keeps 2^-7. (Its error,
    1.3e-3 against the fallback's 3.8e-5, is the small channel's FP16 rounding times 2e4: the
    fallback keeps conv1 and the relu in FP32 too.)"""
    result = _fix(BigWeight(gain).eval(), [_image(1), _image(2)], [_image(3), _image(4)], graph)
    assert not result.naive.finite
    if fp32:
        assert result.verification.finite and max(r.rel_l2 for r in result.verification.rows) < 2e-3
    else:
        _within_fallback(result)
    assert [r.exponent for r in result.plan.regions] == [exponent]
    assert len(result.conversion.fp32_nodes) == fp32 == len(result.plan.unfixable_nodes)


# ---------------------------------------------------------------- rescales at island boundaries


class ExpIsland(nn.Module):
    """``fc -> exp`` (up to 1.8e11: an FP32 island, stored at 2^-25 after it) then ``e / e.sum()``
    by hand (softmax) or ``log(e)``, which bring it back into range, then ``fc``."""

    def __init__(self, log: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.log = log
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 4)
        with torch.no_grad():
            self.fc1.bias.fill_(25.0)

    def forward(self, x):
        e = torch.exp(self.fc1(x))
        return self.fc2(torch.log(e) if self.log else e / e.sum(-1, keepdim=True))


@pytest.mark.parametrize("graph", ["torch", "onnx"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log"])
def test_an_fp32_islands_output_is_scaled_down_in_fp32_before_its_cast(graph, log):
    """2^-25 is two FP16-exact steps in ONNX (2^-14, 2^-11; 2^-27 for the softmax, whose sum joins the
    region): before, only the first ran in FP32,
    so 1.8e11 x 2^-14 = 1.1e7 was cast to FP16 (inf) before the second step. Every step after the
    island now runs in FP32 with it, merged into one FP32 Mul by 2^-25 in the typed model."""
    x = [np.random.default_rng(s).normal(size=(2, 16)).astype(np.float32) for s in range(4)]
    result = _fix(ExpIsland(log).eval(), x[:2], x[2:], graph)
    assert not result.naive.finite
    _within_fallback(result)
    (region,) = result.plan.regions
    assert region.exponent > 14 and region.amax > 1e11  # 2^-25 (log), 2^-27 (tied with the sum, 8.7e11)
    fp32 = set(result.conversion.fp32_nodes)
    if graph == "onnx":
        steps = [n.name for n in result.rewritten_fp32.graph.node if "__rescale" in n.name]
        typed = [n for n in result.fixed.graph.node if "__rescale" in n.name]
        assert len(steps) == 2 and [n.name for n in typed] == steps[-1:] and steps[-1] in fp32
    assert set(result.plan.unfixable_nodes) < fp32


# ---------------------------------------------------------------- graph inputs: scaled for precision


class SpeechEncoder(nn.Module):
    """wav2vec2-like ('layer' norm mode): conv (k10, s5, no bias) -> LayerNorm -> GELU -> conv (k3, s2)
    -> LayerNorm -> GELU -> linear. PCM [1, T] -> [1, T', 16]."""

    def __init__(self, ch: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.conv0, self.norm0 = nn.Conv1d(1, ch, 10, 5, bias=False), nn.LayerNorm(ch)
        self.conv1, self.norm1 = nn.Conv1d(ch, ch, 3, 2, bias=False), nn.LayerNorm(ch)
        self.proj = nn.Linear(ch, 16)

    def forward(self, x):
        h = F.gelu(self.norm0(self.conv0(x[:, None]).transpose(1, 2))).transpose(1, 2)
        return self.proj(F.gelu(self.norm1(self.conv1(h).transpose(1, 2))))


class MelEncoder(nn.Module):
    """power mel [1, 40, T] -> conv1d -> LayerNorm per frame -> GELU -> linear."""

    def __init__(self, mels: int = 40, ch: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.proj = nn.Conv1d(mels, ch, 3, padding=1), nn.LayerNorm(ch), nn.Linear(ch, 16)

    def forward(self, x):
        return self.proj(F.gelu(self.norm(self.conv(x).transpose(1, 2))))


def power_mel(seed: int, quiet: float = 0.1) -> np.ndarray:
    """[1, 40, 50]: loud frames up to 1e9 (lognormal), frames 20..29 quiet, around ``quiet``."""
    rng = np.random.default_rng(seed)
    x = rng.lognormal(0.0, 1.5, size=(1, 40, 50))
    x = x / x.max() * 1e9
    x[:, :, 20:30] = rng.lognormal(0.0, 1.0, size=(1, 40, 10)) * quiet
    return x.astype(np.float32)


@pytest.mark.parametrize("graph", ["torch", "onnx"])
def test_int16_scale_pcm_through_conv_and_layernorm_is_as_close_as_the_fallback(graph):
    """PCM to 26000 fits FP16 (no scale): pure FP16, 7.6e-4 against the fallback's 6.8e-4."""
    result = _fix(SpeechEncoder().eval(), [pcm(i, 32767.0) for i in range(2)], [pcm(i, 32767.0) for i in (5, 6)], graph)
    _within_fallback(result)
    assert result.conversion.fp32_nodes == []


@pytest.mark.parametrize("graph", ["torch", "onnx"])
def test_a_power_mel_input_is_scaled_to_keep_its_quiet_frames(graph):
    """Quiet frames ~0.1, 2^33 below the loud ones: the headroom target's 2^-17 (loud frames at 7630)
    stores them subnormal, and the per-frame LayerNorm makes each count (relative L2 4.1e-3 against
    the fallback's 4.8e-4); 2^-14, which just fits 65504, keeps 3 more bits of them (1.6e-3). The
    scale runs in FP32, before the input's cast."""
    m = MelEncoder().eval()
    result = _fix(m, [power_mel(i) for i in range(2)], [power_mel(i) for i in (5, 6)], graph)
    assert not result.naive.finite
    _within_fallback(result)
    (region,) = [r for r in result.plan.regions if r.amax >= 1e9 * 0.99]
    assert region.exponent == 14 and region.amax_after <= 65504
    assert len(result.conversion.fp32_nodes) == 1  # the input's rescale, in FP32 before the cast


def test_a_graph_input_keeps_the_headroom_target_where_its_small_values_stay_normal():
    """Quiet frames at 1e3 (2^20 below the loud ones): the headroom target's 2^-17 keeps them normal."""
    plan = calibrate(MelEncoder().eval(), [power_mel(i, quiet=1e3) for i in range(2)])
    assert [r.exponent for r in plan.regions if r.amax >= 1e9 * 0.99] == [17]
