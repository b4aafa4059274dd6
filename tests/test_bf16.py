"""BF16 islands (issue 16 item 2): ``fix --islands bf16`` and ``fix --fallback bf16``.

The ops that need values beyond FP16 run in BF16 instead of FP32 (FP32's 8 exponent bits, 8
significant bits): the typed ONNX stores their tensors as BFLOAT16, the ``emulate`` backend rounds
them through BF16 (round to nearest even, inf beyond 3.39e38), and the verification table shows the
fixed model with BF16 and with FP32 islands, the naive FP16 model and both fallbacks on the same inputs.
Errors are relative L2 against FP32, measured on these models and asserted with a margin.
"""

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from fp16guard.cli import main
from fp16guard.fixing.pipeline import fix_model
from fp16guard.fp16 import BF16_MAX
from fp16guard.fp16_onnx import emulation_model, emulation_session_options, to_typed_fp16
from fp16guard.onnx_graph import value_types


def _model(nodes, inits, x_shape, out_shape, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def _emulate(typed, x):
    s = ort.InferenceSession(emulation_model(typed).SerializeToString(), emulation_session_options(),
                             providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _log_floor():
    """``log(relu(x) + 1e-10) * 3 + 0.5``: FP16 flushes the epsilon (log(0) = -inf on silent samples);
    BF16 holds 1e-10, so the underflow island works in BF16."""
    return _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                   helper.make_node("Add", ["r", "eps"], ["s"], name="add_eps"),
                   helper.make_node("Log", ["s"], ["l"], name="log"),
                   helper.make_node("Mul", ["l", "three"], ["m"], name="mul"),
                   helper.make_node("Add", ["m", "b"], ["y"], name="add_b")],
                  {"eps": 1e-10, "three": 3.0, "b": 0.5}, [64], [64])


def _silent(seed):
    x = np.random.default_rng(seed).normal(size=64).astype(np.float32) * 100
    x[:16] = 0  # digital silence
    return x


def _gelu_mlp():
    """MatMul -> Gelu (opset 20) -> MatMul, the first layer writing ~4e7: the GELU reads and writes
    values so far beyond FP16 that its saturation law no longer applies (past 2^11 x 65504, the
    stored input's step moves the gate more than FP16 rounds its output), an overflow island."""
    rng = np.random.default_rng(0)
    return _model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                   helper.make_node("Gelu", ["h"], ["g"], name="gelu"),
                   helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2")],
                  {"w1": rng.normal(size=(16, 32)) * 5e6, "w2": rng.normal(size=(32, 8)) / 32e5},
                  [4, 16], [4, 8], opset=20)


def _rows(v):
    return [r.rel_l2 for r in v.rows]


def test_the_emulation_rounds_bf16_to_nearest_even_and_overflows_to_inf_as_hardware_does():
    m = _model([helper.make_node("Add", ["x", "c"], ["y"], name="add")], {"c": 1e37}, [None], [None])
    typed, conversion = to_typed_fp16(m, node_block_list=["add"], island_dtype=TensorProto.BFLOAT16)
    assert conversion.bf16_nodes == ["add"] and typed.graph.initializer[0].data_type == TensorProto.BFLOAT16
    bits = np.random.default_rng(0).integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < 1e30)]  # far from c's binade: the sum is x's rounding plus c
    c = np.float32(ml_dtypes.bfloat16(1e37))
    want = (x.astype(ml_dtypes.bfloat16).astype(np.float32) + c).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(_emulate(typed, x), want)
    # a sum FP32 holds but BF16 does not: inf, as a BF16 kernel stores it (strict emulation)
    big = np.array([np.float32(ml_dtypes.bfloat16(3.3e38))], np.float32)
    assert np.isfinite(big + c) and (big + c)[0] > BF16_MAX
    assert np.isposinf(_emulate(typed, big))[0]


def test_an_underflow_island_runs_in_bf16_whose_range_holds_the_epsilon():
    xs = [_silent(s) for s in range(3)]
    result = fix_model(_log_floor(), xs[:1], validation=xs[1:], islands="bf16")
    assert result.plan.unfixable_nodes == ["add_eps", "log"]
    assert result.conversion.bf16_nodes == ["add_eps", "log"] and result.conversion.fp32_nodes == []
    types = value_types(result.fixed)
    assert types["s"] == types["eps"] == TensorProto.BFLOAT16 and types["r"] == types["m"] == TensorProto.FLOAT16
    bf16, fp32, naive = result.verification, result.other_islands, result.naive
    assert (bf16.variant, fp32.variant) == ("fixed_bf16", "fixed") and bf16.finite and fp32.finite
    assert not naive.finite  # pure FP16: log(0) = -inf on the silent samples
    # measured: FP32 islands 6.9e-4 (FP16 rounding after the log), BF16 islands 1.15e-3 (+ 8-bit rounding)
    for e32, e16 in zip(_rows(fp32), _rows(bf16)):
        assert e32 < 1.5e-3 and 1.3 * e32 < e16 < 3e-3
    assert _rows(result.fallback_bf16) == _rows(bf16)  # the whole island is the fallback's too


