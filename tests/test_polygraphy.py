"""TensorRT 10 precision constraints of the FP32 islands (``fix --layer-precisions``) and Polygraphy's
data files: inputs written by Polygraphy read as calibration inputs, and ``fix --save-outputs``
read back by Polygraphy's own ``RunResults`` and ``Comparator``."""

import json
import shlex

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fp16guard.cli import main
from fp16guard.errors import FixError, InputError, MissingDependencyError
from fp16guard.inputs import load_inputs, onnx_feed
from fp16guard.onnx_graph import cpu_session, value_types
from fp16guard.trt.precisions import LayerPrecisions

polygraphy_json = pytest.importorskip("polygraphy.json")
from polygraphy.comparator import Comparator, RunResults  # noqa: E402

try:  # Polygraphy 0.50+; CompareFunc.simple before
    from polygraphy.comparator import SimpleCompareFunc as simple_compare
except ImportError:
    from polygraphy.comparator import CompareFunc

    simple_compare = CompareFunc.simple


def _island_model(path):
    """``log(relu(x) + 1e-10) * 3 + b``: FP16 flushes the epsilon, so ``add_eps`` and ``log`` stay in
    FP32 (an island); ``relu``, ``scale`` and ``add_b`` run in FP16. Two inputs, fed by name."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "eps"], ["s"], name="add_eps"),
             helper.make_node("Log", ["s"], ["l"], name="log"),
             helper.make_node("Mul", ["l", "three"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add_b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(np.array(1e-10, np.float32), "eps"),
                               numpy_helper.from_array(np.array(3.0, np.float32), "three")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)


FEEDS = [{"x": np.array([0.0, 1.0, 2.0, 3.0], np.float32), "b": np.ones(4, np.float32)},
         {"b": np.array([0.0, -2.0, 0.5, 7.0], np.float32), "x": np.array([0.0, -1.0, 0.5, 8.0], np.float32)}]


def _flag_lines(path):
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def _trtexec_spec(value):
    """trtexec's reading of ``--layerPrecisions``/``--layerOutputTypes`` (TensorRT 10
    samples/common/sampleOptions.cpp: split the list on every comma, each item on its last colon)."""
    return dict(item.rsplit(":", 1) for item in value.split(","))


def _polygraphy_parse(line):
    """Polygraphy's own command-line parsing of a flag line (its argument groups, no TensorRT needed)."""
    import argparse

    from polygraphy.tools import args as pargs

    groups = {g: g() for g in (pargs.ModelArgs, pargs.DataLoaderArgs, pargs.OnnxInferShapesArgs, pargs.OnnxLoadArgs,
                               pargs.TrtConfigArgs, pargs.TrtLoadNetworkArgs)}
    parser = argparse.ArgumentParser()
    for g in groups.values():
        g.register(groups)
    for g in groups.values():
        g.add_parser_args(parser)
    args = parser.parse_args(["m.onnx", *shlex.split(line)])
    for g in groups.values():
        g.parse(args)
    return ({k: str(v) for k, v in groups[pargs.TrtLoadNetworkArgs].layer_precisions.items()},
            groups[pargs.TrtConfigArgs].precision_constraints)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """One ``fix`` of the island model on Polygraphy-written inputs, with every interop output."""
    d = tmp_path_factory.mktemp("island")
    _island_model(d / "m.onnx")
    polygraphy_json.save_json(FEEDS, str(d / "inputs.json"))  # what `polygraphy run --save-inputs inputs.json` writes
    files = {k: d / f for k, f in (("fixed", "fixed.onnx"), ("lp", "islands.txt"), ("lp_json", "islands.json"),
                                    ("fp32", "fp32.onnx"), ("out", "outputs.json"), ("report", "fix.json"))}
    assert main(["-q", "fix", str(d / "m.onnx"), "--input", str(d / "inputs.json"), "-o", str(files["fixed"]),
                 "--layer-precisions", str(files["lp"]), "--save-fp32", str(files["fp32"]),
                 "--save-outputs", str(files["out"]), "--json", str(files["report"])]) == 0
    assert main(["-q", "fix", str(d / "m.onnx"), "--input", str(d / "inputs.json"), "-o", str(d / "again.onnx"),
                 "--layer-precisions", str(files["lp_json"])]) == 0
    return d, files


