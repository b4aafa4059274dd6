"""Saturating ops read scaled values (issue 24 item 2): sigmoid, tanh, erf, and x * gate(x) (SiLU, GELU,
HardSwish, Mish) whose inputs exceed FP16 run in pure FP16 through ``Clip(-B 2^-k, B 2^-k) * 2^k``
instead of FP32 islands, on both the PyTorch and the ONNX path (:mod:`fp16guard.fixing.laws`)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from fix_cases import ACTS, GatedNet, gate_inputs

from fp16guard.fixing import fix_model
from fp16guard.fixing.solver import solve
from fp16guard.fixing.solver_model import SATURATING_MAX_EXPONENT, Role, ScaleOp

def _within_bar(result):
    """Finite, and on each input within 1.5x the FP32 fallback's relative L2 error plus 2^-10."""
    assert result.verification.finite
    for fixed, fallback in zip(result.verification.rows, result.fallback.rows):
        assert fixed.rel_l2 <= 1.5 * fallback.rel_l2 + 2.0 ** -10, (fixed.label, fixed.rel_l2, fallback.rel_l2)


@pytest.mark.parametrize("output", ["torch", "onnx"])
def test_se_hardswish_silu_gelu_regions_beyond_fp16_run_in_pure_fp16(output):
    """Before saturation, every gate and gated activation here needed its true input (~1e5, beyond
    FP16) and ran in an FP32 island with its producer; now none does."""
    model, xs = GatedNet().eval(), gate_inputs()
    with torch.no_grad():
        assert all(float(conv(torch.from_numpy(xs[0])).abs().max()) > 1e5 for conv in model.convs)  # beyond FP16
    result = fix_model(model, xs, output=output)
    assert result.conversion.fp32_nodes == []
    assert not result.naive.finite  # the plain conversion overflows
    _within_bar(result)
    saturated = [n for n in result.notes if n.kind == "scale" and ("clip" in n.detail.lower() or "clamp" in n.detail)]
    assert len(saturated) >= 6  # 5 activations (ONNX: SiLU as its Sigmoid) and the SE's sigmoid gate


class Gates(nn.Module):
    """One conv beyond FP16 read by every saturating and gated op, each a graph output (x * gate(x)
    scaled by 0.01 so that the outputs fit FP16: no restore after the output cast)."""

    def __init__(self, gain=3e4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 1)  # one input channel: no cancellation amplifies the input's FP16 rounding
        with torch.no_grad():
            self.conv.weight.mul_(gain)

    def forward(self, x):
        c = self.conv(x)
        return (torch.sigmoid(c), torch.tanh(c), torch.erf(c), *(f(c) * 0.01 for f in ACTS.values()))


@pytest.mark.parametrize("output", ["torch", "onnx"])
def test_each_saturating_op_matches_fp32_elementwise_in_and_beyond_its_sensitive_range(output):
    """Per element, not only in L2: a gate within 2^-10 of FP32, x * gate(x) within 2^-8 relative
    (FP16's rounding of its five steps) plus 2^-12, on inputs whose pre-activations cover [-B, B]
    densely: a wrong clamp bound or branch would be off by O(1) there."""
    model, xs = Gates().eval(), gate_inputs(1, (1, 1, 32, 32))
    result = fix_model(model, xs, output=output, keep_outputs=True)
    assert result.conversion.fp32_nodes == []
    beyond = [r for r in result.plan.regions if r.amax > 65504]
    assert beyond and all(0 < r.exponent <= SATURATING_MAX_EXPONENT for r in beyond)
    with torch.no_grad():
        c = model.conv(torch.from_numpy(xs[0]))
    assert float((c.abs() < 8).float().mean()) > 0.05  # the sensitive range is exercised
    fixed, ref = result.outputs.fixed[0], result.outputs.fp32[0]
    for i, (f, r) in enumerate(zip(fixed, ref)):
        err = np.abs(f.astype(np.float64) - r)
        # x * gate(x): the input cast, the weight, the conv, the op and the 0.01 (0.64 in FP16) each round once
        bound = 2.0 ** -10 if i < 3 else 2.0 ** -8 * np.abs(r) + 2.0 ** -12
        assert np.all(err <= bound), (i, float(np.max(err - bound)))


