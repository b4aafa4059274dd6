"""``fix`` always delivers (issue 24): the bar is relative to what FP16 can do for the model.

Two models at the two ends: one whose own FP16 floor is above the 0.07 tolerance (a peaked
384-bin softmax over logits near 1000, where FP16's ulp is 0.5: the fixed, naive and fallback
models are identical and all far above 0.07), which is written with a note instead of refused;
and one whose values fit FP16 after scaling but lose their information there (a residual stream
with a common offset of 1e6 and variations of about 10, read by a LayerNorm: FP16's 11-bit
significand keeps nothing of the variations), where the pure fix misses the bar and the fewest
FP32 islands that meet it are written, never more than the FP32 fallback's.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from fix_cases import OffsetResidual, PeakedSoftmax, vector_inputs

from fp16guard.cli import main
from fp16guard.compare import BAR_FACTOR, BAR_ROUNDOFF
from fp16guard.fixing import fix_model


def _errors(v) -> list[float]:
    return [r.rel_l2 for r in v.rows]


@pytest.mark.parametrize("output", ["onnx", "torch"])
def test_a_model_at_its_own_fp16_floor_is_written_with_a_note(output):
    x = vector_inputs()
    r = fix_model(PeakedSoftmax(), x[:2], validation=x[2:], output=output)
    assert r.delivered == "fixed" and r.refusal is None and r.conversion.fp32_nodes == []
    assert max(_errors(r.verification)) > 0.15  # far above the 0.07 tolerance ...
    assert _errors(r.verification) == pytest.approx(_errors(r.fallback), rel=1e-6)  # ... and so is the fallback
    assert "FP16 floor is above the tolerance 0.07" in r.floor


@pytest.mark.parametrize("output", ["onnx", "torch"])
def test_precision_lost_to_scaling_gets_the_fallbacks_islands_not_a_refusal(output):
    x = vector_inputs()
    r = fix_model(OffsetResidual(), x[:2], validation=x[2:], output=output)
    assert r.delivered in ("islands", "fallback") and "which the fallback model meets" in r.refusal
    for mine, theirs in zip(_errors(r.verification), _errors(r.fallback)):
        assert mine <= BAR_FACTOR * theirs + BAR_ROUNDOFF
    assert 0 < len(r.conversion.fp32_nodes) <= len(r.plan.fallback_fp32)
    assert max(_errors(r.verification)) < 0.01


def test_the_command_writes_both_and_says_why(tmp_path, capsys):
    """``fp16guard fix`` exits 0 for both models, writes them, and prints the floor note and the
    islands it chose."""
    x = vector_inputs(1)[0]
    np.save(tmp_path / "x.npy", x)
    for cls, said in ((PeakedSoftmax, "FP16 floor is above the tolerance"), (OffsetResidual, "pure FP16 missed the bar")):
        path = tmp_path / f"{cls.__name__}.onnx"
        torch.onnx.export(cls().eval(), (torch.from_numpy(x),), str(path), dynamo=False)
        out = tmp_path / f"{cls.__name__}_fixed.onnx"
        assert main(["fix", str(path), "--input", str(tmp_path / "x.npy"), "-o", str(out)]) == 0
        assert said in " ".join(capsys.readouterr().out.split())
        onnx.checker.check_model(onnx.load(out), full_check=True)
