"""Typed FP16 conversion and the strict CPU emulation, against numpy's IEEE float16."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from fp16guard.backends import get_backend
from fp16guard.errors import BackendError
from fp16guard.fp16_onnx import emulation_model, emulation_session_options, to_typed_fp16


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(np.asarray(v, np.float32), k)
                                                      for k, v in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _up_down():
    """x * 1000 * 0.001 + 1e-10: exact in FP32, the middle overflows FP16 for |x| > 65.5."""
    return _model([helper.make_node("Mul", ["x", "a"], ["y"], name="up"),
                   helper.make_node("Mul", ["y", "b"], ["z"], name="down"),
                   helper.make_node("Add", ["z", "eps"], ["w"], name="add_eps")],
                  [_vi("x", [3])], [_vi("w", [3])], [("a", 1000), ("b", 0.001), ("eps", 1e-10)])


def _run(model, feeds, options=None):
    s = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def test_typed_fp16_graph_is_valid_fp16_inside_fp32_at_the_boundary():
    m16, conversion = to_typed_fp16(_up_down())
    onnx.checker.check_model(m16, full_check=True)
    inits = {i.name: i.data_type for i in m16.graph.initializer}
    assert inits == {"a": TensorProto.FLOAT16, "b": TensorProto.FLOAT16, "eps": TensorProto.FLOAT16}
    assert m16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert m16.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert [n.op_type for n in m16.graph.node] == ["Cast", "Mul", "Mul", "Add", "Cast"]
    assert conversion.casts == 2
    # the epsilon does not fit (flushes to zero); reported, not silently raised to 1e-7
    assert [(u.name, u.flushed, u.overflow) for u in conversion.unfit] == [("eps", 1, 0)]


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64),
                  elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False)))
def test_weights_are_stored_as_numpy_float16_never_clamped(values):
    m = _model([helper.make_node("Mul", ["x", "w"], ["y"])], [_vi("x", [values.size])], [_vi("y", [values.size])],
               [("w", values)])
    m16, conversion = to_typed_fp16(m)
    stored = numpy_helper.to_array(m16.graph.initializer[0])
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    np.testing.assert_array_equal(stored, want)  # inf stays inf: no clamp to 1e4 or 65504
    assert sum(u.overflow for u in conversion.unfit) == int(np.sum(np.abs(values) > 65504))


def test_emulation_rounds_every_tensor_through_fp16():
    x = np.array([100.0, 1.0, 1e-3], np.float32)
    em = emulation_model(to_typed_fp16(_up_down())[0])
    out = _run(em, {"x": x}, emulation_session_options())
    # per op, as numpy float16 would: x*1000 overflows for 100, rounds for the others
    with np.errstate(over="ignore"):
        h = np.float16
        want = (((x.astype(h) * h(1000)).astype(h) * h(0.001)).astype(h) + h(0.0)).astype(np.float32)
    np.testing.assert_array_equal(out, want)
    assert np.isinf(out[0])
    assert np.all(np.isfinite(_run(_up_down(), {"x": x})))  # FP32 is fine


def test_emulation_keeps_subnormals_and_flushes_below_them():
    # y = x * 2**-20: FP16 keeps 2**-20 * 1 (subnormal) and flushes 2**-20 * 2**-6 = 2**-26
    m = _model([helper.make_node("Mul", ["x", "s"], ["y"])], [_vi("x", [3])], [_vi("y", [3])], [("s", 2.0**-20)])
    x = np.array([1.0, 2.0**-6, 3.0], np.float32)
    out = _run(emulation_model(to_typed_fp16(m)[0]), {"x": x}, emulation_session_options())
    np.testing.assert_array_equal(out, (x * 2.0**-20).astype(np.float16).astype(np.float32))
    assert out[0] == 2.0**-20 and out[1] == 0.0


def test_onnxruntime_cpu_ep_hides_the_overflow_that_emulation_shows():
    """Why the emulate backend exists: the CPU EP runs this typed FP16 graph without the inf."""
    x = np.array([100.0, 1.0, 1e-3], np.float32)
    m16 = to_typed_fp16(_up_down())[0]
    cpu = _run(m16, {"x": x})
    assert np.isfinite(cpu[0]) and cpu[0] == pytest.approx(100, rel=1e-2)
    assert np.isinf(get_backend("emulate").build(m16).run({"x": x})[0][0])


def test_onnxruntime_backend_refuses_the_cpu_ep_unless_asked():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA EP present")
    with pytest.raises(BackendError, match="--backend emulate"):
        get_backend("onnxruntime")
    assert "CPU EP" in get_backend("onnxruntime", allow_cpu=True).describe()


def test_backend_errors_name_what_to_do():
    import torch

    with pytest.raises(ValueError, match="unknown backend 'fp8'.*emulate"):
        get_backend("fp8")
    from fp16guard.errors import MissingDependencyError

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"fp16guard\[tensorrt\]"):
            get_backend("tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA device"):
            get_backend("torch")


def test_engines_are_cached_by_content_hash():
    backend = get_backend("emulate")
    m16 = to_typed_fp16(_up_down())[0]
    assert backend.build(m16) is backend.build(to_typed_fp16(_up_down())[0])
    assert backend.builds == 1


def test_resize_runs_in_fp16_with_its_scales_in_fp32():
    m = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")],
               [_vi("x", [1, 1, 2, 2])], [_vi("y", [1, 1, 4, 4])], [("scales", [1, 1, 2, 2])])
    m16, _ = to_typed_fp16(m)
    onnx.checker.check_model(m16, full_check=True)
    types = {i.name: i.data_type for i in m16.graph.initializer}
    assert types["scales"] == TensorProto.FLOAT
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2) * 3e4  # 9e4 overflows
    out = get_backend("emulate").build(m16).run({"x": x})[0]
    assert out.shape == (1, 1, 4, 4) and np.isinf(out).sum() == 4
