"""The tensorrt backend against a real TensorRT (or TensorRT-RTX): parse, build, caches, debug
tensors, and (on a GPU the engine runs on) the numbers. Skipped when neither imports (CI)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fp16guard.fp16_onnx import to_typed_fp16


def _backend(tmp_path, **options):
    try:
        from fp16guard.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(cache_dir=tmp_path / "trt", **options)
    except ImportError:
        pytest.skip("neither tensorrt nor tensorrt_rtx_bindings is installed")


def _model():
    """x -> Conv -> Relu -> Conv -> y, typed FP16 (FP32 at the boundary)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (4, 3, 3, 3)), ("b1", (4,)), ("w2", (2, 4, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return to_typed_fp16(m)[0]


def test_engine_is_built_once_then_comes_from_the_engine_cache(tmp_path):
    be = _backend(tmp_path)
    model = _model()
    serialized = be.build_serialized(model)
    assert len(serialized) > 0 and be.engines_built == 1
    assert (tmp_path / "trt" / "timing.cache").stat().st_size > 0
    again = _backend(tmp_path)
    assert again.build_serialized(model) == serialized and again.engines_built == 0
    other = onnx.ModelProto()
    other.CopyFrom(model)
    next(n for n in other.graph.node if n.op_type == "Relu").op_type = "Sigmoid"
    assert again.build_serialized(other) != serialized and again.engines_built == 1


def test_debug_tensors_are_marked_and_unknown_names_refused(tmp_path):
    from fp16guard.errors import BackendError

    be = _backend(tmp_path, debug_tensors=["r"])
    assert len(be.build_serialized(_model())) > 0
    with pytest.raises(BackendError, match="no tensor named 'nope'"):
        _backend(tmp_path, debug_tensors=["nope"]).build_serialized(_model())


def test_engine_agrees_with_the_emulation_where_it_runs(tmp_path):
    from fp16guard.backends import get_backend
    from fp16guard.errors import BackendError

    be = _backend(tmp_path, debug_tensors=["r"])
    model = _model()
    try:
        engine = be.build(model)
    except BackendError as e:  # TensorRT-RTX on compute capability 9.0 builds but cannot run
        pytest.skip(f"engines do not run on this GPU: {e}")
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    (y,) = engine.run({"x": x})
    (ref,) = get_backend("emulate").build(model).run({"x": x})
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2)
    assert engine.debug_values["r"].shape == (1, 4, 8, 8)


@pytest.mark.slow
def test_typed_fp16_ppocr_naive_and_fixed_parse_and_build(tmp_path):
    """The bundled PP-OCRv4 detector as a plain typed FP16 ONNX and as `fp16guard fix` writes it:
    TensorRT's parser takes both and the builder builds both (measured with TensorRT-RTX 1.7 on an
    H100: 638 and 637 network layers)."""
    be = _backend(tmp_path)
    from fp16guard.examples import get_example
    from fp16guard.fixing import OnnxFixTarget, fix_target

    ex = get_example("ppocr-det")
    original = onnx.load(str(ex.load()))
    fixed = fix_target(OnnxFixTarget(original), ex.calibration()[:1], compare_naive=False).fixed
    for model in (to_typed_fp16(original)[0], fixed):
        model = onnx.ModelProto.FromString(model.SerializeToString())
        dims = model.graph.input[0].type.tensor_type.shape.dim  # the backend builds static shapes
        for d, size in zip(dims, (1, 3, 736, 736)):
            d.ClearField("dim_param")
            d.dim_value = size
        assert len(be.build_serialized(model)) > 0
    assert be.engines_built == 2


def test_the_engine_check_flags_fp16_nodes_that_run_in_fp32():
    """check_engine_precisions on the layers an engine inspector reports (written out here: no
    engine runs on CI): a layer of FP16 nodes with only Float tensors is the "0 % Half" failure;
    the model's FP32 island, casts and Myelin's foreign nodes are not judged."""
    from fp16guard.backends.tensorrt import EngineLayer, check_engine_precisions

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Add", ["r", "eps"], ["s"], name="add_eps"), helper.make_node("Log", ["s"], ["y"], name="log")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array(1e-10, np.float32), "eps")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    typed, _ = to_typed_fp16(model, node_block_list=["add_eps", "log"])
    good = [EngineLayer("mm + relu", "CaskGemm", ["Half"], ["mm", "relu"]),
            EngineLayer("add_eps + log", "PointWiseV2", ["Float"], ["add_eps", "log"]),
            EngineLayer("{ForeignNode[mm...relu]}", "Myelin", ["Half"], ["{ForeignNode[mm...relu]}"])]
    check = check_engine_precisions(good, typed)
    assert [layer.name for layer in check.fp16_layers] == ["mm + relu"] and not check.mismatches
    assert [layer.name for layer in check.unmapped] == ["{ForeignNode[mm...relu]}"] and check.half_layers == 2
    bad = [EngineLayer("mm + relu", "CaskGemm", ["Float"], ["mm", "relu"]), good[1]]
    check = check_engine_precisions(bad, typed)
    assert [layer.name for layer in check.mismatches] == ["mm + relu"] and check.half_layers == 0
    assert check.summary().startswith("1 of 1 engine layers of FP16 nodes run in FP32: mm + relu")
