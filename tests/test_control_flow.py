"""Control flow (If, Loop, Scan): inspect, calibrate, the typed FP16 conversion, the emulator, bisect and
fix enter subgraphs (fp16guard.control_flow)."""

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fix_cases import (
    CONTROL_FLOW,
    CONTROL_FLOW_INPUTS,
    constant,
    if_model,
    loop_model,
    opset_model,
    squeeze_inputs,
    squeeze_model,
)
from onnx import TensorProto as TP
from onnx import helper

from fp16guard import control_flow
from fp16guard.cli import main
from fp16guard.fixing import calibrate, fix_model
from fp16guard.fp16_onnx import emulation_model, emulation_session_options, to_typed_fp16
from fp16guard.inspect.onnx_inspector import inspect_onnx
from fp16guard.onnx_ranges import value_ranges


#: The calibration inputs of ``if_model`` and ``loop_model``, the first alone, and every case by name
#: (the models: ``tests/fix_cases.py``, shared with ``benchmarks/fix_always_delivers.py``).
X, CALIB, CASES = CONTROL_FLOW_INPUTS[0], CONTROL_FLOW_INPUTS, CONTROL_FLOW


def _run(model, x, options=None):
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, x)[0]


def test_the_models_have_control_flow():
    for make, _, _ in CASES.values():
        m = make()
        onnx.checker.check_model(m, full_check=True)
        assert any(n.op_type in ("If", "Loop") for n in m.graph.node)


def test_values_inside_subgraphs_are_measured_per_branch_taken():
    negative = value_ranges(if_model(), [-X])[0]
    assert "e_out" in negative and "t_big" not in negative  # else taken
    runs = value_ranges(if_model(), [X, -X])
    assert runs[0]["t_big"].amax == 1e5 and runs[0]["t_out"].amax == pytest.approx(100100)
    assert "e_out" not in runs[0] and "t_big" not in runs[1]
    loop = value_ranges(loop_model(), [X])[0]
    assert loop["acc_scaled"].amax == pytest.approx(111000) and loop["acc_scaled"].numel == 12  # 3 iterations
    assert loop["acc"].amax == pytest.approx(111100)
    gone = control_flow.unmeasured(if_model(), value_ranges(if_model(), [X]))
    assert [(n.name, attr) for n, attr in gone] == [("branch", "else_branch")]


def test_inspect_records_inner_nodes_and_finds_the_overflow_inside(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fp16guard"):
        report = inspect_onnx(if_model(), [X])
    calls = {c.name: c for c in report.calls}
    assert [c.name for c in report.calls] == ["sum", "then_mul", "then_add", "branch", "down"]
    assert calls["then_mul"].transition == "from" and calls["then_mul"].outputs.amax == 1e5
    assert "branch else of If 'branch' never ran" in caplog.text
    for name, (make, inputs, _) in CASES.items():
        onnx.save(make(), tmp_path / f"{name}.onnx")
        np.save(tmp_path / f"{name}.npy", inputs()[0])
        assert main(["inspect", str(tmp_path / f"{name}.onnx"), "--input", str(tmp_path / f"{name}.npy"), "-q",
                     "--json", str(tmp_path / f"{name}.json")]) == 1, name
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["calls"], name


def test_typed_fp16_conversion_enters_subgraphs():
    for name, (make, inputs, feed) in CASES.items():
        model = make()
        fp16, conversion = to_typed_fp16(model)
        onnx.checker.check_model(fp16, full_check=True)
        inner = [n for n, _, _ in control_flow.inner_nodes(fp16.graph)]
        computing = [n for n in inner if n.op_type not in ("Cast", "Constant", "Identity")]
        assert computing, name
        types = control_flow.inner_types(fp16)
        for node in computing:  # FP16 inside
            assert all(types.get(o) in (TP.FLOAT16, TP.BOOL, TP.INT64) for o in node.output), (name, node.name)
        for owner in fp16.graph.node:  # FP32 at the control flow node's boundary
            for _, sub in control_flow.subgraphs(owner):
                assert all(o.type.tensor_type.elem_type in (TP.FLOAT, TP.BOOL) for o in sub.output)
        x = inputs()[1]
        out = _run(fp16, {feed: x})  # ONNX Runtime runs it
        assert out.dtype == np.float32
    # an island inside the body: the nodes the plan names stay FP32 there
    fp16, conversion = to_typed_fp16(loop_model(), node_block_list=["body_mul", "body_add"])
    onnx.checker.check_model(fp16, full_check=True)
    assert conversion.fp32_nodes == ["body_mul", "body_add"]
    body = fp16.graph.node[0].attribute[0].g
    assert {i.name: i.data_type for i in body.initializer} == {} and \
           {i.name: i.data_type for i in fp16.graph.initializer}["k10"] == TP.FLOAT


def test_the_emulator_rounds_inside_the_subgraph():
    """``x + 2^-12 - x`` inside the branch: exact in FP32 (2^-12 for x = 1), 0 in FP16 (1 + 2^-12 rounds to 1)."""
    then = helper.make_graph([helper.make_node("Add", ["x", "tiny"], ["t1"], name="then_add"),
                              helper.make_node("Sub", ["t1", "x"], ["t2"], name="then_sub")],
                             "then", [], [helper.make_tensor_value_info("t2", TP.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="else_id")],
                              "else", [], [helper.make_tensor_value_info("e", TP.FLOAT, [1])])
    m = opset_model(helper.make_graph([
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="branch"),
    ], "round", [helper.make_tensor_value_info("x", TP.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [1])],
        [constant("zero", 0.0), constant("tiny", 2.0 ** -12)]))
    x = {"x": np.ones(1, np.float32)}
    assert _run(m, x)[0] == 2.0 ** -12
    fp16, _ = to_typed_fp16(m)
    emulated = emulation_model(fp16)
    onnx.checker.check_model(emulated, full_check=True)
    assert _run(emulated, x, emulation_session_options())[0] == 0.0
    branch = next(n for n in emulated.graph.node if n.op_type == "If")
    then = next(a.g for a in branch.attribute if a.name == "then_branch")
    rounds = [n.name for n in then.node if n.op_type == "Cast"]
    assert any(r.endswith("__round0") for r in rounds)  # the Cast(FLOAT16) -> Cast(FLOAT) pairs inside the branch


