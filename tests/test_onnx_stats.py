"""Range statistics inside the ONNX graph (fp16guard.onnx_stats) and the fix's one joint calibration
run of the base and prepared graphs (fp16guard.fixing.joint_ranges): the same numbers as the
values exposed and reduced on the host, from one ONNX Runtime run per input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fix_cases import constant, masked_attention, normal, opset_model
from onnx import TensorProto as TP
from onnx import helper

from fp16guard.fixing.joint_ranges import PREPARED_SUFFIX, joint_model
from fp16guard.fixing.targets import OnnxFixTarget
from fp16guard.inputs import NamedInput
from fp16guard.onnx_graph import activation_values, value_types
from fp16guard.onnx_ranges import value_ranges
from fp16guard.onnx_stats import FLOAT_COUNT_LIMIT, statistics_model


def _ranges_model(opset=17):
    """x -> every kind of element the statistics count: exact zeros (Relu), values FP16 flushes
    (x * 1e-9) and keeps as subnormals (x * 1e-6), an fp16 and a float64 copy, inf and NaN (log of
    x and of -|x|... at zeros), an empty slice."""
    nodes = [helper.make_node("Relu", ["x"], ["relu"]),
             helper.make_node("Mul", ["x", "tiny"], ["flushed"]),
             helper.make_node("Mul", ["x", "small"], ["subnormal"]),
             helper.make_node("Cast", ["x"], ["half"], to=TP.FLOAT16),
             helper.make_node("Cast", ["x"], ["double"], to=TP.DOUBLE),
             helper.make_node("Log", ["relu"], ["log"]),  # -inf at the zeros
             helper.make_node("Sqrt", ["x"], ["sqrt"]),  # NaN below zero
             helper.make_node("Mul", ["x", "big"], ["huge"]),
             helper.make_node("Slice", ["x", "s0", "s0", "ax"], ["empty"]),
             helper.make_node("Cast", ["half"], ["back"], to=TP.FLOAT)]
    inits = [constant("tiny", 1e-9), constant("small", 1e-6), constant("big", 3e38),
             constant("s0", [0], np.int64), constant("ax", [3], np.int64)]
    outs = ["relu", "flushed", "subnormal", "log", "sqrt", "huge", "empty", "back", "double"]
    types = {"double": TP.DOUBLE}
    graph = helper.make_graph(nodes, "ranges", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(o, types.get(o, TP.FLOAT), None) for o in outs], inits)
    return opset_model(graph, opset)


@pytest.mark.parametrize("opset", [11, 17, 18])
def test_in_graph_statistics_equal_the_host_reduction_value_for_value(opset):
    model = _ranges_model(opset)
    feeds = [normal(1), normal(2) * 3]
    graph = value_ranges(model, feeds)
    host = value_ranges(model, feeds, method="expose")
    assert [set(r) for r in graph] == [set(r) for r in host]
    assert graph == host  # amax, numel and every count: the same numbers
    run = graph[0]
    assert run["log"].nonfinite > 0 and run["sqrt"].nonfinite > 0 and run["huge"].amax > 1e38
    assert run["flushed"].flush_to_zero == run["flushed"].nonzero > 0 and run["subnormal"].subnormal > 0
    assert run["relu"].nonzero < run["relu"].numel and run["empty"] == run["empty"].__class__(0.0, 0)
    assert run["half"].amax == pytest.approx(run["x"].amax, rel=1e-3)


def test_the_statistics_graph_returns_scalars_only_and_counts_large_values_as_int32():
    model = _ranges_model()
    types = value_types(model)
    values, _ = activation_values(model, types)
    big = {v: 8 * (FLOAT_COUNT_LIMIT + 1) for v in values}  # bytes: over the limit at any itemsize
    graph, outputs = statistics_model(model, values, types, sizes=big)
    assert all(not o.type.tensor_type.shape.dim for o in graph.graph.output)  # every output a scalar
    assert all(o.count_type == TP.INT32 for o in outputs)
    small, outputs = statistics_model(model, values, types, sizes={v: 4 for v in values}, counts={"relu"})
    assert [o.value for o in outputs if o.counts] == ["relu"] and outputs[0].count_type == TP.FLOAT
    assert len(small.graph.output) == 3 * len(values) + 3


def test_amax_only_statistics_keep_amax_and_inf_nan_counts():
    model = _ranges_model()
    full, = value_ranges(model, [normal(3)])
    quick, = value_ranges(model, [normal(3)], counts=False)
    for name, s in full.items():
        assert (quick[name].amax, quick[name].numel, quick[name].nonfinite) == (s.amax, s.numel, s.nonfinite)
        assert quick[name].flush_to_zero == quick[name].subnormal == 0


def _bn_and_mask_model():
    """A conv whose BatchNorm folds, a BatchNorm that cannot fold (no conv before it: Mul + Add,
    a new ``__scaled`` value), then a finfo.min mask added to scores and a softmax."""
    rng = np.random.default_rng(0)
    c = 4
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"]),
             helper.make_node("BatchNormalization", ["conv", "g", "beta", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["relu"]),
             helper.make_node("BatchNormalization", ["relu", "g", "beta", "mean", "var"], ["bn2"]),
             helper.make_node("Mul", ["bn2", "mask"], ["masked_scale"]),
             helper.make_node("Add", ["bn2", "neg"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["p"], axis=-1)]
    mask = np.zeros((1, 1, 1, 8), np.float32)
    mask[..., 6:] = np.finfo(np.float32).min
    inits = [constant("w", rng.normal(size=(c, 3, 1, 1)) * 50), constant("b", rng.normal(size=c)),
             constant("g", rng.uniform(0.5, 2, c)), constant("beta", rng.normal(size=c)),
             constant("mean", rng.normal(size=c)), constant("var", rng.uniform(0.1, 1, c)),
             constant("mask", np.ones((1, 1, 1, 8))), constant("neg", mask)]
    graph = helper.make_graph(nodes, "bn_mask", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("p", TP.FLOAT, None),
                               helper.make_tensor_value_info("masked_scale", TP.FLOAT, None)], inits)
    return opset_model(graph)


@pytest.mark.parametrize("build", [_bn_and_mask_model, masked_attention])
def test_one_joint_run_measures_the_base_and_the_prepared_graph_as_two_runs_do(build):
    model = build()
    target = OnnxFixTarget(model)
    joint = joint_model(target.base, target.prepared)
    assert joint is not None
    inputs = ([NamedInput(f"x{s}", (normal(s),)) for s in (1, 2)] if build is _bn_and_mask_model else
              [NamedInput(f"b{s}", (normal(s, (2, 4, 8)), np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int64)))
               for s in (1, 2)])
    feeds = [target.feed(i) for i in inputs]
    base = value_ranges(target.base, feeds, counts=False)
    prepared = value_ranges(target.prepared, feeds, counts=False)
    got_base = [target.activation_amax([i], prepared=False) for i in inputs]
    got_prepared = [target.activation_amax([i]) for i in inputs]
    for want, got in ((base, got_base), (prepared, got_prepared)):
        for run, amax in zip(want, got):
            assert set(run) == set(amax)
            for name, s in run.items():
                assert amax[name] == pytest.approx(s.amax, rel=1e-5, abs=1e-30), name
    changed = [v for v, j in joint.prepared_values.items() if j != v]
    if build is _bn_and_mask_model:
        assert "bn2__scaled" in joint.prepared_values and changed == ["scores"]  # the mask Add only
        assert got_base[0]["scores"] > 1e38 > 1e5 > got_prepared[0]["scores"] >= 2 ** 15  # finfo.min vs -2^15
        assert "conv" in got_base[0] and "conv" not in got_prepared[0]  # folded away
    assert all(j.endswith(PREPARED_SUFFIX) for v, j in joint.prepared_values.items() if v in changed)


def test_a_fix_calibrates_with_one_run_per_input(tmp_path):
    """The statistics graph of the calibration is the joint graph: every output a scalar, so one ONNX
    Runtime run per input returns them all; the flush counts only where a flushed constant is read."""
    target = OnnxFixTarget(_bn_and_mask_model())
    assert target._count_values() == set()
    joint = joint_model(target.base, target.prepared)
    types = value_types(joint.model)
    graph, outputs = statistics_model(joint.model, joint.measured, types, counts=False)
    assert len(graph.graph.output) == 3 * len(joint.measured)
    assert not any(o.counts for o in outputs)


def test_the_calibration_run_gives_the_fp32_references_of_its_inputs():
    """A fix's references on its calibration inputs come from the calibration run (the joint
    graph keeps the model's outputs); a validation input the calibration never saw runs apart.
    Both agree with a plain ONNX Runtime run of the model as given, to float32 rounding (the runs
    fuse ops differently: 3e-6 relative on softmax weights of 1e-13, and 0 on the rest)."""
    import onnxruntime as ort

    model = _bn_and_mask_model()
    target = OnnxFixTarget(model)
    calib, other = NamedInput("c", (normal(1),)), NamedInput("v", (normal(2),))
    target.activation_amax([calib])
    assert [i for i, _ in target._outputs] == [calib]
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for item, got in zip([calib, other], target.references([calib, other])):
        want = plain.run(None, target.feed(item))
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()))
