import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fp16guard import inspect_onnx
from fp16guard.errors import InputError, ModelLoadError
from fp16guard.onnx_graph import plan_chunks, scope_of


def make_model() -> onnx.ModelProto:
    """x[N,4] -> MatMul (x 1e3) -> BatchNormalization (var in a Constant, 2e5) -> Relu -> Mul 1e-3."""
    w = numpy_helper.from_array(np.full((4, 4), 1e3, np.float32), "proj.weight")
    consts = [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v, np.float32), name))
        for name, v in [("bn.scale", [1.0] * 4), ("bn.bias", [0.0] * 4), ("bn.mean", [0.0] * 4),
                        ("bn.var", [2e5, 1.0, 1.0, 1.0]), ("head.k", 1e-3)]
    ]
    nodes = consts + [
        helper.make_node("MatMul", ["x", "proj.weight"], ["h"], name="/encoder/proj/MatMul"),
        helper.make_node("Unsqueeze", ["h", "axes"], ["h4"], name="/encoder/Unsqueeze"),
        helper.make_node("BatchNormalization", ["h4", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b4"],
                         name="/encoder/bn/BatchNormalization", epsilon=1e-5),
        helper.make_node("Squeeze", ["b4", "axes"], ["b"], name="/encoder/Squeeze"),
        helper.make_node("Relu", ["b"], ["r"], name="/encoder/act/Relu"),
        helper.make_node("Mul", ["r", "head.k"], ["y"], name="/head/Mul"),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w, numpy_helper.from_array(np.array([2, 3], np.int64), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


X = np.full((2, 4), 30.0, np.float32)  # MatMul output 30 * 1e3 * 4 = 1.2e5


def test_from_to_and_scopes():
    report = inspect_onnx(make_model(), X)
    by_name = {r.name: r for r in report.calls}
    mm = by_name["/encoder/proj/MatMul"]
    assert mm.transition == "from" and mm.outputs.amax == pytest.approx(1.2e5)
    assert mm.scope == "encoder.proj"
    # BN divides channel 0 by sqrt(2e5) but channels 1-3 stay at 1.2e5: still out of range
    assert by_name["/encoder/bn/BatchNormalization"].transition is None
    head = by_name["/head/Mul"]
    assert head.transition == "to" and head.outputs.amax == pytest.approx(120.0, rel=1e-5)
    assert [(r.transition, r.name) for r in report.transitions()] == [
        ("from", "/encoder/proj/MatMul"), ("to", "/head/Mul")]
    assert report.overflow_found


def test_static_check_reads_constant_nodes_and_batchnorm():
    report = inspect_onnx(make_model(), X)
    found = {(s.tensor, s.rule): s for s in report.static}
    assert found[("bn.var", "overflow")].count == 1
    assert found[("bn.var", "overflow")].layer == "/encoder/bn/BatchNormalization"
    assert found[("bn.var", "bn_fold")].severity == "info"
    assert ("proj.weight", "overflow") not in found


def test_chunking_does_not_change_the_numbers():
    whole = inspect_onnx(make_model(), [X, X * 2], static=False)
    chunked = inspect_onnx(make_model(), [X, X * 2], static=False, memory_budget=1)
    assert whole.calls == chunked.calls
    assert [r.call for r in whole.calls] == [0] * 6 + [1] * 6


def test_plan_chunks_respects_budget():
    sizes = {"a": 60, "b": 50, "c": 10, "d": 200}
    assert plan_chunks(["a", "b", "c", "d", "e"], sizes, 100) == [["a"], ["b", "c"], ["d"], ["e"]]


def test_scope_of():
    assert scope_of("/backbone/layer4/conv/Conv") == "backbone.layer4.conv"
    assert scope_of("p2o.Conv.61") == ""


def test_wrong_input_shape_is_named():
    with pytest.raises(InputError, match=r"input 'x' must have shape \[\?, 4\], got \[2, 5\]"):
        inspect_onnx(make_model(), np.zeros((2, 5), np.float32))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        inspect_onnx(tmp_path / "nope.onnx", X)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    with pytest.raises(ModelLoadError, match="not a readable ONNX model"):
        inspect_onnx(bad, X)
