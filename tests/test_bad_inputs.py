"""Every kind of bad input, table-driven: one line on stderr naming what is wrong and what to do,
exit status 2, before any long work; real FP16 findings exit 1; nothing is written.

Each row of :data:`CASES` is ``(kind, argv, exit status, text the stderr line must hold)``; the
argv's ``{name}`` fields name the files of the :func:`ws` workspace. ``python tests/test_bad_inputs.py``
prints the table with each outcome (the closing note of issue 15 quotes it).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fp16guard.cli import main

MODELS = '''
import torch


class Net(torch.nn.Module):
    """Linear + BatchNorm1d: float32 [batch, 4] -> [batch, 4]."""

    def __init__(self, gain=1.0):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.gain = gain

    def forward(self, x):
        return self.bn(self.lin(x)) * self.gain


def ok():
    torch.manual_seed(0)
    return Net()


def big_output():
    """Its graph output reaches ~1e6: beyond FP16, and no rescale after it can bring it back."""
    torch.manual_seed(0)
    return Net(gain=1e6)


def raises():
    raise RuntimeError("weights not found")


def needs_args(width):
    return Net()


not_callable = 3


def not_module():
    return "a string"


class Image(torch.nn.Module):
    """A conv over float32 [batch, 3, H, W] images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.conv(x)


def image():
    torch.manual_seed(0)
    return Image()