def test_calibration_keeps_add_eps_and_log_in_fp32(fixed, tmp_path):
    d, _ = fixed
    assert main(["calibrate", str(d / "m.onnx"), "--input", str(d / "inputs.json"), "-o", str(tmp_path / "p.json")]) == 0
    assert [u["nodes"] for u in json.loads((tmp_path / "p.json").read_text())["unfixable"]] == [["add_eps", "log"]]


def test_the_layer_precisions_name_exactly_the_fp32_nodes_of_the_fixed_model(fixed):
    _, f = fixed
    typed = onnx.load(f["fixed"])
    types = value_types(typed)
    fp32 = [n.name for n in typed.graph.node if n.op_type != "Cast" and types[n.output[0]] == TensorProto.FLOAT]
    fp16 = [n.name for n in typed.graph.node if n.op_type != "Cast" and types[n.output[0]] == TensorProto.FLOAT16]
    assert fp32 == ["add_eps", "log"] and fp16 == ["relu", "scale", "add_b"]
    assert json.loads(f["report"].read_text())["fp32_nodes"] == fp32

    trtexec, polygraphy = _flag_lines(f["lp"])
    assert trtexec == ("--layerPrecisions=add_eps:fp32,log:fp32 --layerOutputTypes=add_eps:fp32,log:fp32 "
                       "--precisionConstraints=obey")
    assert polygraphy == "--layer-precisions add_eps:float32 log:float32 --precision-constraints obey"
    flags = dict(a.split("=", 1) for a in shlex.split(trtexec))
    assert _trtexec_spec(flags["--layerPrecisions"]) == {n: "fp32" for n in fp32}
    assert _trtexec_spec(flags["--layerOutputTypes"]) == {n: "fp32" for n in fp32}
    assert flags["--precisionConstraints"] == "obey"
    assert _polygraphy_parse(polygraphy) == ({n: "trt.float32" for n in fp32}, "obey")

    doc = json.loads(f["lp_json"].read_text())
    assert doc["schema"] == "fp16guard.layer-precisions/1"
    assert doc["fp32_layers"] == doc["float_outputs"] == fp32
    assert (doc["trtexec"], doc["polygraphy"]) == (trtexec, polygraphy)


def test_the_rewritten_fp32_model_holds_the_constrained_layers_and_no_fp16(fixed):
    _, f = fixed
    fp32 = onnx.load(f["fp32"])
    assert [n.name for n in fp32.graph.node] == ["relu", "add_eps", "log", "scale", "add_b"]
    assert set(value_types(fp32).values()) == {TensorProto.FLOAT}