def test_a_static_if_is_inlined():
    """TorchScript's squeeze If with shapes fixed: its condition follows from static shapes alone."""
    m = squeeze_model()
    for d in m.graph.input[0].type.tensor_type.shape.dim:
        d.ClearField("dim_param")
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, (2, 1, 8)):
        d.dim_value = v
    flat, notes = control_flow.normalize(m)
    assert not control_flow.has_control_flow(flat) and "then branch is inlined" in notes[-1]
    x = squeeze_inputs()[0]
    np.testing.assert_array_equal(_run(flat, {"x": x}), _run(m, {"x": x}))
    dynamic, _ = control_flow.normalize(squeeze_model())
    assert control_flow.has_control_flow(dynamic)  # dimension 1 unknown: the If stays


@pytest.mark.parametrize("name", list(CASES))
def test_bisect_runs_on_models_with_control_flow(name, tmp_path):
    make, inputs, _ = CASES[name]
    onnx.save(make(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", inputs()[0])
    code = main(["bisect", str(tmp_path / "m.onnx"), "--backend", "emulate", "--input", str(tmp_path / "x.npy"),
                 "-q", "--json", str(tmp_path / "b.json")])
    doc = json.loads((tmp_path / "b.json").read_text())
    assert code == 1 and doc["found"], doc
    main_nodes = {n.name for n in make().graph.node}
    assert set(doc["candidates"]) <= main_nodes  # cuts at main-graph nodes only
    blamed = doc["offenders"][0]["name"]
    assert blamed == {"if": "branch", "loop": "loop", "squeeze": "/Mul_1"}[name], doc["offenders"]


@pytest.mark.parametrize("name", list(CASES))
def test_calibrate_and_fix_models_with_control_flow(name, tmp_path, caplog):
    make, inputs, _ = CASES[name]
    calib = inputs()
    with caplog.at_level(logging.WARNING, logger="fp16guard"):
        plan = calibrate(make(), calib)
    if name == "if":  # every calibration input takes the then-branch
        assert "branch else of If 'branch' never ran in calibration: converted to FP16 unmeasured" in caplog.text
        islands = {n for u in plan.unfixable for n in u["nodes"]}
        assert {"then_mul", "then_add"} <= islands
    if name == "loop":
        assert {"body_mul", "body_add"} <= {n for u in plan.unfixable for n in u["nodes"]}
    if name == "squeeze":
        assert "branch else of If '/If' never ran" in caplog.text
    validation = [-c for c in calib] if name == "if" else calib[:1]  # the if model's else branch in validation
    result = fix_model(make(), calib, validation=validation)
    onnx.checker.check_model(result.fixed, full_check=True)
    assert control_flow.has_control_flow(result.fixed)
    assert result.verification.finite
    worst = max(r.rel_l2 for r in result.verification.rows)
    fallback = max(r.rel_l2 for r in result.fallback.rows)
    assert worst <= 1.5 * fallback + 2 ** -10, (worst, fallback)
    assert result.naive is None or not result.naive.finite
    if name != "loop":
        assert any(n.kind == "control_flow" and "never ran" in n.detail for n in result.notes)
    onnx.save(make(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", calib[0])
    argv = [str(tmp_path / "m.onnx"), "--input", str(tmp_path / "x.npy"), "-q"]
    assert main(["calibrate", *argv, "-o", str(tmp_path / "plan.json")]) == 0
    assert main(["fix", *argv, "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "f.onnx")]) == 0
    fixed = onnx.load(str(tmp_path / "f.onnx"))
    out = _run(fixed, {"x": calib[0]})
    assert np.isfinite(out).all()


def nested_model():
    """A Loop whose body holds an If whose two branches define the same name ``t``, and a Scan (running
    sum of rows x 100: its state reaches 7.5e4)."""
    half = helper.make_graph([helper.make_node("Mul", ["acc_in", "half"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TP.FLOAT, None)])
    grow = helper.make_graph([helper.make_node("Mul", ["acc_in", "k10"], ["t"])], "else", [],
                             [helper.make_tensor_value_info("t", TP.FLOAT, None)])
    body = helper.make_graph([
        helper.make_node("ReduceMax", ["acc_in"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "thousand"], ["big"]),
        helper.make_node("If", ["big"], ["acc_out"], then_branch=half, else_branch=grow),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ], "body", [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("cond_in", TP.BOOL, []),
                helper.make_tensor_value_info("acc_in", TP.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []),
         helper.make_tensor_value_info("acc_out", TP.FLOAT, None)])
    scan = helper.make_graph([helper.make_node("Mul", ["row", "k100"], ["r100"]),
                              helper.make_node("Add", ["s_in", "r100"], ["s_out"]),
                              helper.make_node("Identity", ["s_out"], ["scan_o"])], "scan_body",
                             [helper.make_tensor_value_info("s_in", TP.FLOAT, [4]),
                              helper.make_tensor_value_info("row", TP.FLOAT, [4])],
                             [helper.make_tensor_value_info("s_out", TP.FLOAT, [4]),
                              helper.make_tensor_value_info("scan_o", TP.FLOAT, [4])])
    return opset_model(helper.make_graph([
        helper.make_node("Loop", ["trips", "", "x"], ["acc"], body=body, name="loop"),
        helper.make_node("Mul", ["acc", "k001"], ["y"], name="down"),
        helper.make_node("Scan", ["zeros", "rows"], ["s_final", "s_all"], body=scan, num_scan_inputs=1, name="scan"),
        helper.make_node("Mul", ["s_final", "k001"], ["z"], name="down2"),
    ], "nested", [helper.make_tensor_value_info("x", TP.FLOAT, [4]),
                  helper.make_tensor_value_info("rows", TP.FLOAT, [5, 4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [4]), helper.make_tensor_value_info("z", TP.FLOAT, [4])],
        [constant("trips", 5, np.int64), constant("half", 0.5), constant("k10", 10.0), constant("thousand", 1000.0),
         constant("k001", 0.001), constant("k100", 100.0), constant("zeros", np.zeros(4))]))


def test_nested_control_flow_and_scan():
    model = nested_model()
    feed = {"x": np.array([3, 5, 7, 9], np.float32), "rows": np.full((5, 4), 150, np.float32)}
    flat, notes = control_flow.normalize(model)
    assert "renamed to be unique" in notes[0]  # the two branches' t
    stats = value_ranges(flat, [feed])[0]
    assert stats["t"].amax == 9000 and stats["t__1"].amax == 4500  # else ran 3 times, then twice
    assert stats["s_out"].amax == 75000 and stats["s_out"].numel == 20  # 5 scan steps
    fp16, _ = to_typed_fp16(flat)
    onnx.checker.check_model(fp16, full_check=True)
    emulated = emulation_model(fp16)
    out = ort.InferenceSession(emulated.SerializeToString(), emulation_session_options(),
                               providers=["CPUExecutionProvider"]).run(None, feed)
    assert np.isinf(out[1]).all() and np.isfinite(out[0]).all()  # the scan's state overflows inside
    result = fix_model(model, [tuple(feed.values())])
    assert result.verification.finite
    assert {"scan/body/Add_1"} <= {n for u in result.plan.unfixable for n in u["nodes"]}