def test_the_solver_pins_a_saturating_input_softly_and_reads_it_scaled_up_to_the_limit():
    ops = [ScaleOp("conv", Role.LINEAR, ("x",), ("c",)), ScaleOp("sig", Role.SATURATING, ("c",), ("s",)),
           ScaleOp("silu", Role.GATED, ("c",), ("g",)), ScaleOp("conv2", Role.LINEAR, ("g",), ("y",))]
    io = {"graph_inputs": ["x"], "graph_outputs": ["s", "y"]}
    within = solve(ops, {"c": 3e4, "g": 3e4}, **io)  # within FP16: unscaled, no op added
    assert within.exponents["c"] == within.exponents["g"] == 0 and not within.rescales
    beyond = solve(ops, {"c": 3e5, "g": 3e5, "s": 1}, **io)  # read scaled, output true / tied
    assert beyond.exponents["c"] == beyond.exponents["g"] == 6 and beyond.exponents["s"] == 0
    assert not beyond.rescales and not beyond.unfixable
    far = solve(ops, {"c": 3e9, "g": 3e9, "s": 1}, **io)  # k = 19 > 11: true values, an FP32 island
    assert far.exponents["c"] > SATURATING_MAX_EXPONENT
    assert {u.tensor for u in far.unfixable} >= {"c"} and any(r.consumer == "sig" for r in far.rescales)


@pytest.mark.parametrize("output", ["torch", "onnx"])
def test_a_sigmoid_whose_input_is_too_far_beyond_fp16_stays_an_fp32_island(output):
    """Past 2^11 x 65504 the stored input's subnormal step would move the gate by more than its own
    FP16 rounding: the sigmoid reads the true value, in FP32, as before."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sigmoid()).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e9)
    result = fix_model(model, gate_inputs(1), output=output)
    assert result.conversion.fp32_nodes and result.verification.finite


def _conv_then(op: str, opset: int, **attrs):
    """x -> Conv (weights ~1e5) -> ``op``: a typed FP32 ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array((np.random.default_rng(0).normal(size=(2, 3, 1, 1)) * 1e5).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                           helper.make_node(op, ["c"], ["y"], name="op", **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("opset", [10, 20])
def test_an_onnx_file_of_any_opset_gets_its_clip_as_inputs_or_attributes(opset):
    model = _conv_then("Sigmoid", opset)
    result = fix_model(model, gate_inputs(2, (1, 3, 4, 4)))
    assert result.conversion.fp32_nodes == [] and result.verification.finite
    clip = next(n for n in result.fixed.graph.node if n.op_type == "Clip")
    assert (len(clip.input) == 3) == (opset >= 11) and (len(clip.attribute) == 2) == (opset < 11)


@pytest.mark.parametrize("k", [-3, 4])
@pytest.mark.parametrize("op", ["Sigmoid", "Gelu", "HardSwish"])
def test_the_onnx_rewrite_computes_the_same_function_at_any_exponent(op, k):
    """Applied to the FP32 graph, the clamp (``k > 0``) or the plain rescale (``k < 0``) before a
    saturating or gated op changes nothing beyond FP32 rounding: the law is exact."""
    from fp16guard.fixing import onnx_pass
    from fp16guard.fixing.solver import complete
    from fp16guard.onnx_graph import cpu_session

    model = _conv_then(op, 20)
    ops = onnx_pass.scale_ops(model)
    gated = op != "Sigmoid"  # its output shares its input's exponent
    rewritten, notes = onnx_pass.apply_exponents(model, complete(ops, {"c": k, "y": k if gated else 0}, graph_outputs=["y"]))
    assert any(n.target == "op" for n in notes)
    x = gate_inputs(1, (1, 3, 4, 4))[0]
    want, got = (cpu_session(m).run(None, {"x": x})[0] for m in (model, rewritten))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [-3, 4])
def test_the_torch_rewrite_computes_the_same_function_at_any_exponent(k):
    from fp16guard.fixing import torch_pass
    from fp16guard.fixing.solver import complete
    from fp16guard.torch_graph import capture

    model = Gates(gain=100.0).eval()  # weights that fit FP16 at 2^3 too; |c| still reaches far beyond every B
    x = torch.from_numpy(gate_inputs(1, (1, 1, 32, 32))[0])
    gm = torch_pass.annotate(capture(model, [(x,)]), (x,))
    ops = torch_pass.scale_ops(gm)
    rewritten, notes = torch_pass.apply_exponents(gm, complete(ops, {"conv2d": k} | {
        op.name: k for op in ops if op.role is Role.GATED}, graph_outputs=torch_pass.graph_io(gm)[1]))
    assert len([n for n in notes if n.kind == "scale"]) >= 8
    with torch.no_grad():
        for got, want in zip(rewritten(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