def test_a_model_without_fp32_island_gets_a_file_saying_so(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"], name="double")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.array([1.0, -2.0, 3.0], np.float32))
    capsys.readouterr()
    for name in ("lp.txt", "lp.json"):
        assert main(["-q", "fix", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "x.npy"),
                     "-o", str(tmp_path / "o.onnx"), "--layer-precisions", str(tmp_path / name)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "precision constraints" in line]
    assert lines == [f"TensorRT precision constraints: {tmp_path / n} (no FP32 island: nothing to constrain)"
                     for n in ("lp.txt", "lp.json")]
    assert _flag_lines(tmp_path / "lp.txt") == ["", ""]
    assert "has no FP32 island" in (tmp_path / "lp.txt").read_text()
    doc = json.loads((tmp_path / "lp.json").read_text())
    assert (doc["fp32_layers"], doc["trtexec"], doc["polygraphy"]) == ([], "", "")


def test_names_with_a_comma_quote_or_star_are_refused_and_colons_and_spaces_pass():
    for name in ("a,b", "it's", "conv*"):
        with pytest.raises(FixError, match="rename the node"):
            LayerPrecisions((name,), ())
    lp = LayerPrecisions(("enc:0/Log", "head add"), ("enc:0/Log",))
    flags = dict(a.split("=", 1) for a in shlex.split(lp.trtexec_flags()))
    assert _trtexec_spec(flags["--layerPrecisions"]) == {"enc:0/Log": "fp32", "head add": "fp32"}
    assert _trtexec_spec(flags["--layerOutputTypes"]) == {"enc:0/Log": "fp32"}
    assert _polygraphy_parse(lp.polygraphy_flags()) == ({"enc:0/Log": "trt.float32", "head add": "trt.float32"},
                                                        "obey")


def test_polygraphy_inputs_are_read_one_per_feed_dict_and_fed_by_name(fixed, tmp_path):
    d, _ = fixed
    items = load_inputs([d / "inputs.json"])
    assert [i.label for i in items] == ["inputs.json[0]", "inputs.json[1]"]
    assert [i.names for i in items] == [("x", "b"), ("b", "x")]
    for item, feed in zip(items, FEEDS):
        got = onnx_feed(["x", "b"], item)
        assert list(got) == ["x", "b"]
        assert all(np.array_equal(got[k], feed[k]) and got[k].dtype == np.float32 for k in feed)
    # Polygraphy's folder form (`--save-inputs DIR`: one feed dict per zero-padded file), and .npz files
    for k, feed in enumerate(FEEDS):
        polygraphy_json.save_json(feed, str(tmp_path / f"{k:010d}.json"))
        np.savez(tmp_path / f"z{k}.npz", **feed)
    items = load_inputs([tmp_path])
    assert [i.label for i in items] == ["0000000000.json", "0000000001.json", "z0.npz", "z1.npz"]
    feeds = [onnx_feed(["x", "b"], i) for i in items]
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, feeds[2:]) for k in ("x", "b"))
    assert np.array_equal(feeds[1]["b"], FEEDS[1]["b"])


@pytest.mark.parametrize("content, says", [
    ('{"schema": "fp16guard.plan/1"}', "item 0's 'schema' is a str, not an array"),
    ("[1, 2]", "item 0 is a int"),
    ("[]", "holds no feed dict"),
    ("{not json", "not a readable Polygraphy JSON file"),
])
def test_a_json_that_is_not_polygraphy_inputs_exits_2_with_one_line(fixed, tmp_path, capsys, content, says):
    d, _ = fixed
    (tmp_path / "bad.json").write_text(content)
    capsys.readouterr()
    assert main(["calibrate", str(d / "m.onnx"), "--input", str(tmp_path / "bad.json"),
                 "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fp16guard: error: ") and says in err[0], err


def test_run_results_are_refused_as_inputs(fixed):
    _, f = fixed
    with pytest.raises(InputError, match="not Polygraphy's input format.*RunResults"):
        load_inputs([f["out"]])


def test_saved_outputs_load_in_polygraphy_and_match_the_fp32_model_and_the_report(fixed):
    d, f = fixed
    results = RunResults.load(str(f["out"]))
    assert list(results.keys()) == ["fp16guard-fp32", "fp16guard-fixed-fp16"]
    session = cpu_session(onnx.load(d / "m.onnx"))
    rows = json.loads(f["report"].read_text())["verification"]["rows"]
    for k, feed in enumerate(FEEDS):
        ref = results["fp16guard-fp32"][k]["y"]
        got = results["fp16guard-fixed-fp16"][k]["y"]
        assert np.array_equal(ref, session.run(None, feed)[0])  # the FP32 reference, bit for bit
        assert got.dtype == np.float32 and np.isfinite(got).all()
        assert np.abs(got - ref).max() == pytest.approx(rows[k]["max_abs"], rel=1e-6)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) == pytest.approx(rows[k]["rel_l2"], rel=1e-5)
        assert 0 < rows[k]["max_abs"] < 0.1
    assert not Comparator.compare_accuracy(results, compare_func=simple_compare(atol=1e-5, rtol=1e-5))
    assert Comparator.compare_accuracy(results, compare_func=simple_compare(atol=0.1, rtol=0.0))


