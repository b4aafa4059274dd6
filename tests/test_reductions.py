"""Reductions over large axes (NVIDIA/TensorRT #1954 #4772, onnxconverter-common #323): a softmax
written by hand, an L2 normalization and a root of a sum of squares over 2^18 values."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fp16guard.fixing import fix_model

pytestmark = pytest.mark.slow


class LargeReductions(nn.Module):
    """x float32 [1, 4096, 64] -> (probabilities [1, 64], normalized values x100 [1, 64], root of
    the sum of squares [1]). The sums reach ~1e6 (exp) and ~8e5 (squares): beyond FP16."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        h = self.proj(x)
        e = torch.exp(h - 3)  # no max subtracted, as some exports write it
        p = e / e.sum(dim=(1, 2), keepdim=True)
        n = F.normalize(h.flatten(1), dim=1)
        return p.sum(1), n[:, :64] * 100, (h * h).sum(dim=(1, 2)).sqrt()


def _x(seed):
    return np.random.default_rng(seed).normal(size=(1, 4096, 64)).astype(np.float32) * 3


@pytest.mark.parametrize("output", ["torch", "onnx"])
def test_sums_beyond_fp16_over_large_axes_are_scaled_and_a_root_reads_its_sum_scaled(output):
    result = fix_model(LargeReductions().eval(), [_x(0), _x(1)], validation=[_x(2), _x(3)], output=output)
    assert all(not np.isfinite(r.rel_l2) for r in result.naive.rows)
    for fixed, fallback in zip(result.verification.rows, result.fallback.rows):
        assert fixed.rel_l2 <= 1.5 * fallback.rel_l2 + 1e-3
    # sqrt reads the sum of squares (8e5) scaled and is rescaled after it: no FP32 island, only the
    # restore of a graph output on the FP32 side of its cast
    assert result.plan.unfixable == [] and len(result.conversion.fp32_nodes) <= 1
