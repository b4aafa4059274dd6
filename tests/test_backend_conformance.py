"""Every backend of the table passes the same checks (issue 25, "Backends as a table").

One test per check, parametrized by every row of :data:`fp16guard.backends.BACKEND_TABLE` and every
kind of model the row accepts (``emulate-onnx``, ``emulate-torch``, ``onnxruntime-onnx``,
``torch-torch``, ``tensorrt-onnx``), on tiny models computed for real: ONNX graphs built with
``onnx.helper`` and converted by :func:`~fp16guard.fp16_onnx.to_typed_fp16`, PyTorch modules captured
and converted by :func:`~fp16guard.fixing.torch_pass.to_fp16_program`. A backend that cannot run here
(no GPU, no CUDA EP, no TensorRT) is skipped with the reason its construction or build gave.

* the row agrees with the class (``accepts``, ``device``, ``name``) and the class declares what
  happens to subnormals;
* overflow gives inf (and -inf), values in range come back rounded to FP16;
* subnormals are kept or flushed as the class's ``subnormals`` says;
* a BF16 island rounds to BF16 (8 significant bits) and holds values beyond FP16;
* outputs come back in the model's order;
* a missing input or a wrong dtype is the same :class:`~fp16guard.errors.InputError` everywhere.

A backend added to the table is checked by adding its row; one outside the package can be checked
by registering its row in a plugin: ``python -m pytest tests/test_backend_conformance.py -p my_backend``
(``docs/backends.md``).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fp16guard.backends import BACKEND_TABLE, MODEL_KINDS, get_backend
from fp16guard.errors import BackendError, InputError, MissingDependencyError, first_line
from fp16guard.fp16 import FP16_MAX
from fp16guard.fp16_onnx import to_typed_fp16

CASES = [pytest.param(name, kind, id=f"{name}-{kind}")
         for name, spec in BACKEND_TABLE.items() for kind in MODEL_KINDS if kind in spec.accepts]
SHAPE = [4]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Engines and timing caches (tensorrt) in the test's folder, not the user's cache."""
    monkeypatch.setenv("FP16GUARD_CACHE", str(tmp_path))


def _backend(name: str):
    try:
        return get_backend(name)
    except (BackendError, MissingDependencyError) as e:
        pytest.skip(f"backend {name} cannot run here: {first_line(e)}")


def _build(backend, model):
    try:
        return backend.build(model)
    except BackendError as e:  # TensorRT-RTX on a GPU it builds for but cannot run on
        pytest.skip(f"backend {backend.name} cannot build here: {first_line(e)}")


# --- the models, in both kinds ----------------------------------------------------------------


def _onnx(nodes, outputs, inits, *, islands=(), island_dtype=TensorProto.FLOAT):
    """A typed FP16 ONNX model of ``nodes`` on ``x`` (float32 [4]), its ``islands`` in ``island_dtype``."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, SHAPE) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return to_typed_fp16(m, node_block_list=list(islands), island_dtype=island_dtype)[0]


class _Scale(torch.nn.Module):
    """``x * c`` (one ``mul`` node)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x * self.c


class _TwoOutputs(torch.nn.Module):
    """``(x * 2, x * 3)``."""

    def forward(self, x):
        return x * 2.0, x * 3.0


def _program(module, islands=(), island_dtype=torch.float32):
    """The typed FP16 program of ``module`` captured on a float32 [4] input."""
    from fp16guard.fixing import torch_pass
    from fp16guard.torch_graph import capture

    example = (torch.ones(SHAPE),)
    gm = torch_pass.annotate(capture(module, [example]), example)
    return torch_pass.to_fp16_program(gm, islands, island_dtype)


def _scale(kind: str, c: float, *, island: str | None = None):
    """``y = x * c`` as a model of ``kind``, the multiply in FP16 (or a BF16 island)."""
    if kind == "onnx":
        islands = ["mul"] if island else []
        return _onnx([helper.make_node("Mul", ["x", "c"], ["y"], name="mul")], ["y"], {"c": np.full(SHAPE, c)},
                     islands=islands, island_dtype=TensorProto.BFLOAT16 if island else TensorProto.FLOAT)
    return _program(_Scale(c), ["mul"] if island else [], torch.bfloat16 if island else torch.float32)


def _two_outputs(kind: str):
    """``b = x * 2`` and ``a = x * 3``, declared in the order ``b, a`` (the nodes in the other order)."""
    if kind == "onnx":
        return _onnx([helper.make_node("Mul", ["x", "three"], ["a"], name="mul_a"),
                      helper.make_node("Mul", ["x", "two"], ["b"], name="mul_b")],
                     ["b", "a"], {"two": np.full(SHAPE, 2.0), "three": np.full(SHAPE, 3.0)})
    return _program(_TwoOutputs())


def _run(engine, x):
    return engine.run({engine.input_names[0]: np.asarray(x, np.float32)})


# --- the checks --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKEND_TABLE))
def test_the_row_agrees_with_the_class(name):
    spec = BACKEND_TABLE[name]
    try:
        cls = spec.load(name)
    except MissingDependencyError as e:
        pytest.skip(f"backend {name} cannot be imported here: {first_line(e)}")
    assert cls.name == name
    assert cls.accepts == spec.accepts and spec.accepts <= set(MODEL_KINDS) and spec.accepts
    assert cls.device == spec.device and spec.device in ("cpu", "cuda")
    assert cls.subnormals in ("kept", "flushed", "either")
    assert spec.description and "\n" not in spec.description