def test_without_polygraphy_reading_a_json_says_how_to_install_it(fixed, monkeypatch):
    d, _ = fixed
    monkeypatch.setitem(__import__("sys").modules, "polygraphy", None)
    with pytest.raises(MissingDependencyError, match=r"pip install polygraphy"):
        load_inputs([d / "inputs.json"])


def test_layer_precisions_and_the_fp32_graph_are_refused_for_a_pt2_program():
    from fp16guard.errors import UsageError
    from fp16guard.interop import check_interop_options

    for option in ("layer_precisions", "save_fp32"):
        with pytest.raises(UsageError, match="names ONNX nodes.*write an .onnx"):
            check_interop_options("torch", **{option: "f.txt"})
    check_interop_options("onnx", layer_precisions="f.txt", save_fp32="f.onnx", save_outputs="o.json")


def test_loading_polygraphy_inputs_never_runs_code_from_the_file(tmp_path, monkeypatch):
    """Payloads whose unpickling would create a file: each is refused in one line, the file never
    appears, and numpy payloads never reach pickle at all (allow_pickle=False)."""
    import base64
    import io
    import pickle

    import torch

    pwned = tmp_path / "PWNED"

    class Touch:
        def __reduce__(self):
            return (open, (str(pwned), "w"))

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    raw = pickle.dumps(Touch())
    npy = io.BytesIO()
    np.save(npy, np.array([Touch()], dtype=object), allow_pickle=True)
    npz = io.BytesIO()
    np.savez(npz, a=np.array([Touch()], dtype=object))
    saved = io.BytesIO()
    torch.save(Touch(), saved)  # torch.save's zip, its data.pkl the object
    payloads = {
        "pickle as an array": {"polygraphy_class": "ndarray", "array": b64(raw)},
        "pickle as a latin-1 array": {"polygraphy_class": "ndarray", "array": raw.decode("latin-1")},
        "object .npy": {"polygraphy_class": "ndarray", "array": b64(npy.getvalue())},
        "object .npz": {"polygraphy_class": "ndarray", "array": b64(npz.getvalue())},
        "legacy marker": {"__polygraphy_encoded_ndarray": "polygraphy_serialized_json_type", "array": b64(raw)},
        "pickle as a tensor": {"polygraphy_class": "Tensor", "tensor": b64(raw)},
        "torch.save of an object": {"polygraphy_class": "Tensor", "tensor": b64(saved.getvalue())},
    }

    def no_pickle(*args, **kwargs):
        raise AssertionError("an input file reached pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    for kind, payload in payloads.items():
        path = tmp_path / "inputs.json"
        path.write_text(json.dumps([{"x": payload}]))
        with pytest.raises(InputError, match="item 0's 'x'") as e:
            load_inputs([path])
        assert "\n" not in str(e.value), kind
        assert not pwned.exists(), kind
    # a RunResults or any other encoded class is named, never built
    path.write_text(json.dumps({"polygraphy_class": "RunResults", "lst": [["r", [{"x": payloads["object .npy"]}]]]}))
    with pytest.raises(InputError, match="it holds a RunResults"):
        load_inputs([path])
    assert not pwned.exists()


def test_polygraphy_tensors_float16_and_big_endian_arrays_are_read(tmp_path):
    torch = pytest.importorskip("torch")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    polygraphy_json.save_json([{"x": torch.from_numpy(x)}, {"x": torch.from_numpy(x).bfloat16()},
                               {"x": x.astype(">f4")}, {"x": x.astype(np.float16)}], str(tmp_path / "in.json"))
    items = load_inputs([tmp_path / "in.json"])
    assert [i.label for i in items] == ["in.json[0]", "in.json[1]", "in.json[2]", "in.json[3] (float16 as float32)"]
    for item in items:
        assert item.arrays[0].dtype.isnative and np.array_equal(onnx_feed(["x"], item)["x"], x)