class Two(torch.nn.Module):
    """forward(x, scale): x [batch, 4] times scale [batch, 1]."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, scale):
        return self.lin(x) * scale


def two():
    torch.manual_seed(0)
    return Two()
'''

METRICS = '''
import math

def ok(outputs, reference):
    return 0.0

def raises(outputs, reference):
    raise ValueError("metric bug")

def string(outputs, reference):
    return "good"

def nan(outputs, reference):
    return math.nan

not_callable = 1
'''


def _onnx(path: Path, *, gain: float = 1.0) -> None:
    """``y = |x @ W| * gain`` with ``x, y`` float32 [1, 4]."""
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
         helper.make_node("Abs", ["h"], ["r"], name="abs"),
         helper.make_node("Mul", ["r", "gain"], ["y"], name="gain")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(gain, np.float32), "gain")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)


def make_workspace(d: Path) -> Path:
    """Write the models, inputs, plans and modules that the rows name into ``d``; put ``d`` on sys.path."""
    rng = np.random.default_rng(0)
    (d / "fgbad_models.py").write_text(MODELS)
    (d / "fgbad_metrics.py").write_text(METRICS)
    (d / "fgbad_syntax.py").write_text("def broken(:\n    pass\n")
    sys.path.insert(0, str(d))
    _onnx(d / "m.onnx")
    _onnx(d / "big.onnx", gain=1e6)
    (d / "corrupt.onnx").write_bytes(b"\x00garbage" * 50)
    (d / "empty.onnx").write_bytes(b"")
    (d / "corrupt.pt2").write_bytes(b"PK garbage")
    (d / "model_dir.onnx").mkdir()
    x = rng.standard_normal((1, 4)).astype(np.float32)
    np.save(d / "x.npy", x)
    np.save(d / "x2.npy", rng.standard_normal((1, 4)).astype(np.float32))
    np.save(d / "batch.npy", rng.standard_normal((8, 4)).astype(np.float32))
    np.save(d / "nan.npy", np.array([[1.0, np.nan, 0.0, 2.0]], np.float32))
    np.save(d / "inf.npy", np.array([[1.0, np.inf, 0.0, 2.0]], np.float32))
    np.save(d / "nan_batch.npy", np.where(np.arange(8)[:, None] == 3, np.nan, 1.0).repeat(4, 1).astype(np.float32))
    np.save(d / "empty_batch.npy", np.zeros((0, 4), np.float32))
    np.save(d / "wrong_shape.npy", np.zeros((1, 7), np.float32))
    np.save(d / "wrong_rank.npy", np.zeros((4,), np.float32))
    np.save(d / "scalar.npy", np.float32(1.0))
    np.save(d / "strings.npy", np.array(["a", "b"]))
    np.save(d / "complex.npy", np.ones((1, 4), np.complex64))
    np.save(d / "bools.npy", np.ones((1, 4), bool))
    np.save(d / "ints.npy", np.ones((8, 4), np.int64))
    np.save(d / "big_input.npy", np.full((8, 4), 1e6, np.float32))
    np.savez(d / "named.npz", x=x)
    np.savez(d / "misnamed.npz", y=x)
    np.savez(d / "two.npz", x, x)
    np.savez(d / "two_named.npz", scale=np.ones((8, 1), np.float32), x=rng.standard_normal((8, 4)).astype(np.float32))
    (d / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 garbage")
    (d / "corrupt.png").write_bytes(b"\x89PNG garbage")
    (d / "corrupt.wav").write_bytes(b"RIFF garbage")
    (d / "x.txt").write_text("1 2 3 4")
    (d / "empty_dir").mkdir()
    (d / "other_files").mkdir()
    (d / "other_files" / "notes.txt").write_text("no inputs here")
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / "img.png")
    torch.save({"lin.weight": torch.zeros(4, 4)}, d / "partial.pt")
    torch.save(torch.nn.Linear(4, 4).state_dict(), d / "other.pt")
    (d / "corrupt.pt").write_bytes(b"garbage")
    (d / "plan_corrupt.json").write_text("{not json")
    (d / "plan_other.json").write_text(json.dumps({"schema": "fp16guard.inspect/1"}))
    # a plan for m.onnx, for the --plan rows
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["calibrate", str(d / "m.onnx"), "--input", str(d / "x.npy"), "-o", str(d / "plan_m.json")]) == 0
        assert main(["fix", str(d / "m.onnx"), "--input", str(d / "x.npy"), "-o", str(d / "m_fp16.onnx")]) == 0
    _workspace_input_files(d)
    _workspace_models(d)
    _workspace_outputs(d)
    _workspace_streams(d)
    return d


# -- issue 23's workspace files, one function per group of rows (see the CASES sections below)


def _workspace_input_files(d: Path) -> None:
    """Files for the rows "issue 23: input files and data formats"."""
    import base64
    import os
    import pickle
    import struct
    import wave
    import zlib

    rng = np.random.default_rng(23)
    x = rng.standard_normal((1, 4)).astype(np.float32)
    batch = rng.standard_normal((8, 4)).astype(np.float32)
    np.save(d / "be.npy", x.astype(">f4"))  # big-endian: legitimate, read in native byte order
    np.save(d / "be_batch.npy", batch.astype(">f4"))
    np.savez(d / "be_two.npz", x=x.astype(">f4"), scale=np.full((1, 1), 2, ">i8"))
    np.save(d / "x16.npy", x.astype(np.float16))  # float16 for an FP32 model: fed as float32, with a note
    np.save(d / "x16_batch.npy", batch.astype(np.float16))

    def png(path: Path, width: int, height: int) -> None:
        """A 66-byte PNG whose header claims width x height 1-bit pixels (Pillow refuses it on open)."""
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))

    png(d / "bomb.png", 40000, 40000)  # over twice Pillow's limit: DecompressionBombError
    png(d / "big.png", 10000, 10000)  # over the limit: DecompressionBombWarning

    with wave.open(str(d / "stereo.wav"), "wb") as w:  # 4 frames of 2 x 16 bits
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.arange(8, dtype=np.int16).tobytes())
    raw = (d / "stereo.wav").read_bytes()
    (d / "cut.wav").write_bytes(raw[:-1])  # the file ends mid-sample; its header still says 16 bytes
    at = raw.index(b"data") + 4
    (d / "odd.wav").write_bytes(raw[:at] + struct.pack("<I", 15) + raw[at + 4:-1])  # the header says 15 bytes
    os.remove(d / "stereo.wav")

    os.symlink(d / "loop.npy", d / "loop.npy")

    def pg(name: str, value) -> None:
        """A Polygraphy input file of one feed dict ``{"x": value}`` (as polygraphy run --save-inputs writes)."""
        (d / name).write_text(json.dumps([{"x": value}]))

    class Touch:
        """Unpickled, it would create the file PWNED."""

        def __reduce__(self):
            return (open, (str(d / "PWNED"), "w"))

    evil = base64.b64encode(pickle.dumps(Touch())).decode()
    pg("pg_no_array.json", {"polygraphy_class": "ndarray"})
    pg("pg_number.json", {"polygraphy_class": "ndarray", "array": 5})
    pg("pg_pickled_tensor.json", {"polygraphy_class": "Tensor", "tensor": evil})
    pg("pg_pickled_array.json", {"polygraphy_class": "ndarray", "array": evil})
    (d / "pg_deep.json").write_text("[" * 100_000 + "]" * 100_000)

    # ONNX graphs with a non-tensor input beside x: a sequence (required) and an optional (left out)
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    element = helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4])
    graphs = {
        "seq.onnx": ([helper.make_node("SequenceAt", ["s", "zero"], ["e"], name="at"),
                      helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
                      helper.make_node("Add", ["h", "e"], ["y"], name="add")],
                     helper.make_value_info("s", helper.make_sequence_type_proto(element)), [w, zero]),
        "optional.onnx": ([helper.make_node("OptionalHasElement", ["o"], ["has"], name="has"),
                           helper.make_node("Cast", ["has"], ["k"], name="cast", to=TensorProto.FLOAT),
                           helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
                           helper.make_node("Add", ["h", "k"], ["y"], name="add")],
                          helper.make_value_info("o", helper.make_optional_type_proto(element)), [w]),
    }
    for name, (nodes, extra, inits) in graphs.items():
        model = helper.make_model(helper.make_graph(nodes, "g", [x_info, extra], [y_info], inits),
                                  opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.save(model, d / name)
    np.savez(d / "x_and_o.npz", x=x, o=x)


def _workspace_models(d: Path) -> None:
    """Files for the rows "issue 23: models in calibrate, fix and bisect": ``|x @ W| * gain`` (as
    ``_onnx``, gain 1e6: its output needs a rescale) in float64, with its weights listed as graph
    inputs too, in FP16 as converters write it (float16 inputs; FP32 inputs with Casts, one weight
    left FP32), with QuantizeLinear/DequantizeLinear (opset 13, int8 weights); a ``.half()`` factory;
    hand-edited plans of ``m.onnx``."""
    f, h, dbl = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)

    def save(nodes, name, inputs, outputs, inits, opset=17):
        model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                                  opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, d / name)

    def vi(name, dtype, shape=(1, 4)):
        return helper.make_tensor_value_info(name, dtype, list(shape))

    def const(value, name):
        return numpy_helper.from_array(np.asarray(value), name)

    gain = [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
            helper.make_node("Abs", ["h"], ["r"], name="abs"), helper.make_node("Mul", ["r", "gain"], ["y"], name="gain")]
    save(gain, "f64.onnx", [vi("x", dbl)], [vi("y", dbl)], [const(w.astype(np.float64), "w"), const(np.float64(1e6), "gain")])
    save(gain, "weights_as_inputs.onnx", [vi("x", f), vi("w", f, (4, 4)), vi("gain", f, ())], [vi("y", f)],
         [const(w, "w"), const(np.float32(1e6), "gain")])
    save(gain[:2], "fp16_io.onnx", [vi("x", h)], [vi("r", h)], [const(w.astype(np.float16), "w")])
    save([helper.make_node("Cast", ["x"], ["x16"], to=h, name="graph_input_cast0"),
          helper.make_node("MatMul", ["x16", "w"], ["h"], name="matmul"),
          helper.make_node("Cast", ["h"], ["h32"], to=f, name="blocked_cast"),
          helper.make_node("Mul", ["h32", "gain"], ["y"], name="gain")],
         "fp16_casts.onnx", [vi("x", f)], [vi("y", f)], [const(w.astype(np.float16), "w"), const(np.float32(2.0), "gain")])
    save([helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="quantize_x"),
          helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dequantize_x"),
          helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dequantize_w"),
          helper.make_node("MatMul", ["xd", "wd"], ["h"], name="matmul"),
          helper.make_node("Mul", ["h", "gain"], ["y"], name="gain")],
         "qdq.onnx", [vi("x", f)], [vi("y", f)],
         [const(np.float32(0.02), "xs"), const(np.int8(0), "xz"), const(np.float32(0.02), "ws"), const(np.int8(0), "wz"),
          const(np.clip(np.round(w / 0.02), -127, 127).astype(np.int8), "wq"), const(np.float32(1e5), "gain")], opset=13)
    (d / "fgbad_fp16.py").write_text("import torch\n\n\ndef half():\n    torch.manual_seed(0)\n"
                                     "    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).half()\n")
    plan = json.loads((d / "plan_m.json").read_text())
    edits = {"plan_no_nodes.json": {"unfixable": [{"tensor": "y", "amax": 1.0, "reason": "by hand"}]},
             "plan_log2_string.json": {"target_log2": "13"},
             "plan_exponent_float.json": {"regions": [{"exponent": 2.5, "tensors": ["r"], "ops": ["abs"], "scopes": [],
                                                       "amax": 1.0, "amax_after": 1.0, "opened_by": [], "closed_by": []}]}}
    for name, edit in edits.items():
        (d / name).write_text(json.dumps({**plan, **edit}))
    (d / "plan_utf16.json").write_text(json.dumps(plan), encoding="utf-16")
    (d / "plan_binary.json").write_bytes((d / "m.onnx").read_bytes())


def _workspace_outputs(d: Path) -> None:
    """Files for the rows "issue 23: loading, factories and outputs"."""
    import os
    import zipfile

    (d / "fgbad_factories.py").write_text(FACTORIES)
    (d / "fgbad_argparse.py").write_text("import argparse\nargparse.ArgumentParser().add_argument('--cfg', "
                                         "required=True)\nargparse.ArgumentParser().parse_args(['--nope'])\n")
    torch.save(torch.zeros(4, 4), d / "tensor.pt")
    torch.save([torch.zeros(4, 4)], d / "list.pt")
    torch.save({0: torch.zeros(4, 4)}, d / "int_keys.pt")
    torch.save({"lin.weight": [1, 2]}, d / "list_value.pt")
    torch.manual_seed(0)
    program = torch.export.export(torch.nn.Linear(4, 4), (torch.zeros(1, 4),))  # static batch 1
    torch.export.save(program, d / "static.pt2")
    with zipfile.ZipFile(d / "static.pt2") as src, zipfile.ZipFile(d / "evil.pt2", "w") as evil, \
            zipfile.ZipFile(d / "opaque.pt2", "w") as opaque:
        for info in src.infolist():
            data = src.read(info.filename)
            evil.writestr(info.filename, PAYLOAD if info.filename.endswith("sample_inputs/model.pt") else data)
            opaque.writestr(info.filename, data)
        opaque.writestr(f"{Path(src.namelist()[0]).parts[0]}/data/constants/opaque_obj_0", PAYLOAD)
    os.link(d / "m.onnx", d / "m_link.onnx")  # a hard link to the model: the same inode
    os.symlink(d / "loop.onnx", d / "loop.onnx")
    os.symlink(d / "loop.pt2", d / "loop.pt2")
    os.mkfifo(d / "fifo.onnx")
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="add,eps"),
         helper.make_node("Mul", ["h", "gain"], ["y"], name="gain")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1e6, np.float32), "gain")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, d / "comma.onnx")


def _workspace_streams(d: Path) -> None:
    """Files for the rows "streamed data sets": ``shards/`` (3 inputs of ``m.onnx`` in two ``.npz``
    shards), ``.npz`` files that are no zip archive (text; an ``np.save`` array), that hold no arrays
    (none at all; a shard's row count alone), and a shard that claims more rows than it holds."""
    from fp16guard.datasets import write_shards

    rng = np.random.default_rng(7)
    write_shards((rng.standard_normal((1, 4)).astype(np.float32) for _ in range(3)), d / "shards", rows=2)
    (d / "text.npz").write_text("not a zip archive")
    with open(d / "npy_named.npz", "wb") as f:
        np.save(f, np.zeros((1, 4), np.float32))
    np.savez(d / "no_arrays.npz")
    np.savez(d / "rows_only.npz", __fp16guard_rows__=np.array(3))
    np.savez(d / "short_rows.npz", x=np.zeros((2, 1, 4), np.float32), __fp16guard_rows__=np.array(5))


#: Factories that misbehave (issue 23).
FACTORIES = """
import sys
import warnings

import torch


class Branchy(torch.nn.Module):
    \"\"\"A data-dependent branch: torch.export cannot capture it (and prints the traced graph).\"\"\"

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if y.sum() > 0 else y


def branchy():
    torch.manual_seed(0)
    return Branchy()


def exits():
    sys.exit(0)


def scripted():
    return torch.jit.script(torch.nn.Linear(4, 4))


def warns():
    warnings.warn("a library's deprecation note", FutureWarning)
    warnings.warn("a user warning", UserWarning)
    print("loading weights ...")
    raise RuntimeError("weights not found")
"""


class _Payload:
    """Unpickling this creates the file ``PWNED`` in the current folder: proof that code ran."""

    def __reduce__(self):
        return (open, ("PWNED", "w"))


#: A pickle whose loading runs code (``open("PWNED", "w")``).
PAYLOAD = __import__("pickle").dumps((_Payload(), {}))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace of :func:`make_workspace`, in a temporary folder."""
    d = make_workspace(tmp_path_factory.mktemp("bad"))
    yield d
    sys.path.remove(str(d))


M, PT = "{d}/m.onnx", "fgbad_models:ok"
X = ["--input", "{d}/x.npy"]
BATCH = ["--input", "{d}/batch.npy"]

#: (kind, argv, exit status, text in the one stderr line)
CASES = [
    # -- the command line itself
    ("no command", [], 2, "the following arguments are required: command"),
    ("unknown command", ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ("unknown option", ["inspect", M, *X, "--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
    ("option missing its value", ["inspect", M, "--input"], 2, "expected one argument"),
    ("unknown example", ["inspect", "--example", "nope"], 2, "invalid choice: 'nope'"),
    ("no model and no example", ["inspect"], 2, "give a MODEL or --example NAME"),
    ("a model and an example", ["inspect", M, "--example", "ppocr-det"], 2, "not both"),
    ("no input for a model", ["inspect", M], 2, "needs at least one --input"),
    ("no input for fix", ["fix", M, "-o", "{d}/out.onnx"], 2, "needs at least one --input"),
    # -- the model
    ("missing .onnx", ["inspect", "{d}/none.onnx", *X], 2, "ONNX model not found"),
    ("corrupt .onnx", ["inspect", "{d}/corrupt.onnx", *X], 2, "not a readable ONNX model"),
    ("empty .onnx", ["inspect", "{d}/empty.onnx", *X], 2, "empty.onnx"),
    ("folder named .onnx", ["inspect", "{d}/model_dir.onnx", *X], 2, "is a folder"),
    ("missing .pt2", ["inspect", "{d}/none.pt2", *X], 2, "ExportedProgram not found"),
    ("corrupt .pt2", ["inspect", "{d}/corrupt.pt2", *X], 2, "not a readable ExportedProgram"),
    ("unknown model kind", ["inspect", "{d}/x.txt", *X], 2, "cannot tell what"),
    ("factory module missing", ["inspect", "fgbad_nothing:ok", *X], 2, "cannot import fgbad_nothing:ok"),
    ("factory name missing", ["inspect", "fgbad_models:nothing", *X], 2, "cannot import fgbad_models:nothing"),
    ("factory module has a syntax error", ["inspect", "fgbad_syntax:broken", *X], 2, "SyntaxError"),
    ("factory raises", ["inspect", "fgbad_models:raises", *X], 2, "fgbad_models:raises() raised RuntimeError"),
    ("factory needs arguments", ["inspect", "fgbad_models:needs_args", *X], 2, "takes no arguments"),
    ("factory not callable", ["inspect", "fgbad_models:not_callable", *X], 2, "is int, not a callable"),
    ("factory returns no module", ["inspect", "fgbad_models:not_module", *X], 2, "returned str"),
    ("checkpoint missing", ["inspect", PT, "--checkpoint", "{d}/none.pt", *X], 2, "checkpoint not found"),
    ("checkpoint corrupt", ["inspect", PT, "--checkpoint", "{d}/corrupt.pt", *X], 2, "not a readable state_dict"),
    ("checkpoint of another model", ["inspect", PT, "--checkpoint", "{d}/other.pt", *X], 2, "does not fit"),
    ("checkpoint missing keys", ["inspect", PT, "--checkpoint", "{d}/partial.pt", *X], 2, "does not fit"),
    ("checkpoint with an ONNX model", ["inspect", M, "--checkpoint", "{d}/other.pt", *X], 2,
     "--checkpoint applies to package.module:factory models"),
    ("checkpoint with a .pt2", ["fix", "{d}/none.pt2", "--checkpoint", "{d}/other.pt", *X, "-o", "{d}/o.pt2"], 2,
     "--checkpoint applies to package.module:factory models"),
    # -- input files
    ("input missing", ["inspect", M, "--input", "{d}/none.npy"], 2, "input file not found"),
    ("input of unknown type", ["inspect", M, "--input", "{d}/x.txt"], 2, "unknown input type '.txt'"),
    ("input .npy corrupt", ["inspect", M, "--input", "{d}/corrupt.npy"], 2, "not a readable numpy file"),
    ("input .npz corrupt", ["inspect", M, "--input", "{d}/corrupt.npz"], 2, "not a readable numpy file"),
    ("input image corrupt", ["inspect", "fgbad_models:image", "--input", "{d}/corrupt.png"], 2, "not a readable image"),
    ("input .wav corrupt", ["inspect", PT, "--input", "{d}/corrupt.wav"], 2, "not a PCM WAV file"),
    ("input folder empty", ["inspect", M, "--input", "{d}/empty_dir"], 2, "no .npy, .npz, image or .wav file"),
    ("input folder of other files", ["inspect", M, "--input", "{d}/other_files"], 2, "no .npy, .npz"),
    ("input of the wrong shape (ONNX)", ["inspect", M, "--input", "{d}/wrong_shape.npy"], 2, "must have shape [1, 4]"),
    ("input of the wrong rank (ONNX)", ["inspect", M, "--input", "{d}/wrong_rank.npy"], 2, "must have shape [1, 4]"),
    ("input of the wrong shape (PyTorch)", ["inspect", PT, "--input", "{d}/wrong_shape.npy"], 2,
     "rejected input wrong_shape.npy of shape [1, 7]"),
    ("scalar input (PyTorch)", ["inspect", PT, "--input", "{d}/scalar.npy"], 2, "rejected input scalar.npy"),
    ("string array", ["inspect", M, "--input", "{d}/strings.npy"], 2, "holds <U1 values"),
    ("complex array", ["inspect", PT, "--input", "{d}/complex.npy"], 2, "holds complex64 values"),
    ("bool array for a float model", ["inspect", M, "--input", "{d}/bools.npy"], 2, "must be float"),
    ("integer array for a float model (PyTorch)", ["inspect", PT, "--input", "{d}/ints.npy"], 2,
     "rejected input ints.npy"),
    ("empty batch", ["inspect", PT, "--input", "{d}/empty_batch.npy"], 2, "has no elements"),
    ("NaN in a calibration input", ["calibrate", M, "--input", "{d}/nan.npy", "-o", "{d}/p.json"], 2,
     "nan.npy holds 1 NaN and 0 inf"),
    ("inf in a calibration input", ["calibrate", M, "--input", "{d}/inf.npy", "-o", "{d}/p.json"], 2,
     "inf.npy holds 0 NaN and 1 inf"),
    ("NaN in a bisect input", ["bisect", PT, "--input", "{d}/nan_batch.npy", "--backend", "emulate"], 2,
     "nan_batch.npy holds 4 NaN"),
    ("NaN in a fix input", ["fix", M, "--input", "{d}/nan.npy", "-o", "{d}/o.onnx"], 2, "holds 1 NaN"),
    ("NaN in a validation input", ["fix", M, *X, "--validate", "{d}/nan.npy", "-o", "{d}/o.onnx"], 2,
     "validation input nan.npy holds 1 NaN"),
    ("validation input of the wrong shape", ["fix", M, *X, "--validate", "{d}/wrong_shape.npy", "-o",
                                             "{d}/o.onnx"], 2, "validation input wrong_shape.npy"),
    ("validation input missing", ["fix", M, *X, "--validate", "{d}/none.npy", "-o", "{d}/o.onnx"], 2,
     "input file not found"),
    ("validation input of the wrong shape (PyTorch)", ["fix", PT, *BATCH, "--validate", "{d}/wrong_shape.npy", "-o",
                                                       "{d}/o.pt2"], 2, "validation input wrong_shape.npy of shape [1, 7]"),
    ("an FP16 model to fix", ["fix", "{d}/m_fp16.onnx", *X, "-o", "{d}/o.onnx"], 2, "already converted to FP16"),
    ("an FP16 model to calibrate", ["calibrate", "{d}/m_fp16.onnx", *X, "-o", "{d}/p.json"], 2,
     "already converted to FP16"),
    ("an FP16 model to bisect", ["bisect", "{d}/m_fp16.onnx", *X], 2, "already converted to FP16"),
    ("a plan but no input to verify on", ["fix", M, "--plan", "{d}/plan_m.json", "-o", "{d}/o.onnx"], 2,
     "verification needs inputs"),
    ("an example and a checkpoint", ["inspect", "--example", "crepe-full", "--checkpoint", "{d}/other.pt"], 2,
     "--checkpoint applies to package.module:factory models"),
    ("a raw image for an audio example", ["inspect", "--example", "crepe-full", "--input", "{d}/img.png"], 2,
     "crepe-full takes"),
    (".npz of other names (ONNX)", ["inspect", M, "--input", "{d}/misnamed.npz"], 2, "its arrays are named y"),
    (".npz of too many arrays (ONNX)", ["inspect", M, "--input", "{d}/two.npz"], 2, "takes 1 input(s)"),
    ("image for an ONNX model", ["inspect", M, "--input", "{d}/img.png"], 2, "not a raw image"),
    ("image for an ONNX model (fix)", ["fix", M, "--input", "{d}/img.png", "-o", "{d}/o.onnx"], 2, "not a raw image"),
    (".npz of other names (PyTorch)", ["inspect", "fgbad_models:two", "--input", "{d}/misnamed.npz"], 2,
     "its arrays are named y, forward takes x, scale"),
    # -- option values
    ("--tolerance -1 (fix)", ["fix", M, *X, "-o", "{d}/o.onnx", "--tolerance", "-1"], 2, "give a positive"),
    ("--tolerance 0 (fix)", ["fix", M, *X, "-o", "{d}/o.onnx", "--tolerance", "0"], 2, "give a positive"),
    ("--tolerance nan (fix)", ["fix", M, *X, "-o", "{d}/o.onnx", "--tolerance", "nan"], 2, "give a positive"),
    ("--tolerance inf (fix)", ["fix", M, *X, "-o", "{d}/o.onnx", "--tolerance", "inf"], 2, "give a positive"),
    ("--tolerance abc", ["fix", M, *X, "-o", "{d}/o.onnx", "--tolerance", "abc"], 2, "invalid float value: 'abc'"),
    ("--tolerance 0 (bisect)", ["bisect", M, *X, "--tolerance", "0"], 2, "give a positive"),
    ("--tolerance nan with a metric", ["bisect", M, *X, "--metric", "fgbad_metrics:ok", "--tolerance", "nan"], 2,
     "give a number"),
    ("--max-offenders 0", ["bisect", M, *X, "--all", "--max-offenders", "0"], 2, "--max-offenders 0: give 1 or more"),
    ("--max-offenders -3", ["bisect", M, *X, "--max-offenders", "-3"], 2, "give 1 or more"),
    ("--target-log2 24", ["calibrate", M, *X, "-o", "{d}/p.json", "--target-log2", "24"], 2, "give 1 to 15"),
    ("--target-log2 -100", ["fix", M, *X, "-o", "{d}/o.onnx", "--target-log2", "-100"], 2, "give 1 to 15"),
    ("--target-log2 0", ["calibrate", M, *X, "-o", "{d}/p.json", "--target-log2", "0"], 2, "give 1 to 15"),
    ("--top 0", ["inspect", M, *X, "--top", "0"], 2, "--top 0: give 1 or more"),
    ("--memory-budget 0", ["inspect", M, *X, "--memory-budget", "0"], 2, "--memory-budget 0.0: give a positive"),
    ("--memory-budget nan", ["inspect", M, *X, "--memory-budget", "nan"], 2, "give a positive"),
    ("--backend foo (bisect)", ["bisect", M, *X, "--backend", "foo"], 2, "--backend foo"),
    ("--backend foo (fix)", ["fix", M, *X, "-o", "{d}/o.onnx", "--backend", "foo"], 2, "--backend foo"),
    ("--backend torch for ONNX (bisect)", ["bisect", M, *X, "--backend", "torch"], 2, "--backend torch runs PyTorch"),
    ("--backend torch for ONNX (fix)", ["fix", M, *X, "-o", "{d}/o.onnx", "--backend", "torch"], 2,
     "--backend torch runs .pt2"),
    ("--backend onnxruntime for .pt2", ["fix", PT, *BATCH, "-o", "{d}/o.pt2", "--backend", "onnxruntime"], 2,
     "runs ONNX models"),
    ("--fallback bf17", ["fix", M, *X, "-o", "{d}/o.onnx", "--fallback", "bf17"], 2, "invalid choice: 'bf17'"),
    ("--graph with ONNX", ["calibrate", M, *X, "-o", "{d}/p.json", "--graph", "torch"], 2, "--graph applies"),
    ("--ops with ONNX", ["inspect", M, *X, "--ops"], 2, "apply to PyTorch models only"),
    ("--half with ONNX", ["inspect", M, *X, "--half"], 2, "apply to PyTorch models only"),
    ("--no-cuda-graph with ONNX", ["inspect", M, *X, "--no-cuda-graph"], 2, "apply to PyTorch models only"),
    ("--device nonsense", ["inspect", PT, *BATCH, "--device", "gpu7"], 2, "--device gpu7"),
    ("--device with ONNX", ["inspect", M, *X, "--device", "cuda"], 2, "apply to PyTorch models only"),
    # -- task metrics
    ("--metric without a colon", ["bisect", M, *X, "--metric", "fgbad_metrics"], 2, "give package.module:function"),
    ("--metric module missing", ["bisect", M, *X, "--metric", "fgbad_none:ok"], 2, "cannot import it (No module named 'fgbad_none')"),
    ("--metric not callable", ["bisect", M, *X, "--metric", "fgbad_metrics:not_callable"], 2, "is not callable"),
    ("--metric raises", ["bisect", M, *X, "--metric", "fgbad_metrics:raises", "--backend", "emulate"], 2,
     "fgbad_metrics:raises raised ValueError: metric bug"),
    ("--metric returns a string", ["bisect", M, *X, "--metric", "fgbad_metrics:string", "--backend", "emulate"], 2,
     "returned str"),
    ("--metric returns NaN", ["bisect", M, *X, "--metric", "fgbad_metrics:nan", "--backend", "emulate"], 2,
     "a NaN or inf score"),
    # -- output paths
    ("-o into a missing folder (fix)", ["fix", M, *X, "-o", "{d}/nope/o.onnx"], 2, "does not exist; create it first"),
    ("-o into a missing folder (calibrate)", ["calibrate", M, *X, "-o", "{d}/nope/p.json"], 2, "does not exist"),
    ("--json into a missing folder", ["inspect", M, *X, "--json", "{d}/nope/r.json"], 2, "does not exist"),
    ("--plot into a missing folder", ["bisect", M, *X, "--plot", "{d}/nope/r.png"], 2, "does not exist"),
    ("--save-plan into a missing folder", ["fix", M, *X, "-o", "{d}/o.onnx", "--save-plan", "{d}/nope/p.json"], 2,
     "does not exist"),
    ("-o into a folder that cannot be written", ["fix", M, *X, "-o", "/proc/fp16guard-o.onnx"], 2, "cannot write in /proc"),
    ("-o under a file", ["fix", M, *X, "-o", "{d}/x.npy/o.onnx"], 2, "is not a folder"),
    ("-o is a folder", ["calibrate", M, *X, "-o", "{d}/empty_dir"], 2, "is a folder"),
    ("-o is the input model", ["fix", M, *X, "-o", M], 2, "would overwrite the model the command reads"),
    ("-o of another type", ["fix", M, *X, "-o", "{d}/o.txt"], 2, "give an .onnx or"),
    ("-o .pt2 for an ONNX model", ["fix", M, *X, "-o", "{d}/o.pt2"], 2, "a .pt2 program comes from a PyTorch model"),
    ("--plot of an unknown format", ["inspect", M, *X, "--plot", "{d}/r.xyz"], 2, "--plot"),
    ("--json and -o the same file", ["fix", M, *X, "-o", "{d}/o.onnx", "--json", "{d}/o.onnx"], 2, "the same file"),
    # -- plans
    ("--plan missing", ["fix", M, *X, "-o", "{d}/o.onnx", "--plan", "{d}/none.json"], 2, "plan not found"),
    ("--plan corrupt", ["fix", M, *X, "-o", "{d}/o.onnx", "--plan", "{d}/plan_corrupt.json"], 2, "not JSON"),
    ("--plan of another schema", ["fix", M, *X, "-o", "{d}/o.onnx", "--plan", "{d}/plan_other.json"], 2,
     "fp16guard.inspect/1"),
    ("--plan of another model", ["fix", "{d}/big.onnx", *X, "-o", "{d}/o.onnx", "--plan", "{d}/plan_m.json"], 2,
     "plan"),
    # -- backends and devices this machine lacks (CI has no GPU and no TensorRT)
    ("--backend tensorrt without TensorRT", ["bisect", M, *X, "--backend", "tensorrt"], 2, "tensorrt is needed for the tensorrt backend"),
    ("--backend onnxruntime without CUDA", ["bisect", M, *X, "--backend", "onnxruntime"], 2, "CUDA"),
    ("--device cuda without CUDA", ["inspect", PT, *BATCH, "--device", "cuda"], 2, "CUDA"),
    ("--backend torch without CUDA", ["fix", PT, *BATCH, "-o", "{d}/o.pt2", "--backend", "torch"], 2, "CUDA"),
    # -- OpenMMLab arguments
    ("--model-cfg without --deploy-cfg", ["calibrate", "c.pth", "--model-cfg", "m.py", "--img", "{d}/img.png", "-o",
                                          "{d}/p.json"], 2, "need --deploy-cfg D --model-cfg M"),
    ("--img and --input together", ["bisect", "c.pth", "--deploy-cfg", "d.py", "--model-cfg", "m.py", "--img",
                                    "{d}/img.png", *X], 2, "not --input"),
    ("export without configs", ["export", "c.pth", "--img", "{d}/img.png"], 2, "export needs --deploy-cfg"),
    ("export with two images", ["export", "c.pth", "--deploy-cfg", "d.py", "--model-cfg", "m.py", "--img", "a.png",
                                "--img", "b.png"], 2, "exactly one --img"),
    # -- real FP16 findings: exit 1 (a report, not an error line)
    ("NaN in an inspect input (a finding)", ["inspect", M, "--input", "{d}/nan.npy"], 1, None),
    ("graph input beyond FP16 (a finding)", ["inspect", PT, "--input", "{d}/big_input.npy"], 1, None),
    ("graph output beyond FP16 (a finding)", ["inspect", "{d}/big.onnx", *X], 1, None),
]

# -- issue 23: input files and data formats
CASES += [
    ("big-endian .npy (ONNX)", ["inspect", M, "--input", "{d}/be.npy"], 0, "inputs: be.npy"),
    ("big-endian .npy (PyTorch)", ["inspect", PT, "--input", "{d}/be_batch.npy"], 0, "inputs: be_batch.npy"),
    ("big-endian .npy (PyTorch fix)", ["fix", PT, "--input", "{d}/be_batch.npy", "-o", "{d}/o.pt2"], 0,
     "fixed typed FP16 program"),
    ("big-endian float and integer .npz (PyTorch)", ["inspect", "fgbad_models:two", "--input", "{d}/be_two.npz"], 0,
     "inputs: be_two.npz"),
    ("image of 40000x40000 pixels", ["inspect", "fgbad_models:image", "--input", "{d}/bomb.png"], 2,
     "bomb.png: too large to decode (Image size (1600000000 pixels) exceeds limit"),
    ("image of 10000x10000 pixels", ["inspect", "fgbad_models:image", "--input", "{d}/big.png"], 2,
     "big.png: too large to decode (Image size (100000000 pixels)"),
    (".wav cut mid-sample", ["inspect", PT, "--input", "{d}/cut.wav"], 2,
     "cut.wav: the audio data ends mid-sample (15 bytes is not a whole number of 2-channel 16-bit frames)"),
    (".wav whose header ends mid-sample", ["inspect", PT, "--input", "{d}/odd.wav"], 2,
     "odd.wav: the audio data ends mid-sample"),
    ("Polygraphy array without 'array'", ["inspect", M, "--input", "{d}/pg_no_array.json"], 2,
     "item 0's 'x' is an encoded ndarray with no 'array' payload"),
    ("Polygraphy 'array' a number", ["inspect", M, "--input", "{d}/pg_number.json"], 2,
     "whose 'array' is of type int, not base64 text"),
    ("Polygraphy pickled Tensor payload", ["calibrate", M, "--input", "{d}/pg_pickled_tensor.json", "-o",
                                           "{d}/p.json"], 2, "is not a plain torch.Tensor"),
    ("Polygraphy pickled array payload", ["fix", M, "--input", "{d}/pg_pickled_array.json", "-o", "{d}/o.onnx"], 2,
     "holds no readable numpy array (its bytes are not np.save output"),
    ("Polygraphy JSON nested 100000 deep", ["inspect", M, "--input", "{d}/pg_deep.json"], 2, "nested too deeply"),
    ("input a symlink loop", ["inspect", M, "--input", "{d}/loop.npy"], 2, "loop.npy is a symlink loop"),
    ("validation input a symlink loop", ["fix", M, *X, "--validate", "{d}/loop.npy", "-o", "{d}/o.onnx"], 2,
     "symlink loop"),
    ("float16 .npy (PyTorch fix)", ["fix", PT, "--input", "{d}/x16_batch.npy", "-o", "{d}/o.pt2"], 0,
     "x16_batch.npy (float16 as float32)"),
    ("float16 .npy (PyTorch inspect)", ["inspect", PT, "--input", "{d}/x16_batch.npy"], 0,
     "inputs: x16_batch.npy (float16 as float32)"),
    ("float16 .npy (PyTorch calibrate)", ["calibrate", PT, "--input", "{d}/x16_batch.npy", "-o", "{d}/p.json"], 0,
     "calibrated on 1 input(s)"),
    ("float16 .npy (ONNX fix)", ["fix", M, "--input", "{d}/x16.npy", "-o", "{d}/o.onnx"], 0,
     "x16.npy (float16 as float32)"),
    ("float16 .npy (ONNX inspect)", ["inspect", M, "--input", "{d}/x16.npy"], 0, "inputs: x16.npy (float16 as float32)"),
    ("ONNX sequence input", ["inspect", "{d}/seq.onnx", *X], 2,
     "the model's input 's' is a seq(tensor(float)), which input files cannot give"),
    ("ONNX sequence input (fix)", ["fix", "{d}/seq.onnx", "--input", "{d}/two.npz", "-o", "{d}/o.onnx"], 2,
     "input 's' is a seq(tensor(float))"),
    ("ONNX optional input left out", ["inspect", "{d}/optional.onnx", *X], 0, "inputs: x.npy"),
    ("ONNX optional input left out (calibrate)", ["calibrate", "{d}/optional.onnx", *X, "-o", "{d}/p.json"], 0,
     "plan: "),
    ("ONNX optional input left out (fix)", ["fix", "{d}/optional.onnx", *X, "-o", "{d}/o.onnx", "-q"], 0,
     "fixed typed FP16 model"),
    ("ONNX optional input left out (bisect)", ["bisect", "{d}/optional.onnx", *X, "--backend", "emulate", "-q"], 0,
     None),
    ("ONNX optional input given", ["inspect", "{d}/optional.onnx", "--input", "{d}/x_and_o.npz"], 2,
     "the model's input 'o' is optional(tensor(float)), which fp16guard leaves out"),
]

# -- issue 23: models in calibrate, fix and bisect
FIXED = "fixed typed FP16 model:"
CASES += [
    ("a float64 ONNX model (fix)", ["fix", "{d}/f64.onnx", *X, "-o", "{d}/o.onnx"], 0, FIXED),
    ("a float64 ONNX model (calibrate)", ["calibrate", "{d}/f64.onnx", *X, "-o", "{d}/p.json"], 0, "plan:"),
    ("a float64 ONNX model (bisect: a finding)", ["bisect", "{d}/f64.onnx", *X, "--backend", "emulate"], 1, None),
    ("weights listed as graph inputs (fix)", ["fix", "{d}/weights_as_inputs.onnx", *X, "-o", "{d}/o.onnx"], 0, FIXED),
    ("an FP16 model with float16 inputs (fix)", ["fix", "{d}/fp16_io.onnx", *X, "-o", "{d}/o.onnx"], 2,
     "already converted to FP16 (its input 'x' is float16); give calibrate and fix the FP32 model it came from"),
    ("an FP16 model with float16 inputs (bisect)", ["bisect", "{d}/fp16_io.onnx", *X], 2,
     "give bisect the FP32 model it came from"),
    ("an FP16 model with Casts at FP32 inputs (fix)", ["fix", "{d}/fp16_casts.onnx", *X, "-o", "{d}/o.onnx"], 2,
     "already converted to FP16 (node 'graph_input_cast0' casts 'x' to float16)"),
    ("an FP16 model with Casts at FP32 inputs (calibrate)", ["calibrate", "{d}/fp16_casts.onnx", *X, "-o",
                                                              "{d}/p.json"], 2, "already converted to FP16"),
    ("an FP16 model with Casts at FP32 inputs (bisect)", ["bisect", "{d}/fp16_casts.onnx", *X], 2,
     "already converted to FP16"),
    ("a .half() PyTorch model (fix)", ["fix", "fgbad_fp16:half", *BATCH, "-o", "{d}/o.pt2"], 2,
     "already converted to FP16 ('0.weight' is float16); give calibrate and fix the FP32 model (without .half())"),
    ("a .half() PyTorch model (calibrate)", ["calibrate", "fgbad_fp16:half", *BATCH, "-o", "{d}/p.json"], 2,
     "without .half()"),
    ("a .half() PyTorch model (bisect)", ["bisect", "fgbad_fp16:half", *BATCH, "--backend", "emulate"], 2,
     "give bisect the FP32 model (without .half())"),
    ("a QDQ model (fix)", ["fix", "{d}/qdq.onnx", *X, "-o", "{d}/o.onnx"], 0, FIXED),
    ("--plan: an unfixable entry without nodes", ["fix", M, *X, "-o", "{d}/o.onnx", "--plan",
                                                 "{d}/plan_no_nodes.json"], 2, "unfixable[0].nodes is missing"),
    ("--plan: target_log2 a string", ["fix", M, *X, "-o", "{d}/o.onnx", "--plan", "{d}/plan_log2_string.json"], 2,
     'target_log2 must be an integer, got "13"'),
    ("--plan: a region exponent 2.5", ["fix", M, *X, "-o", "{d}/o.onnx", "--plan", "{d}/plan_exponent_float.json"],
     2, "regions[0].exponent must be an integer, got 2.5"),
    ("--plan: UTF-16 text", ["fix", M, *X, "-o", "{d}/o.onnx", "--plan", "{d}/plan_utf16.json"], 2,
     "the plan is UTF-16 text; save it as UTF-8"),
    ("--plan: a binary file", ["fix", M, *X, "-o", "{d}/o.onnx", "--plan", "{d}/plan_binary.json"], 2,
     "not UTF-8 text"),
]

# -- issue 23: loading, factories and outputs
NO_LATEX = __import__("shutil").which("lualatex") is None  # matplotlib's pgf.texsystem default
CASES += [
    (".pt2 with a pickle payload", ["inspect", "{d}/evil.pt2", *BATCH], 2, "weights-only unpickling"),
    (".pt2 with pickled objects", ["inspect", "{d}/opaque.pt2", *BATCH], 2, "holds pickled Python objects"),
    (".pt2 exported for another batch", ["fix", "{d}/static.pt2", *BATCH, "-o", "{d}/o.pt2"], 2,
     "has shape [8, 4], but the program was exported for [1, 4]"),
    (".pt2 a symlink loop", ["inspect", "{d}/loop.pt2", *BATCH], 2, "symlink loop"),
    (".onnx a symlink loop", ["inspect", "{d}/loop.onnx", *X], 2, "symlink loop"),
    (".onnx a FIFO", ["inspect", "{d}/fifo.onnx", *X], 2, "not a regular file"),
    ("factory calls sys.exit(0)", ["fix", "fgbad_factories:exits", *BATCH, "-o", "{d}/o.pt2"], 2,
     "fgbad_factories:exits() called sys.exit(0)"),
    ("factory module parses the command line", ["inspect", "fgbad_argparse:build", *BATCH], 2,
     "it parses the command line when imported"),
    ("factory returns TorchScript", ["inspect", "fgbad_factories:scripted", *BATCH], 2, "returned a TorchScript"),
    ("factory warns and prints, then raises", ["inspect", "fgbad_factories:warns", *BATCH], 2,
     "raised RuntimeError: weights not found"),
    ("an option out of range with -v", ["inspect", M, *X, "--top", "0", "-v"], 2, "--top 0: give 1 or more"),
    ("data-dependent branch (fix)", ["fix", "fgbad_factories:branchy", *BATCH, "-o", "{d}/o.pt2"], 0,
     "captured and fixed lin (100% of the parameters)"),  # the part that captures (issue 24 item 7)
    ("checkpoint of a bare tensor", ["inspect", PT, "--checkpoint", "{d}/tensor.pt", *BATCH], 2,
     "holds a single Tensor of shape [4, 4]"),
    ("checkpoint of a list", ["inspect", PT, "--checkpoint", "{d}/list.pt", *BATCH], 2, "holds a list"),
    ("checkpoint of integer keys", ["inspect", PT, "--checkpoint", "{d}/int_keys.pt", *BATCH], 2,
     "the state_dict key 0 is a int"),
    ("checkpoint of a non-tensor value", ["inspect", PT, "--checkpoint", "{d}/list_value.pt", *BATCH], 2,
     "holds a list, not a tensor"),
    ("checkpoint a symlink loop", ["inspect", PT, "--checkpoint", "{d}/loop.pt2", *BATCH], 2, "symlink loop"),
    ("-o a hard link to the model", ["fix", M, *X, "-o", "{d}/m_link.onnx"], 2, "would overwrite the model"),
    ("-o a FIFO", ["fix", M, *X, "-o", "{d}/fifo.onnx"], 2, "not a regular file"),
    ("-o a symlink loop", ["fix", M, *X, "-o", "{d}/loop.onnx"], 2, "symlink loop"),
    ("--json a symlink loop", ["inspect", M, *X, "--json", "{d}/loop.onnx"], 2, "symlink loop"),
    ("-o a 300-byte name", ["fix", M, *X, "-o", "{d}/" + "o" * 295 + ".onnx"], 2, "the file name has 300 bytes"),
    ("--layer-precisions with a node it cannot name", ["fix", "{d}/comma.onnx", *X, "-o", "{d}/o.onnx",
                                                       "--layer-precisions", "{d}/lp.txt"], 2, "'add,eps' holds ','"),
    *([("--plot .pgf without LaTeX", ["inspect", M, *X, "--plot", "{d}/r.pgf"], 2, "which is not installed")]
      if NO_LATEX else []),
]

# -- streamed data sets: quoted patterns, .npz shards, --stream and --early-stop
CASES += [
    ("pattern matching no file", ["inspect", M, "--input", "{d}/none_*.npy"], 2,
     "none_*.npy: no folder or .npy, .npz, an image, .wav or Polygraphy's .json file matches this pattern; check its "
     "folder and spelling"),
    ("pattern matching no file (--stream)", ["calibrate", M, "--input", "{d}/none_*.npz", "--stream", "-o",
                                             "{d}/p.json"], 2, "matches this pattern; check its folder and spelling"),
    ("pattern matching files of an unknown type", ["inspect", M, "--input", "{d}/other_files/*"], 2,
     "only files of type .txt, which fp16guard does not read; convert them (np.save to .npy, say) or match other files"),
    ("pattern matching files of an unknown type (--early-stop)", ["calibrate", M, "--input", "{d}/other_files/*.txt",
                                                                  "--early-stop", "5", "-o", "{d}/p.json"], 2,
     "only files of type .txt"),
    ("--early-stop 0", ["calibrate", M, *X, "-o", "{d}/p.json", "--early-stop", "0"], 2,
     "argument --early-stop: '0' is not a count of inputs; give a whole number, 1 or more"),
    ("--early-stop -3", ["inspect", M, *X, "--early-stop", "-3"], 2, "'-3' is not a count of inputs; give a whole number"),
    ("--early-stop abc", ["calibrate", M, *X, "-o", "{d}/p.json", "--early-stop", "abc"], 2,
     "'abc' is not a count of inputs"),
    ("--stream with bisect", ["bisect", M, *X, "--stream"], 2, "unrecognized arguments: --stream"),
    ("--stream with fix", ["fix", M, *X, "-o", "{d}/o.onnx", "--stream"], 2, "unrecognized arguments: --stream"),
    ("--early-stop with fix", ["fix", M, *X, "-o", "{d}/o.onnx", "--early-stop", "5"], 2,
     "unrecognized arguments: --early-stop 5"),
    ("--early-stop with --submodule", ["calibrate", PT, *BATCH, "--submodule", "lin", "--early-stop", "5", "-o",
                                       "{d}/p.json"], 2, "--early-stop does not apply with --submodule"),
    ("--stream with --submodule", ["calibrate", PT, *BATCH, "--submodule", "lin", "--stream", "-o", "{d}/p.json"], 2,
     "--stream does not apply with --submodule: a submodule is calibrated on the inputs the whole model gives it"),
    ("--early-stop beyond the inputs (calibrate)", ["calibrate", M, "--input", "{d}/shards", "--early-stop", "100",
                                                    "-o", "{d}/p.json"], 0, "calibrated on 3 input(s)"),
    ("--early-stop beyond the inputs (inspect)", ["inspect", M, "--input", "{d}/shards/*.npz", "--early-stop", "100"],
     0, "no FP16 overflow found"),
    ("--early-stop beyond the inputs (PyTorch)", ["inspect", PT, *BATCH, "--early-stop", "100"], 0,
     "no FP16 overflow found"),
    (".npz shard not a zip archive", ["inspect", M, "--input", "{d}/text.npz", "--stream"], 2,
     "text.npz: not a readable numpy file (an .npz is a zip archive; this file is not one); write it with np.savez"),
    (".npz that is an np.save array", ["calibrate", M, "--input", "{d}/npy_named.npz", "-o", "{d}/p.json"], 2,
     "this one is an .npy array); rename it .npy, or write it with np.savez"),
    (".npz that is an np.save array (--stream)", ["inspect", M, "--input", "{d}/npy_named.npz", "--stream"], 2,
     "this one is an .npy array"),
    (".npz of no arrays", ["inspect", M, "--input", "{d}/no_arrays.npz"], 2,
     "no_arrays.npz: holds no arrays; save the model's inputs in it"),
    (".npz shard of no arrays", ["calibrate", M, "--input", "{d}/rows_only.npz", "--stream", "-o", "{d}/p.json"], 2,
     "rows_only.npz: holds no arrays"),
    (".npz shard of fewer rows than it says", ["inspect", M, "--input", "{d}/short_rows.npz", "--early-stop", "2"], 2,
     "short_rows.npz: a shard of 5 row(s), but its array 'x' has fewer; write shards with"),
]


def _argv(argv, d):
    return [a.format(d=d) for a in argv]


def run_case(argv, d):
    """(exit status, stdout, stderr) of ``fp16guard ARGV`` in this process; SystemExit is a status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(_argv(argv, d))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        except Exception as e:  # a traceback: shown as such in the table
            code, err = "traceback", io.StringIO(f"{type(e).__name__}: {e}")
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("kind, argv, status, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ws, kind, argv, status, message, capsys):
    before = sorted(p.name for p in ws.iterdir())
    code = main(_argv(argv, ws)) if argv else _main_exit(argv)
    captured = capsys.readouterr()
    assert code == status, captured.err
    if status == 2:  # one error line, after the "done" lines of steps that finished before it (on a pipe)
        lines = [line for line in captured.err.strip().splitlines() if not line.startswith("done  ")]
        assert len(lines) == 1 and lines[0].startswith("fp16guard: error: "), captured.err
        assert message in lines[0]
    elif status == 0 and message is not None:  # a legitimate input: a correct result, and this in its output
        assert message in " ".join((captured.out + captured.err).split())
    after = sorted(p.name for p in ws.iterdir())
    if status == 0:  # a legitimate input: what it wrote is removed for the next row
        for name in set(after) - set(before):
            (ws / name).unlink()
    else:
        assert after == before  # nothing written


def _main_exit(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


if __name__ == "__main__":  # the table with each outcome: python tests/test_bad_inputs.py
    import tempfile

    d = make_workspace(Path(tempfile.mkdtemp(prefix="fp16guard-bad-")))
    print("| # | kind | exit | stderr |\n|---|---|---|---|")
    for i, (kind, argv, status, message) in enumerate(CASES, 1):
        code, out, err = run_case(argv, d)
        lines = [line for line in err.strip().splitlines() if not line.startswith("done  ")]
        shown = lines[0] if len(lines) == 1 else f"{len(lines)} lines: {lines[-1][:100] if lines else ''}"
        mark = "" if code == status and (status != 2 or (len(lines) == 1 and message in err)) else " **(!)**"
        print(f"| {i} | {kind} | {code}{mark} | {shown.replace('|', '/')[:160]} |")


# -- beside the table: what must work, and what only a subprocess shows


def test_an_input_with_nan_is_a_finding_of_inspect(ws, capsys):
    """inspect reports a NaN input as what it is (exit 1), not as "no FP16 overflow found"."""
    assert main(["inspect", f"{ws}/m.onnx", "--input", f"{ws}/nan.npy", "--json", f"{ws}/nan.json"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "input_nonfinite at matmul (MatMul): inputs hold 1 inf/NaN values" in out
    assert "the input holds inf/NaN" in out and "no FP16 overflow found" not in out
    rules = [f["rule"] for f in json.loads((ws / "nan.json").read_text())["findings"]]
    assert rules[0] == "input_nonfinite"
    (ws / "nan.json").unlink()


def test_inputs_that_must_work(ws, capsys):
    """An image for a PyTorch factory model works in calibrate as in inspect; ``.npz`` arrays reach
    ``forward`` by name (saved in the other order); ``-v``/``-q`` work after the command."""
    d = str(ws)
    assert main(["inspect", "fgbad_models:image", "--input", f"{d}/img.png", "-q"]) == 0
    assert main(["calibrate", "fgbad_models:image", "--input", f"{d}/img.png", "-o", f"{d}/p_img.json", "-v"]) == 0
    assert main(["inspect", "fgbad_models:two", "--input", f"{d}/two_named.npz"]) == 0
    assert json.loads((ws / "p_img.json").read_text())["calibration"] == ["img.png"]
    (ws / "p_img.json").unlink()


def test_a_graph_output_beyond_fp16_is_stated_and_restored_in_fp32(ws, capsys):
    """``big.onnx`` writes ~1e6 at its graph output: the plan says so, computes it at 2^-7 in FP16
    and restores it after the cast to the FP32 output; the fixed model is finite and accurate."""
    d = str(ws)
    assert main(["calibrate", f"{d}/big.onnx", *_argv(X, ws), "-o", f"{d}/p_big.json"]) == 0
    out = capsys.readouterr().out
    assert "y reaches" in out and "beyond FP16: it is computed at 2^-" in " ".join(out.split())
    assert main(["fix", f"{d}/big.onnx", *_argv(X, ws), "-o", f"{d}/big_fixed.onnx", "--json", f"{d}/big.json"]) == 0
    rows = json.loads((ws / "big.json").read_text())["verification"]["rows"]
    assert rows[0]["nonfinite"] == 0 and rows[0]["rel_l2"] < 1e-3
    for name in ("p_big.json", "big_fixed.onnx", "big.json"):
        (ws / name).unlink()


def test_a_16_bit_png_keeps_its_range(tmp_path):
    """Pillow's ``convert("RGB")`` clips 16-bit values at 255; read_image scales them by 257."""
    from PIL import Image

    from fp16guard.inputs import read_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    img = read_image(tmp_path / "wide.png")
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255 and abs(float(img.mean()) - 127.5) < 1.0


def test_a_damaged_cached_example_is_not_used(tmp_path, monkeypatch):
    """A cached weight file whose SHA-256 is wrong is deleted (and fetched again when allowed); a
    cache folder that cannot be created is one clear error before any download."""
    from fp16guard.errors import AssetError
    from fp16guard.examples import assets

    monkeypatch.setenv("FP16GUARD_CACHE", str(tmp_path))
    asset = assets.ASSETS["ppocr-det"]
    monkeypatch.setattr(assets, "_installed", lambda a: None)  # as on a machine without the wheel installed
    dest = tmp_path / f"{asset.package}-{asset.version}" / asset.member
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"truncated")
    with pytest.raises(AssetError, match="is not cached"):
        assets.asset_path("ppocr-det", fetch=False)
    assert not dest.exists()
    monkeypatch.setenv("FP16GUARD_CACHE", "/proc/fp16guard-cache")
    with pytest.raises(AssetError, match="cannot create the cache folder"):
        assets.asset_path("ppocr-det")


def test_a_damaged_file_in_a_read_only_cache_is_one_line(tmp_path, monkeypatch):
    """A damaged cached weight file in a cache that cannot be written (here a read-only bind
    mount; skipped where mount is refused) is one AssetError naming the file and what to do."""
    import subprocess

    from fp16guard.errors import AssetError
    from fp16guard.examples import assets

    monkeypatch.setenv("FP16GUARD_CACHE", str(tmp_path))
    asset = assets.ASSETS["ppocr-det"]
    monkeypatch.setattr(assets, "_installed", lambda a: None)  # as on a machine without the wheel installed
    dest = tmp_path / f"{asset.package}-{asset.version}" / asset.member
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"truncated")
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path), str(tmp_path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {done.stderr.decode().strip()}")
    try:
        with pytest.raises(AssetError, match="is damaged .* and cannot be removed"):
            assets.asset_path("ppocr-det")
        assert dest.read_bytes() == b"truncated"
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)


def test_the_example_names_are_the_examples():
    from fp16guard.cli import EXAMPLE_NAMES
    from fp16guard.examples import EXAMPLES

    assert sorted(EXAMPLE_NAMES) == sorted(EXAMPLES)


def test_help_imports_no_framework():
    """``fp16guard --help`` parses arguments without torch, onnx or onnxruntime (start-up time:
    benchmarks/results_cli_startup_cpu.txt)."""
    import subprocess

    code = ("import sys\nfrom fp16guard.cli import main\n"
            "try:\n    main(['fix', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


@pytest.mark.slow
def test_a_pytorch_bisect_is_quiet_on_stderr_unless_verbose(ws):
    """The ONNX exporter's "torchvision is not installed" lines and libraries' FutureWarnings stay
    out of stderr; -v (after the command) shows fp16guard's steps there."""
    import os
    import subprocess

    argv = ["bisect", "fgbad_models:big_output", "--input", "batch.npy", "--backend", "emulate"]
    env = {**os.environ, "PYTHONPATH": str(ws)}
    code = "from fp16guard.cli import console_main; console_main()"
    quiet = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ws, env=env)
    assert quiet.returncode == 1 and "offender 1" in quiet.stdout
    assert all(line.startswith("done  ") for line in quiet.stderr.splitlines())  # only finished steps' lines
    loud = subprocess.run([sys.executable, "-c", code, *argv, "-v"], capture_output=True, text=True, cwd=ws, env=env)
    assert loud.returncode == 1 and "INFO fp16guard: bisect fgbad_models:big_output" in loud.stderr


# -- issue 23: loading runs no code; outputs appear whole or not at all


def test_a_pt2_payload_runs_no_code(ws, tmp_path, monkeypatch):
    """``evil.pt2`` holds a pickle in ``sample_inputs/model.pt`` that creates ``PWNED`` when
    unpickled. Plain ``torch.export.load`` runs it (it retries with ``weights_only=False``): the
    file appears. fp16guard refuses the archive in one line and the file does not appear."""
    import subprocess

    plain = subprocess.run([sys.executable, "-c", f"import torch\ntry:\n    torch.export.load({str(ws / 'evil.pt2')!r})\n"
                            f"except Exception:\n    pass"], cwd=tmp_path, capture_output=True, text=True)
    assert plain.returncode == 0 and (tmp_path / "PWNED").exists(), "the payload must be live for this test to mean anything"
    (tmp_path / "PWNED").unlink()
    monkeypatch.chdir(tmp_path)
    for command in (["inspect", str(ws / "evil.pt2"), "--input", str(ws / "batch.npy")],
                    ["fix", str(ws / "evil.pt2"), "--input", str(ws / "batch.npy"), "-o", str(tmp_path / "o.pt2")]):
        assert main(command) == 2
        assert not (tmp_path / "PWNED").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _big_onnx(folder: Path, mib: int) -> None:
    """``big.onnx``, ``y = x @ W`` with ``W`` float32 [mib * 2^16, 4] (``mib`` MiB, so writing the
    fixed model takes a while and that much disk; half as much in FP16), and ``x.npy`` [1, mib * 2^16]."""
    n = mib << 16
    w = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32) * 1e-2
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, folder / "big.onnx")
    np.save(folder / "x.npy", np.random.default_rng(1).standard_normal((1, n)).astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_while_writing_leaves_nothing(tmp_path, signal_name):
    """SIGTERM or SIGINT while the fixed model is being written (its temporary file exists): the
    command ends with 128 + the signal, ``-o`` keeps its old content, and no temporary file is left."""
    import signal
    import subprocess
    import time

    _big_onnx(tmp_path, 96)
    (tmp_path / "out.onnx").write_bytes(b"the previous model")
    proc = subprocess.Popen([sys.executable, "-c", "from fp16guard.cli import console_main; console_main()", "fix",
                             "big.onnx", "--input", "x.npy", "-o", "out.onnx", "-q"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(".out.onnx.tmp-") for p in tmp_path.iterdir()):
            proc.send_signal(getattr(signal, signal_name))
            break
        time.sleep(0.001)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + getattr(signal, signal_name), out + err
    assert "nothing was written" in err.strip().splitlines()[-1]
    assert (tmp_path / "out.onnx").read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "out.onnx", "x.npy"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted at ``tmp_path / "disk"`` (root only: skipped where mount is refused)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_leaves_nothing(tmp_path, small_disk, capsys):
    """ENOSPC while writing a 2 MiB FP16 model to a 1 MiB filesystem: one line, exit 2, no partial
    file; an existing output and ``--json`` beside it are untouched."""
    _big_onnx(tmp_path, 4)
    (small_disk / "out.onnx").write_bytes(b"the previous model")
    code = main(["fix", str(tmp_path / "big.onnx"), "--input", str(tmp_path / "x.npy"), "-o",
                 str(small_disk / "out.onnx"), "--json", str(small_disk / "fix.json"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert (small_disk / "out.onnx").read_bytes() == b"the previous model"
    assert sorted(p.name for p in small_disk.iterdir()) == ["out.onnx"]


def test_every_output_appears_or_none(tmp_path, capsys):
    """A failure after the model is written (here ``--plot`` to a folder removed during the run,
    as a full or vanished disk would do) leaves neither the model nor the JSON report: all of a
    command's outputs are renamed into place together at its end."""
    from fp16guard.files import OutputSet

    (tmp_path / "gone").mkdir()
    with pytest.raises(OSError):
        with OutputSet() as outputs:
            outputs.path(tmp_path / "model.onnx").write_bytes(b"model")
            outputs.path(tmp_path / "fix.json").write_text("{}")
            (tmp_path / "gone").rmdir()
            outputs.path(tmp_path / "gone" / "plot.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with OutputSet() as outputs:
        outputs.path(tmp_path / "model.onnx").write_bytes(b"model")
        outputs.path(tmp_path / "fix.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fix.json", "model.onnx"]


def test_calibrating_a_generator_with_a_graph_input_beyond_fp16_is_one_error(ws):
    """``fp16guard.calibrate(model, generator)`` where a graph input exceeds 65504 needs a second
    pass a generator cannot give: one FixError line saying so, for ONNX and PyTorch models alike;
    a bad ``early_stop`` is a UsageError (a ValueError too), not a crash."""
    import fp16guard
    from fp16guard.errors import FixError, Fp16GuardError, UsageError
    from fgbad_models import ok

    for model, shape in [(ws / "m.onnx", (1, 4)), (ok(), (8, 4))]:
        with pytest.raises(FixError) as caught:
            fp16guard.calibrate(model, (np.full(shape, 1e6, np.float32) for _ in range(3)))
        assert isinstance(caught.value, Fp16GuardError) and len(str(caught.value).splitlines()) == 1
        assert "graph input x exceeds 65504" in str(caught.value) and "give a list, files or a DataLoader" in str(caught.value)
    for bad in (0, -3, "abc", 2.5, True):
        with pytest.raises(UsageError, match="give a whole number of inputs, 1 or more"):
            fp16guard.calibrate(ws / "m.onnx", (np.ones((1, 4), np.float32) for _ in range(2)), early_stop=bad)
    plan = fp16guard.calibrate(ws / "m.onnx", (np.ones((1, 4), np.float32) for _ in range(2)), early_stop=100)
    assert len(plan.calibration) == 2  # fewer inputs than the patience: all read, no error


# -- issue 23: models in calibrate, fix and bisect, through the Python API


def test_fp16_models_are_refused_by_the_python_api(ws):
    """``fp16guard.bisect``, ``fix`` and ``calibrate`` refuse an FP16 model (float16 inputs, Casts
    to float16 behind FP32 inputs, fp16guard's own output, a ``.half()`` module) with the
    ModelLoadError the command line prints, before any run."""
    import fp16guard
    from fp16guard.errors import ModelLoadError
    from fgbad_fp16 import half

    x = np.load(ws / "x.npy")
    batch = np.load(ws / "batch.npy")
    for model, inputs in [(ws / "fp16_io.onnx", x), (str(ws / "fp16_casts.onnx"), x),
                          (onnx.load(str(ws / "m_fp16.onnx")), x), (half(), batch)]:
        for api in (fp16guard.bisect, fp16guard.fix, fp16guard.calibrate):
            options = {"backend": "emulate"} if api is fp16guard.bisect else {}
            with pytest.raises(ModelLoadError, match="already converted to FP16"):
                api(model, [inputs], **options)


@pytest.mark.parametrize("name, note", [("f64.onnx", "float64_to_float32"),
                                        ("weights_as_inputs.onnx", "initializer_inputs"), ("qdq.onnx", None)])
def test_fixed_onnx_models_pass_the_checker_load_in_onnxruntime_and_are_accurate(ws, name, note):
    """A float64 model, one whose weights are graph inputs too, and a QDQ model are fixed: the typed
    FP16 model passes ``onnx.checker`` (full check), loads in ONNX Runtime, takes float32 ``x``
    only, and matches the original (fed as it declares) within FP16 error; the QDQ model keeps its
    QuantizeLinear/DequantizeLinear nodes, their scales and zero points as they were, fed FP32."""
    import onnxruntime as ort

    import fp16guard

    x = np.load(ws / "x.npy")
    original = onnx.load(str(ws / name))
    fixed, _ = fp16guard.fix(ws / name, [x])
    onnx.checker.check_model(fixed, full_check=True)
    assert [(i.name, i.type.tensor_type.elem_type) for i in fixed.graph.input] == [("x", TensorProto.FLOAT)]
    session = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x})
    reference = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    want = helper.tensor_dtype_to_np_dtype(original.graph.input[0].type.tensor_type.elem_type)
    (expected,) = reference.run(None, {"x": x.astype(want)})
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 2e-3
    if note is not None:
        assert note in [n.kind for n in fp16guard.fix(ws / name, [x]).notes]
    else:
        quant = [n for n in fixed.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert len(quant) == 3
        # scales float32, zero points int8 (the full check typed the rest: at opset 13 they read float32 only)
        inits = {t.name: t.data_type for t in fixed.graph.initializer}
        assert {inits[t] for n in quant for t in n.input[1:]} == {TensorProto.FLOAT, TensorProto.INT8}


def test_a_factory_that_warns_and_prints_leaves_one_line_on_stderr(ws):
    """In a real process (warnings filters and stdout as a user has them): a factory that emits a
    FutureWarning and a UserWarning and prints, then raises, gives exactly fp16guard's one line on
    stderr and nothing on stdout; with -v its printed line and warnings are in the log."""
    import os
    import subprocess

    argv = ["inspect", "fgbad_factories:warns", "--input", "batch.npy"]
    code = "from fp16guard.cli import console_main; console_main()"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    quiet = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ws, env=env)
    assert quiet.returncode == 2 and quiet.stdout == ""
    assert quiet.stderr.splitlines() == ["fp16guard: error: fgbad_factories:warns() raised RuntimeError: weights not "
                                         "found"], quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code, *argv, "-v"], capture_output=True, text=True, cwd=ws, env=env)
    assert loud.returncode == 2 and "printed on stdout: loading weights ..." in loud.stderr
    assert "a user warning" in loud.stderr
