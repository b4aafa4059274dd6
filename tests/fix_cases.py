"""The small models the fix tests check and the fix benchmarks measure, in one place.

The tests (``tests/test_fix.py``, ``tests/test_torch_pass.py``, ``tests/test_saturation.py``,
``tests/test_scaled_constants.py``, ``tests/test_delivery.py``, ``tests/test_control_flow.py``)
import them from here, and so do ``benchmarks/fix_patterns.py`` and
``benchmarks/fix_always_delivers.py``: a helper module, not a test module, so no benchmark imports
what pytest collects. Each section names the test file that checks its models; a change to a
model here changes what those tests check and what the benchmarks measure alike (rerun the
benchmark and update its result file).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper


# ---------------------------------------------------------------- ONNX building blocks


def constant(name, v, dtype=np.float32):
    """An initializer ``name`` holding ``v``."""
    return numpy_helper.from_array(np.asarray(v, dtype), name)


def opset_model(graph, opset=17):
    """``graph`` as a model of ``opset`` (IR version 9)."""
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


# ---------------------------------------------------------------- tests/test_fix.py: ONNX graphs


def onnx_model(nodes, inits, x_shape, out, out_shape=None):
    """An opset-17 model of ``nodes`` with the float32 initializers ``inits``, input ``x``, output ``out``."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return opset_model(graph)


def normal(seed=1, shape=(1, 3, 8, 8)):
    """Standard normal float32 values of ``shape``, from ``seed``."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def decomposed_layernorm(gain, hidden=64):
    """``MatMul -> LayerNorm`` written out as exporters before opset 17 write it
    (``ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul, Add``), then a head."""
    rng = np.random.default_rng(0)
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w"], ["h"], name="fc"),
             n("ReduceMean", ["h"], ["mu"], name="mean", axes=[-1]),
             n("Sub", ["h", "mu"], ["d"], name="center"),
             n("Pow", ["d", "two"], ["d2"], name="square"),
             n("ReduceMean", ["d2"], ["var"], name="variance", axes=[-1]),
             n("Add", ["var", "eps"], ["ve"], name="add_eps"),
             n("Sqrt", ["ve"], ["std"], name="sqrt"),
             n("Div", ["d", "std"], ["z"], name="normalize"),
             n("Mul", ["z", "gamma"], ["zg"], name="gamma"),
             n("Add", ["zg", "beta"], ["ln"], name="beta"),
             n("MatMul", ["ln", "w2"], ["y"], name="head")]
    inits = {"w": rng.normal(size=(16, hidden)) * gain, "two": np.array(2.0), "eps": np.array(1e-5),
             "gamma": rng.normal(size=hidden), "beta": rng.normal(size=hidden) * 0.1,
             "w2": rng.normal(size=(hidden, 4)) * 0.1}
    return onnx_model(nodes, inits, [1, 8, 16], "y", [1, 8, 4])


def big_input_model():
    """A 1x1 conv whose input arrives at ~3e8 (an unnormalized sensor or audio power): ``x`` itself
    is beyond FP16, so a typed model's input cast makes it inf before any layer runs."""
    rng = np.random.default_rng(0)
    return onnx_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                       helper.make_node("Relu", ["c"], ["y"], name="relu")],
                      {"w": rng.normal(size=(2, 3, 1, 1)) * 1e-6}, [1, 3, 4, 4], "y")


def masked_attention(mask_value=-3.4028234663852886e38):
    """One attention head with the mask of transformers 4.x: ``scores + (1 - float(mask)) * finfo.min``
    before the softmax (inputs ``x`` float32 [2, 4, 8] and ``mask`` int64 [2, 4])."""
    rng = np.random.default_rng(0)
    n = helper.make_node
    nodes = [n("MatMul", ["x", "wq"], ["q"], name="q"), n("MatMul", ["x", "wk"], ["k"], name="k"),
             n("MatMul", ["x", "wv"], ["v"], name="v"), n("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             n("MatMul", ["q", "kt"], ["s"], name="scores"), n("Div", ["s", "sqrt_d"], ["s2"], name="scale"),
             n("Cast", ["mask"], ["mf"], name="mask_float", to=TensorProto.FLOAT),
             n("Reshape", ["mf", "shape"], ["um"], name="mask_rows"), n("Sub", ["one", "um"], ["inv"], name="invert"),
             n("Mul", ["inv", "neg"], ["bias"], name="mask_bias"),
             n("Add", ["s2", "bias"], ["masked"], name="add_mask"),
             n("Softmax", ["masked"], ["p"], name="softmax", axis=-1), n("MatMul", ["p", "v"], ["y"], name="context")]
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), w) for w in ("wq", "wk", "wv")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k)
              for k, v in (("sqrt_d", np.sqrt(8.0)), ("one", 1.0), ("neg", mask_value))]
    inits.append(numpy_helper.from_array(np.array([2, 1, 4], np.int64), "shape"))
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8]),
                                                   helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])], inits)
    return opset_model(graph)


