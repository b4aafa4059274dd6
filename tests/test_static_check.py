import numpy as np
import pytest
import torch
import torch.nn as nn

from fp16guard.inspect.static_check import check_module, check_state_dict, fold_batchnorm


def test_fold_batchnorm_matches_torch_eval_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, eps=1e-3).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(1e3, 5e5)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    scale, shift = fold_batchnorm(bn.weight.detach().numpy(), bn.bias.detach().numpy(),
                                  bn.running_mean.numpy(), bn.running_var.numpy(), bn.eps)
    y = x * torch.from_numpy(scale)[None, :, None, None] + torch.from_numpy(shift)[None, :, None, None]
    torch.testing.assert_close(y, bn.double()(x), rtol=1e-12, atol=1e-12)


def big_var_bn():
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1.0, 2e5, 3e5, 4.0]))
    return nn.Sequential(nn.Conv2d(1, 4, 3), bn)


def test_running_var_overflow_is_an_error_and_fold_is_harmless():
    findings = check_module(big_var_bn())
    by_rule = {(f.rule, f.tensor): f for f in findings}
    over = by_rule[("overflow", "1.running_var")]
    assert over.severity == "error" and over.count == 2 and over.stats.amax == 3e5
    fold = by_rule[("bn_fold", "1.running_var")]
    assert fold.severity == "info" and fold.extra["channels_var_over_fp16"] == 2
    assert fold.extra["scale_amax"] == pytest.approx(1 / np.sqrt(1 + 1e-5))


def test_folded_scale_overflow_is_an_error():
    bn = nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        bn.weight.fill_(10.0)
        bn.running_var.fill_(1e-12)  # scale = 10 / sqrt(1e-5) ~ 3162: fits; make eps tiny too
    bn.eps = 1e-12
    fold = [f for f in check_module(bn) if f.rule == "bn_fold"]
    assert fold and fold[0].severity == "error" and fold[0].extra["scale_amax"] > 65504


def test_tiny_epsilon_constant_flushes_to_zero():
    findings = check_state_dict({"eps": torch.tensor([1e-10]), "w": torch.ones(100)})
    assert [(f.tensor, f.rule, f.count) for f in findings] == [("eps", "flush_to_zero", 1)]


def test_clean_model_has_no_findings():
    torch.manual_seed(0)
    assert check_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()) == []
