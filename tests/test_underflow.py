"""Large-unit inputs and epsilons FP16 flushes: an audio front end (STFT power, log-mel).

* int16-scale PCM: the power spectrum (~1e12) is scaled and reaches ``log`` scaled; ``log`` is
  closed exactly by adding ``e ln 2`` (no FP32 restore).
* digital silence: ``log(0 + 1e-10)`` is -23 in FP32, ``-inf`` in FP16 (1e-10 is 0 there), at any
  scale that keeps the loud frames in range (their power spans 2^45 over the epsilon's, beyond
  FP16's 2^40): the ``Add`` and the ``Log`` become an FP32 island, listed in the plan.
"""

import numpy as np
import pytest
import torch
from models import LogMelFrontEnd, pcm

from fp16guard.fixing import fix_model

pytestmark = pytest.mark.slow


def _fix(model, scale, silence, tmp_path=None):
    if tmp_path is not None:  # the ONNX path
        path = str(tmp_path / "frontend.onnx")
        torch.onnx.export(model, (torch.from_numpy(pcm(0, scale)),), path, input_names=["pcm"],
                          output_names=["logits"], opset_version=17, dynamo=False)
        model = path
    return fix_model(model, [pcm(i, scale, silence) for i in range(3)],
                     validation=[pcm(i, scale, silence) for i in range(5, 8)])


def _close_to_fallback(result) -> None:
    assert all(not np.isfinite(r.rel_l2) for r in result.naive.rows)
    for fixed, fallback in zip(result.verification.rows, result.fallback.rows):
        assert fixed.rel_l2 <= 1.5 * fallback.rel_l2 + 1e-3


@pytest.mark.parametrize("graph", ["onnx", "torch"])
def test_int16_scale_power_spectrum_reaches_log_scaled_in_pure_fp16(tmp_path, graph):
    result = _fix(LogMelFrontEnd().eval(), 32767.0, False, tmp_path if graph == "onnx" else None)
    _close_to_fallback(result)
    assert result.conversion.fp32_nodes == []
    closed = [n for n in result.notes if "ln 2 added" in n.detail]
    assert len(closed) == 1 and max(r.amax for r in result.plan.regions) > 1e11


@pytest.mark.parametrize("graph", ["onnx", "torch"])
@pytest.mark.parametrize("scale", [1.0, 32767.0])
def test_log_of_silence_plus_a_flushed_epsilon_runs_in_a_listed_fp32_island(tmp_path, graph, scale):
    result = _fix(LogMelFrontEnd().eval(), scale, True, tmp_path if graph == "onnx" else None)
    _close_to_fallback(result)
    island = result.plan.unfixable_nodes
    assert len(island) == 2 and set(island) <= set(result.conversion.fp32_nodes)
    assert "is 0 in FP16" in result.plan.unfixable[0]["reason"]
    assert len(result.conversion.fp32_nodes) == 2  # nothing else: the power spectrum stays scaled FP16