# ---------------------------------------------------------------- tests/test_torch_pass.py: T5's RMSNorm


class _RMSNorm(nn.Module):
    """T5's layer norm: ``weight * h * rsqrt(mean(h**2) + eps)`` (no mean subtraction, no bias)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, h):
        var = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(var + self.eps))


def rms_norm_net() -> tuple[nn.Module, list[np.ndarray]]:
    """``(model, inputs)``: a linear that writes ~4000 into T5's RMSNorm, then a head; three
    inputs float32 [1, 8, 16]."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), _RMSNorm(64), nn.Linear(64, 4)).eval()
    with torch.no_grad():
        m[0].weight.mul_(300)
    return m, [np.random.default_rng(s).normal(size=(1, 8, 16)).astype(np.float32) for s in (1, 2, 3)]


# ---------------------------------------------------------------- tests/test_saturation.py: gates beyond FP16


ACTS = {"silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "mish": F.mish}


GATES = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


class SE(nn.Module):
    """Squeeze-and-excitation: global average pool -> conv -> relu -> conv -> gate -> mul."""

    def __init__(self, c, gate):
        super().__init__()
        self.reduce, self.expand, self.gate = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1), gate
        with torch.no_grad():
            self.reduce.weight.mul_(4.0)
            self.expand.weight.mul_(30.0)  # the gate's input reaches ~1e5

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * GATES[self.gate](self.expand(torch.relu(self.reduce(s))))


class GatedNet(nn.Module):
    """Five branches of a 1x1 conv (weights x 1e5: pre-activations up to ~1e6) -> SiLU -> SE (sigmoid
    gate), HardSwish -> SE (hardsigmoid gate), GELU, GELU (tanh), Mish; concatenated, then a conv back
    to ~1. One stage deep, so the pure FP16 model's rounding error stays near FP16's 2^-11."""

    def __init__(self, seed=0, gain=1e5):
        super().__init__()
        torch.manual_seed(seed)
        self.convs = nn.ModuleList(nn.Conv2d(3, 8, 1) for _ in ACTS)
        self.se = nn.ModuleDict({"silu": SE(8, "sigmoid"), "hardswish": SE(8, "hardsigmoid")})
        self.head = nn.Conv2d(8 * len(ACTS), 2, 1)
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.mul_(gain)
            self.head.weight.mul_(1e-4)

    def forward(self, x):
        ys = []
        for conv, (name, act) in zip(self.convs, ACTS.items()):
            y = act(conv(x))
            ys.append(self.se[name](y) if name in self.se else y)
        return self.head(torch.cat(ys, 1))


def gate_inputs(n=2, shape=(1, 3, 16, 16)):
    """Normal values times a magnitude 10^U(-4, 1) per pixel (within FP16's normal range, so the
    input cast loses nothing the fallback keeps): after 1x1 convs the pre-activations span five
    decades, so every gate's sensitive range (|x| <= B) is well populated, not only its saturated
    ends."""
    rng = np.random.default_rng(1)
    return [(rng.normal(size=shape) * 10.0 ** rng.uniform(-4, 1, size=(1, 1, *shape[2:]))).astype(np.float32)
            for _ in range(n)]


# ---------------------------------------------------------------- tests/test_scaled_constants.py


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


def positive(seed: int) -> np.ndarray:
    """float32 [2, 16], every value at least 0.1 (:class:`ClampLog`'s inputs)."""
    return np.abs(np.random.default_rng(seed).normal(size=(2, 16))).astype(np.float32) + 0.1


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