def test_an_overflow_island_runs_in_bf16_and_the_table_shows_every_variant():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(4, 16)).astype(np.float32) for _ in range(3)]
    result = fix_model(_gelu_mlp(), xs[:1], validation=xs[1:], islands="bf16")
    assert set(result.plan.unfixable_nodes) == {"fc1", "gelu"}
    assert {"fc1", "gelu"} <= set(result.conversion.bf16_nodes) and not result.conversion.fp32_nodes
    types = value_types(result.fixed)
    fc1 = next(n for n in result.fixed.graph.node if n.name == "fc1")
    assert types["h"] == types["g"] == types[fc1.input[1]] == TensorProto.BFLOAT16  # its weight stored in BF16
    assert result.verification.finite and not result.naive.finite
    # measured: FP32 islands 3.2e-4 - 3.4e-4, BF16 islands 2.7e-3 - 3.4e-3 (GELU's output, ~x, rounded to
    # 8 bits), BF16 fallback 3.3e-3 - 4.9e-3, FP32 fallback 0 (everything beyond 2^13 and its readers in
    # FP32: no FP16 left)
    for e32, e16, fb16 in zip(_rows(result.other_islands), _rows(result.verification), _rows(result.fallback_bf16)):
        assert e32 < 1e-3 and 4 * e32 < e16 < 1e-2 and 1e-3 < fb16 < 1e-2
    doc = result.to_json()
    assert doc["islands"] == "bf16" and doc["other_islands"]["variant"] == "fixed"
    assert doc["fallback_bf16"]["variant"] == "fallback_bf16" and doc["bf16_nodes"] == result.conversion.bf16_nodes


def test_an_op_whose_schema_has_no_bf16_stays_fp32_with_the_reason():
    """Conv takes bfloat16 only from opset 22: at opset 17 it stays FP32, the Sigmoid runs in BF16."""
    rng = np.random.default_rng(0)
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                helper.make_node("Sigmoid", ["c"], ["y"], name="sig")],
               {"w": rng.normal(size=(2, 3, 1, 1)) * 1e5}, [1, 3, 4, 4], [1, 2, 4, 4])
    typed, conversion = to_typed_fp16(m, node_block_list=["conv", "sig"], island_dtype=TensorProto.BFLOAT16)
    assert conversion.fp32_nodes == ["conv"] and conversion.bf16_nodes == ["sig"]
    assert "Conv-11 (opset 17) takes no bfloat16" in conversion.bf16_refused["conv"]
    onnx.checker.check_model(typed, full_check=True)
    x = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    with np.errstate(over="ignore"):  # exp(1e5) = inf: the sigmoid is 0 there
        y32 = 1 / (1 + np.exp(-np.einsum("oi,bihw->bohw", numpy_helper.to_array(m.graph.initializer[0])[:, :, 0, 0], x)))
    assert np.abs(_emulate(typed, x) - y32).max() < 2**-8  # the sigmoid's 8-bit rounding


def test_a_constant_beyond_bf16_keeps_its_reader_fp32():
    m = _model([helper.make_node("Add", ["x", "mask"], ["y"], name="add_mask")], {"mask": -3.4028e38}, [2], [2])
    _, conversion = to_typed_fp16(m, node_block_list=["add_mask"], island_dtype=TensorProto.BFLOAT16)
    assert conversion.fp32_nodes == ["add_mask"] and "beyond BF16" in conversion.bf16_refused["add_mask"]


def test_fix_fallback_bf16_and_islands_bf16_on_the_command_line(tmp_path, capsys):
    onnx.save(_log_floor(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", _silent(0))
    base = ["fix", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "x.npy")]
    for flag, out in ((["--fallback", "bf16"], "fb.onnx"), (["--islands", "bf16"], "isl.onnx")):
        assert main([*base, *flag, "-o", str(tmp_path / out), "--json", str(tmp_path / "r.json")]) == 0
        types = value_types(onnx.load(tmp_path / out))
        assert types["s"] == TensorProto.BFLOAT16 and types["l"] == TensorProto.BFLOAT16
    printed = capsys.readouterr().out
    assert "fallback_bf16" in printed and "fixed_bf16" in printed and "in BF16" in printed
    code = main([*base, "--islands", "bf16", "-o", str(tmp_path / "f.onnx"), "--layer-precisions", str(tmp_path / "p")])
    assert code == 2 and "weakly typed" in capsys.readouterr().err


class _GeluMlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)
        with torch.no_grad():
            self.fc1.weight.mul_(2e7)  # GELU's input ~1e8: beyond its saturation law's reach, an island
            self.fc2.weight.div_(1e5)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def test_a_pytorch_program_runs_its_island_in_bf16_and_saves_as_pt2(tmp_path):
    from fp16guard.fixing.torch_pass import save_program

    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(4, 16)).astype(np.float32) for _ in range(2)]
    # force: the fixed model as calibrated (by default the BF16 fallback is written here: the fixed
    # model's islands and their two rescales are 4 nodes, more than the fallback's, both meeting the bar)
    result = fix_model(_GeluMlp(), xs[:1], validation=xs[1:], islands="bf16", force=True)
    assert {"linear", "gelu"} <= set(result.conversion.bf16_nodes) and not result.conversion.fp32_nodes
    dtypes = {n.name: n.kwargs.get("dtype") for n in result.fixed.graph.nodes if "_to_copy" in n.name}
    assert torch.bfloat16 in dtypes.values() and torch.float16 in dtypes.values()
    # measured: FP32 islands 2.2e-4 - 4.1e-4, BF16 islands 1.9e-3 - 3.4e-3
    for e32, e16 in zip(_rows(result.other_islands), _rows(result.verification)):
        assert e32 < 1.5e-3 and 2 * e32 < e16 < 1e-2
    # the saved program runs as it is (PyTorch's own CPU kernels, FP16 and BF16): no dtype mismatch
    save_program(result.fixed, [(torch.from_numpy(x),) for x in xs], tmp_path / "f.pt2")
    y = torch.export.load(str(tmp_path / "f.pt2")).module()(torch.from_numpy(xs[0]))
    ref = _GeluMlp()(torch.from_numpy(xs[0])).detach()
    assert torch.linalg.norm(y.float() - ref) / torch.linalg.norm(ref) < 1e-2
