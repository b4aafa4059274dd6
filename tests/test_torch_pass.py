"""The PyTorch rewriter (:mod:`fp16guard.fixing.torch_pass`): BatchNorm folding and power-of-two
scale regions on a torch.export graph, the typed FP16 program, its FP16 emulation, and
`fp16guard fix ... -o OUT.pt2`."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from fix_cases import rms_norm_net
from hypothesis import given, settings
from hypothesis import strategies as st

import fp16guard
from fp16guard.cli import main
from fp16guard.errors import FixError, PlanError
from fp16guard.fixing import torch_pass as tr
from fp16guard.fixing.pipeline import apply_plan, calibrate, calibrate_target, fix_model
from fp16guard.fixing.solver import complete
from fp16guard.fixing.solver_model import Role
from fp16guard.fixing.targets import TorchFixTarget
from fp16guard.inputs import NamedInput
from fp16guard.torch_graph import capture


class Residual(nn.Module):
    """conv1 -> relu -> add(relu, conv1) -> maxpool -> conv2: one tied region from conv1 to conv2."""

    def __init__(self, c=4, cin=3):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(nn.functional.max_pool2d(torch.relu(y) + y, 2))


class ConvBN(nn.Module):
    """conv -> BN (folded into the conv) -> relu -> BN (no conv before it: scale and shift)."""

    def __init__(self, c=4, cin=3):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn2(torch.relu(self.bn1(self.conv(x))))


def _x(seed=1, shape=(1, 3, 8, 8)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _captured(module, shape=(1, 3, 8, 8)):
    x = torch.from_numpy(_x(0, shape))
    gm = capture(module.eval(), [(x,)])
    return tr.annotate(gm, (x,))


def _with_params(gm, params):
    """A copy of ``gm`` whose constants are ``params`` (``{get_attr target: tensor}``)."""
    gm = copy.deepcopy(gm)
    for target, value in params.items():
        owner, _, name = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        setattr(mod, name, nn.Parameter(value, requires_grad=False) if isinstance(getattr(mod, name), nn.Parameter)
                else value)
    return gm


_RESIDUAL = _captured(Residual())
_CONVBN = _captured(ConvBN())


# ---------------------------------------------------------------- properties of the rewrites

@settings(max_examples=500, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 12))
@pytest.mark.slow
def test_power_of_two_region_is_bitwise_exact_in_fp32(seed, k):
    rng = np.random.default_rng(seed)
    params = {"conv1.weight": rng.normal(size=(4, 3, 3, 3)), "conv1.bias": rng.normal(size=4),
              "conv2.weight": rng.normal(size=(2, 4, 1, 1)), "conv2.bias": rng.normal(size=2)}
    gm = _with_params(_RESIDUAL, {t: torch.tensor(v, dtype=torch.float32) for t, v in params.items()})
    ops = tr.scale_ops(gm)
    region = {op.name for op in ops if op.role is Role.TIED} | {"conv2d"}
    sol = complete(ops, {t: k for t in region}, graph_outputs=tr.graph_io(gm)[1])
    assert not sol.rescales  # conv1 opens the region, conv2 closes it: no extra op
    scaled, _ = tr.apply_exponents(gm, sol)
    x = torch.from_numpy(_x(seed % 1000))
    with torch.no_grad():
        assert torch.equal(scaled(x)[0], gm(x)[0])
        # the stored activation inside the region is the true one divided by 2^k
        inner = dict(tr.activation_amax(scaled, [(x,)]))["max_pool2d"]
        assert inner == pytest.approx(tr.activation_amax(gm, [(x,)])["max_pool2d"] * 2.0**-k, rel=0, abs=0)


@settings(max_examples=500, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), var_log10=st.floats(-2, 9))
@pytest.mark.slow
def test_batchnorm_folding_is_exact_within_fp32_rounding(seed, var_log10):
    rng = np.random.default_rng(seed)
    c = 4
    p = {"conv.weight": rng.normal(size=(c, 3, 3, 3)), "conv.bias": rng.normal(size=c)}
    for bn in ("bn1", "bn2"):
        p.update({f"{bn}.weight": rng.uniform(0.1, 3, c), f"{bn}.bias": rng.normal(size=c),
                  f"{bn}.running_mean": rng.normal(size=c), f"{bn}.running_var": 10 ** (var_log10 + rng.uniform(-1, 1, c))})
    gm = _with_params(_CONVBN, {t: torch.tensor(v, dtype=torch.float32) for t, v in p.items()})
    folded, notes = tr.fold_batchnorms(gm)
    assert sorted(n.kind for n in notes) in (["batchnorm_to_affine", "fold_batchnorm"],
                                              ["batchnorm_to_affine", "batchnorm_to_affine"])
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes if n.op == "call_function")
    x = torch.from_numpy(_x(seed % 1000))
    with torch.no_grad():
        ref, out = gm(x)[0].double(), folded(x)[0].double()
    # float64 folding, one FP32 rounding of the weights and of each op: a few ulps of the scale
    tol = 1e-5 * float(ref.abs().max()) + 1e-6
    assert float((ref - out).abs().max()) <= tol


def test_folding_that_would_make_fp16_weights_subnormal_becomes_scale_and_shift():
    m = ConvBN().eval()
    with torch.no_grad():
        m.bn1.running_var.fill_(1e12)  # weights x 1e-6: below FP16's normal range
    folded, notes = tr.fold_batchnorms(_captured(m))
    assert [n.kind for n in notes] == ["batchnorm_to_affine", "batchnorm_to_affine"]
    assert "subnormal" in notes[0].detail


# ---------------------------------------------------------------- FP16 program and emulation

def test_emulation_rounds_every_value_through_fp16():
    class Big(nn.Module):
        def forward(self, x):
            return x * 1000.0, (x * 1e-3) * 1e-3

    gm = _captured(Big(), shape=(3,))
    program = tr.to_fp16_program(gm)
    x = torch.tensor([10.0, 70.0, 0.1])
    big, small = tr.run_emulated(program, x)
    assert big.dtype == torch.float32  # FP32 at the boundary
    assert big.tolist() == [10000.0, float("inf"), np.float32(np.float16(100.0)).item()]
    # 0.1 * 1e-3 = 1e-4 is FP16 normal; 7e-5 * 1e-3 = 7e-8 rounds to the subnormal 2^-24 * 1
    expected = np.float16(np.float16(np.float16([10.0, 70.0, 0.1]) * np.float16(1e-3)) * np.float16(1e-3))
    np.testing.assert_array_equal(small.numpy(), expected.astype(np.float32))


def test_fp16_program_keeps_named_nodes_in_fp32_with_casts():
    m = Residual().eval()
    gm = _captured(m)
    program = tr.to_fp16_program(gm, fp32_nodes=["conv2d"])
    conv = next(n for n in program.graph.nodes if n.name == "conv2d")
    weight = getattr(program, conv.args[1].target)
    assert weight.dtype == torch.float32
    casts = [n for n in program.graph.nodes if n.target is torch.ops.aten._to_copy.default]
    assert [c.kwargs["dtype"] for c in casts] == [torch.float16, torch.float32, torch.float16, torch.float32][:len(casts)]
    x = torch.from_numpy(_x(2))
    with torch.no_grad():
        ref = m(x)
    (y,) = tr.run_emulated(program, x)
    assert float((y - ref).abs().max()) < 1e-2


# ---------------------------------------------------------------- fix on PyTorch modules

def _overflowing(seed=0):
    torch.manual_seed(seed)
    m = Residual().eval()
    with torch.no_grad():
        m.conv1.weight.mul_(2e4)  # conv1 writes ~1e5: beyond FP16
        m.conv2.weight.mul_(1e-4)
    return m


def test_fix_keeps_the_module_untouched_and_scales_the_region_into_range():
    m = _overflowing()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    result = fix_model(m, [_x(1), _x(2)], validation=[_x(3)])
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not list(m._forward_hooks) and not hasattr(m, "meta")
    (region,) = result.plan.regions
    assert region.opened_by == ["conv2d"] and region.closed_by == ["conv2d_1"]
    assert region.amax > 65504 and region.amax_after <= 2**13
    assert not result.plan.rescale_ops and result.conversion.casts == 2  # in and out only
    assert result.verification.finite and max(r.rel_l2 for r in result.verification.rows) < 2e-3
    assert not result.naive.finite


def test_calibrate_torch_plan_names_fx_nodes_and_rejects_other_models():
    m = _overflowing()
    plan = calibrate(m, [_x(1)])
    assert plan.framework == "torch" and set(plan.exponents) == {"conv2d", "relu", "add", "max_pool2d"}
    other = _overflowing(seed=1)
    with pytest.raises(PlanError, match="another model"):
        apply_plan(TorchFixTarget(other, [NamedInput("x", (_x(1),))]), plan)
    with pytest.raises(PlanError, match="onnx"):
        fix_model(m, [_x(1)], plan=plan, output="onnx")
    onnx_plan = calibrate(m, [_x(1)], graph="onnx")
    assert onnx_plan.framework == "onnx" and onnx_plan.model_sha256 == plan.model_sha256


def test_hardsigmoid_and_layernorm_absorb_the_scale():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.fc2 = nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return self.norm(y) + nn.functional.hardsigmoid(self.fc2(torch.relu(y)))

    torch.manual_seed(0)
    m = Head().eval()
    with torch.no_grad():
        m.fc.weight.mul_(5e4)
    x = [np.random.default_rng(s).normal(size=(4, 8)).astype(np.float32) for s in (1, 2)]
    result = fix_model(m, x[:1], validation=x[1:])
    assert result.plan.regions and result.verification.finite
    assert max(r.rel_l2 for r in result.verification.rows) < 5e-3
    assert not result.plan.rescale_ops


def test_calibration_refuses_a_model_that_overflows_in_fp32():
    m = _overflowing()
    with torch.no_grad():
        m.conv1.weight.mul_(1e36)
    with pytest.raises(FixError, match="already outputs inf/NaN"):
        calibrate_target(TorchFixTarget(m, [NamedInput("x", (_x(1),))]), [NamedInput("x", (_x(1),))])


def test_cli_fixes_a_pt2_program_and_writes_a_pt2(tmp_path):
    m = _overflowing()
    x1 = _x(1, (2, 3, 8, 8))  # batch 1 would be specialized
    ep = torch.export.export(m, (torch.from_numpy(x1),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    np.save(tmp_path / "x1.npy", x1)
    np.save(tmp_path / "x2.npy", _x(2, (3, 3, 8, 8)))
    out = tmp_path / "fixed.pt2"
    assert main(["fix", str(tmp_path / "m.pt2"), "--input", str(tmp_path / "x1.npy"),
                 "--validate", str(tmp_path / "x2.npy"), "-o", str(out)]) == 0
    fixed = torch.export.load(str(out)).module()
    consts = [t for t in fixed.state_dict().values() if t.is_floating_point()]
    assert consts and all(t.dtype == torch.float16 for t in consts)
    x = torch.from_numpy(_x(5, (5, 3, 8, 8)))  # another batch size: the batch dimension stays dynamic
    with torch.no_grad():
        y = fixed(x)
    assert y.dtype == torch.float32 and y.shape == (5, 2, 4, 4)
    # an ONNX model cannot become a .pt2
    assert main(["fix", str(tmp_path / "m.pt2"), "--input", str(tmp_path / "x1.npy"), "-o",
                 str(tmp_path / "o.txt")]) == 2


def test_logits_beyond_fp16_come_back_finite_from_the_fp16_program():
    """A classifier whose logits reach 1.8e5: the restoring mul after the last linear runs in FP32
    (on the FP32 side of the output cast), so the program's logits are finite and right."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        m[2].weight.mul_(3e5)
    x = [np.random.default_rng(s).normal(size=(2, 8)).astype(np.float32) for s in (1, 2)]
    assert float(m(torch.from_numpy(x[0])).abs().max()) > 65504
    result = fix_model(m, x[:1], validation=x[1:])
    assert result.verification.finite and not result.naive.finite
    assert max(r.rel_l2 for r in result.verification.rows) < 2e-3
    assert len(result.conversion.fp32_nodes) == 1  # the restoring mul, nothing else