def small_image(seed: int) -> np.ndarray:
    """float32 [1, 3, 6, 6], standard normal (:class:`BigWeight`'s inputs)."""
    return np.random.default_rng(seed).normal(size=(1, 3, 6, 6)).astype(np.float32)


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


# ---------------------------------------------------------------- tests/test_delivery.py: the two ends of the bar


class PeakedSoftmax(nn.Module):
    """float32 [1, 64] -> softmax over 384 bins of logits 1000 +- about 25."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 384)
        with torch.no_grad():
            self.lin.weight.mul_(3)
            self.lin.bias.add_(1000)

    def forward(self, x):
        return torch.softmax(self.lin(x), dim=-1)


class OffsetResidual(nn.Module):
    """float32 [1, 64] -> [1, 8]: LayerNorm of ``10 * a(x) + 1e6``, then a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        return self.head(self.norm(self.a(x) * 10 + 1e6))


def vector_inputs(n: int = 3) -> list[np.ndarray]:
    """``n`` float32 [1, 64] standard normal inputs (:class:`PeakedSoftmax`, :class:`OffsetResidual`)."""
    return [np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32) for i in range(n)]


# ---------------------------------------------------------------- tests/test_control_flow.py: If and Loop


def if_model():
    """``y = If(sum(x) > 0, then: x * 1000 + x, else: Identity(x)) * 0.001``: a data-dependent If whose
    then-branch overflows FP16 (1e5 for x ~ 100) and hands the big value on to the main graph."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "k1000"], ["t_big"], name="then_mul"),
                              helper.make_node("Add", ["t_big", "x"], ["t_out"], name="then_add")],
                             "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"], name="else_id")],
                              "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [4])])
    return opset_model(helper.make_graph([
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
        helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other, name="branch"),
        helper.make_node("Mul", ["b", "k001"], ["y"], name="down"),
    ], "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [constant("zero", 0.0), constant("k1000", 1000.0), constant("k001", 0.001)]))


def loop_model(trips=3):
    """``acc = x; 3 times: acc = acc * 10 + x; y = acc * 0.001``: the third iteration overflows (1.1e5)."""
    body = helper.make_graph([
        helper.make_node("Mul", ["acc_in", "k10"], ["acc_scaled"], name="body_mul"),
        helper.make_node("Add", ["acc_scaled", "x"], ["acc_out"], name="body_add"),
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
    ], "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4])])
    return opset_model(helper.make_graph([
        helper.make_node("Loop", ["trips", "", "x"], ["acc"], body=body, name="loop"),
        helper.make_node("Mul", ["acc", "k001"], ["y"], name="down"),
    ], "loop_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [constant("trips", trips, np.int64), constant("k10", 10.0), constant("k001", 0.001)]))


class Squeeze(torch.nn.Module):
    """``x.squeeze(1)`` of a dimension the exporter does not know: TorchScript writes an If."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):  # [B, C, 8], C dynamic
        y = self.lin(x) * 1000.0
        return y.squeeze(1) * 100.0 * 0.001


def squeeze_model():
    """The TorchScript export (``dynamo=False``, opset 13) of :class:`Squeeze`, dims 0 and 1 dynamic."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Squeeze().eval(), (torch.randn(2, 1, 8),), f, dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "c"}})
    return onnx.load_from_string(f.getvalue())


#: The calibration inputs of :func:`if_model` and :func:`loop_model`.
CONTROL_FLOW_INPUTS = [np.array([100, 50, -20, 80], np.float32), np.array([60, 90, 10, 30], np.float32),
                       np.array([70, -10, 40, 85], np.float32)]


def squeeze_inputs():
    """Three float32 [2, 1, 8] inputs of :func:`squeeze_model`."""
    rng = np.random.default_rng(0)
    return [rng.normal(0, 3, (2, 1, 8)).astype(np.float32) for _ in range(3)]


#: name -> (make the ONNX model, its inputs, the input name): the control-flow cases.
CONTROL_FLOW = {"if": (if_model, lambda: CONTROL_FLOW_INPUTS, "x"),
                "loop": (loop_model, lambda: CONTROL_FLOW_INPUTS, "x"),
                "squeeze": (squeeze_model, squeeze_inputs, "x")}
