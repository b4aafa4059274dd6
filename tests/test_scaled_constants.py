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
from fix_cases import BigWeight, ClampLog, ExpIsland, MelEncoder, SpeechEncoder, positive, power_mel, small_image
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


@pytest.mark.parametrize("graph", ["torch", "onnx"])
@pytest.mark.parametrize("add", [False, True], ids=["clamp", "add"])
def test_a_clamp_bound_or_epsilon_before_a_log_is_never_flushed_by_its_region(graph, add):
    """At 2^-7 the bound would be 2^-30 (0 in FP16) and ``log`` -inf on the calibration inputs
    themselves (before: the fixed model was as non-finite as the naive one); no exponent keeps
    both 1e6 and 2^-23 in FP16, so the clamp (the add) and the log run in FP32, and nothing else."""
    result = _fix(ClampLog(add).eval(), [positive(s) for s in (1, 2)], [positive(s) for s in (3, 4)], graph)
    assert not result.naive.finite
    _within_fallback(result)
    (island,) = result.plan.unfixable
    assert len(island["nodes"]) == 2 and any("log" in n.lower() for n in island["nodes"])
    assert "normal range" in island["reason"]
    assert sorted(result.conversion.fp32_nodes) == sorted(island["nodes"])
    assert [r.exponent for r in result.plan.regions] == [7]


@pytest.mark.parametrize("graph", ["torch", "onnx"])
@pytest.mark.parametrize("gain, exponent, fp32", [(2000.0, 5, 0), (2e4, 7, 1)])
def test_a_weight_scaled_beyond_65504_moves_its_region_or_runs_in_fp32(graph, gain, exponent, fp32):
    """Before: ``RewriteError: rescaled constant ... exceeds 65504``. Weight 2000: the region takes
    2^-5 (2000 x 2^5 = 64000 fits; its values stored at 2.4e4, less headroom, still in range), pure
    FP16. Weight 2e4: no exponent fits both (the values need 2^-4 at least, the weight 2^1 at most),
    so ``conv2`` runs in FP32 with its weight scaled exactly, the region keeps 2^-7. (Its error,
    1.3e-3 against the fallback's 3.8e-5, is the small channel's FP16 rounding times 2e4: the
    fallback keeps conv1 and the relu in FP32 too.)"""
    result = _fix(BigWeight(gain).eval(), [small_image(1), small_image(2)], [small_image(3), small_image(4)], graph)
    assert not result.naive.finite
    if fp32:
        assert result.verification.finite and max(r.rel_l2 for r in result.verification.rows) < 2e-3
    else:
        _within_fallback(result)
    assert [r.exponent for r in result.plan.regions] == [exponent]
    assert len(result.conversion.fp32_nodes) == fp32 == len(result.plan.unfixable_nodes)


# ---------------------------------------------------------------- rescales at island boundaries


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