def test_an_rms_norm_whose_variance_overflows_runs_in_pure_fp16():
    """A linear writes ~4000 into an RMSNorm: h**2 is inf in FP16 and the naive program's norm
    output collapses to 0. pow (2k), mean and + eps (tied), rsqrt (-k/2) and the product with h
    carry one region through the norm: no FP32 op and no added multiply."""
    m, x = rms_norm_net()
    result = fix_model(m, x[:1], validation=x[1:])
    assert min(r.rel_l2 for r in result.naive.rows) > 0.5
    assert max(r.rel_l2 for r in result.verification.rows) < 2e-3
    assert not result.conversion.fp32_nodes and not result.plan.rescale_ops
    e = result.plan.exponents
    assert e["pow_1"] == 2 * e["linear"] and e["rsqrt"] == -e["pow_1"] // 2


def test_an_input_beyond_fp16_is_scaled_in_fp32_before_the_program_casts_it():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()).eval()
    with torch.no_grad():
        m[0].weight.mul_(1e-6)
    x = [np.random.default_rng(s).normal(size=(1, 3, 4, 4)).astype(np.float32) * 1e8 for s in (1, 2)]
    with torch.no_grad(), fp16guard.FInspect(m) as probe:
        m(torch.from_numpy(x[0]))
    assert any(f.rule == "input_overflow" for f in probe.report().findings())
    result = fix_model(m, x[:1], validation=x[1:])
    assert not result.naive.finite and result.verification.finite
    assert max(r.rel_l2 for r in result.verification.rows) < 1e-3
    assert len(result.conversion.fp32_nodes) == 1  # the input's scaling, before the cast