@pytest.mark.parametrize("name, kind", CASES)
def test_overflow_gives_inf_and_values_in_range_round_to_fp16(name, kind, isolated_cache):
    backend = _backend(name)
    engine = _build(backend, _scale(kind, 1000.0))
    assert "\n" not in (engine.description or backend.describe())
    x = np.array([100.0, -100.0, 1.0, 1.0001], np.float32)
    (y,) = _run(engine, x)
    assert y.dtype == np.float32 and y.shape == tuple(SHAPE)
    assert np.isposinf(y[0]) and np.isneginf(y[1])  # 1e5 is beyond FP16_MAX
    want = (x[2:].astype(np.float16).astype(np.float32) * np.float32(1000.0)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(y[2:], want)
    assert want[1] != np.float32(x[3]) * 1000 and abs(want[1]) <= FP16_MAX  # FP16's rounding, not FP32's


@pytest.mark.parametrize("name, kind", CASES)
def test_subnormals_are_kept_or_flushed_as_the_backend_declares(name, kind, isolated_cache):
    backend = _backend(name)
    engine = _build(backend, _scale(kind, 2.0 ** -10))
    x = np.array([2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -4, 2.0 ** -14], np.float32)
    (y,) = _run(engine, x)
    subnormal = np.array([2.0 ** -20, 3 * 2.0 ** -20], np.float32)  # below 2^-14: FP16 subnormals
    np.testing.assert_array_equal(y[2:], [2.0 ** -14, 2.0 ** -24])  # the smallest normal and subnormal
    if type(backend).subnormals == "kept":
        np.testing.assert_array_equal(y[:2], subnormal)
    elif type(backend).subnormals == "flushed":
        np.testing.assert_array_equal(y[:2], [0, 0])
    else:
        assert all(v in (0, s) for v, s in zip(y[:2], subnormal)), y


@pytest.mark.parametrize("name, kind", CASES)
def test_a_bf16_island_rounds_to_bf16_and_holds_values_beyond_fp16(name, kind, isolated_cache):
    backend = _backend(name)
    engine = _build(backend, _scale(kind, 100.0, island="bf16"))
    x = np.array([1001.0, 3.0, -1001.0, 1.0], np.float32)  # 1001 needs 10 significant bits: BF16 keeps 8
    (y,) = _run(engine, x)
    bf16 = ml_dtypes.bfloat16
    want = (x.astype(bf16).astype(np.float32) * np.float32(100.0)).astype(bf16).astype(np.float32)
    np.testing.assert_array_equal(y, want)
    assert y[0] == 99840.0 and y[0] > FP16_MAX and np.isfinite(y).all()  # not inf: BF16 has FP32's range


@pytest.mark.parametrize("name, kind", CASES)
def test_outputs_come_back_in_the_models_order(name, kind, isolated_cache):
    backend = _backend(name)
    engine = _build(backend, _two_outputs(kind))
    x = np.array([1.0, 2.0, -3.0, 0.5], np.float32)
    out = _run(engine, x)
    assert len(out) == len(engine.output_names) == 2
    if kind == "onnx":
        assert engine.output_names == ["b", "a"]
    np.testing.assert_array_equal(out[0], x * 2)
    np.testing.assert_array_equal(out[1], x * 3)


@pytest.mark.parametrize("name, kind", CASES)
def test_a_wrong_feed_is_the_same_input_error_everywhere(name, kind, isolated_cache):
    backend = _backend(name)
    engine = _build(backend, _scale(kind, 2.0))
    x = np.ones(SHAPE, np.float32)
    with pytest.raises(InputError, match=r"missing model input 'x' \(the model takes: x\)"):
        engine.run({"not_x": x})
    with pytest.raises(InputError, match="input 'x' must be float32, got int64"):
        engine.run({"x": x.astype(np.int64)})
    if kind == "onnx":  # a program runs on any size its ops take; an ONNX graph declares its dims
        with pytest.raises(InputError, match=r"input 'x' must have shape \[4\], got \[5\]"):
            engine.run({"x": np.ones(5, np.float32)})
    # float64 is cast to the declared float32; extra keys are ignored
    np.testing.assert_array_equal(engine.run({"x": x.astype(np.float64), "unused": x})[0], x * 2)


@pytest.mark.parametrize("name", [n for n, spec in BACKEND_TABLE.items() if "torch" not in spec.accepts])
def test_a_pytorch_program_is_refused_by_a_backend_that_takes_none(name, isolated_cache):
    backend = _backend(name)
    with pytest.raises(BackendError, match=r"runs ONNX models only; PyTorch programs run on emulate"):
        backend.build(_program(_Scale(2.0)))


@pytest.mark.parametrize("name", [n for n, spec in BACKEND_TABLE.items() if "torch" in spec.accepts])
def test_a_bisect_prefix_runs_as_its_half_program(name, isolated_cache):
    """``build_module`` (bisect's PyTorch route): an FP32 module run with FP16 weights and inputs."""
    from fp16guard.torch_graph import capture

    backend = _backend(name)
    module = torch.nn.Linear(4, 4)
    with torch.no_grad():
        module.weight.copy_(torch.eye(4) * 1000.0)
        module.bias.zero_()
    prefix = capture(module, [(torch.ones(SHAPE),)])
    engine = backend.build_module(prefix, (torch.ones(SHAPE),))
    x = np.array([100.0, 1.0, 0.5, 1.0001], np.float32)
    (y,) = _run(engine, x)
    assert np.isposinf(y[0]) and y[1] == 1000.0 and y[2] == 500.0
    assert y[3] == np.float32(np.float16(np.float16(1.0001) * np.float16(1000.0)))
    assert all(t.dtype == torch.float32 for t in prefix.state_dict().values())  # the prefix is not changed
