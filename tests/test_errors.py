"""One exception hierarchy, one line on stderr, one exit status per class; bugs are not disguised."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fp16guard.cli import main
from fp16guard.errors import BackendError, Fp16GuardError, InputError, StillOverflowsError, UsageError


def _log_eps(path):
    """``log(x + 1e-10)``: FP16 flushes the epsilon, so ``x = 0`` gives -inf unless it is raised."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "eps"], ["s"], name="add_eps"), helper.make_node("Log", ["s"], ["y"], name="log")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(1e-10, np.float32), "eps")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)


def test_a_fixed_model_that_still_overflows_gets_its_island_back_or_exits_1_when_forced(tmp_path, capsys):
    """A hand-edited plan drops the FP32 island of ``log(x + 1e-10)``: the pure fix gives -inf, so
    the fix searches islands and writes the model with ``add_eps``/``log`` in FP32 (exit 0). With
    ``--force`` it writes the broken model as asked and exits 1 (an FP16 problem), stdout saying so."""
    _log_eps(tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.array([0.0, 1.0, 2.0, 3.0], np.float32))
    plan = tmp_path / "plan.json"
    assert main(["calibrate", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "x.npy"), "-o", str(plan)]) == 0
    doc = json.loads(plan.read_text())
    assert [u["nodes"] for u in doc["unfixable"]] == [["add_eps", "log"]]
    doc["unfixable"] = []  # a hand edit that drops the FP32 island: log(0) = -inf in FP16 again
    plan.write_text(json.dumps(doc))
    out = tmp_path / "fixed.onnx"
    capsys.readouterr()
    argv = ["fix", str(tmp_path / "m.onnx"), "--plan", str(plan), "--input", str(tmp_path / "x.npy"), "-o", str(out)]
    assert main(argv) == 0 and out.exists()
    printed = " ".join(capsys.readouterr().out.split())
    assert "pure FP16 missed the bar: the fixed model gives 1 inf/NaN" in printed
    fixed = onnx.load(out)
    assert {"add_eps", "log"} <= {n.name for n in fixed.graph.node if n.op_type in ("Add", "Log")}
    out.unlink()
    assert main([*argv, "--force"]) == 1 and out.exists()
    assert "still produces inf/NaN" in " ".join(capsys.readouterr().out.split())


def _keyerror_model(folder):
    """``keyerror_model:build``, a model whose forward raises KeyError, and ``x.npy`` for it."""
    (folder / "keyerror_model.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return {'a': x}['b']\n"
        "def build():\n"
        "    return M()\n")
    np.save(folder / "x.npy", np.ones((1, 4), np.float32))


def test_an_internal_error_is_a_traceback_not_a_usage_error(tmp_path, monkeypatch):
    """A KeyError inside the model is a bug (of the model or of fp16guard): ``main`` lets it propagate."""
    _keyerror_model(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyError, match="'b'"):
        main(["inspect", "keyerror_model:build", "--input", str(tmp_path / "x.npy")])


def test_the_console_script_exits_3_on_an_internal_error(tmp_path):
    """The console script keeps the bug's traceback and exits 3: never 1 (overflow found) or 2 (bad usage)."""
    _keyerror_model(tmp_path)
    done = subprocess.run([sys.executable, "-c", "from fp16guard.cli import console_main; console_main()",
                           "inspect", "keyerror_model:build", "--input", "x.npy"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 3
    assert "Traceback" in done.stderr and "KeyError: 'b'" in done.stderr and "internal error" in done.stderr


def test_classes_keep_the_builtin_they_replaced():
    assert issubclass(InputError, ValueError) and issubclass(BackendError, RuntimeError)
    assert issubclass(UsageError, Fp16GuardError) and StillOverflowsError.exit_code == 1
    assert InputError.exit_code == 2 and UsageError.exit_code == 2


@pytest.mark.parametrize("argv, message", [
    (["fix", "{m}", "--input", "{x}", "-o", "{missing}/fixed.onnx"], "does not exist; create it first"),
    (["fix", "{m}", "--input", "{x}", "-o", "{tmp}/f.onnx", "--json", "{missing}/r.json"], "does not exist"),
    (["calibrate", "{m}", "--input", "{x}", "-o", "{missing}/plan.json"], "does not exist"),
    (["inspect", "{m}", "--input", "{x}", "--plot", "{missing}/r.png"], "does not exist"),
    (["bisect", "{m}", "--input", "{x}", "--json", "{missing}/b.json"], "does not exist"),
    (["calibrate", "{m}", "--input", "{x}", "-o", "{tmp}/p.json", "--target-log2", "40"], "give 1 to 15"),
    (["fix", "{m}", "--input", "{x}", "-o", "{tmp}/f.onnx", "--tolerance", "nan"], "give a positive relative L2"),
    (["bisect", "{m}", "--input", "{x}", "--tolerance", "-1"], "give a positive relative L2"),
])
def test_bad_options_are_refused_in_one_line_before_any_work(tmp_path, capsys, argv, message):
    """A missing output folder, a headroom target or tolerance out of range: exit 2 at once (not
    after the calibration), one line on stderr, nothing on stdout."""
    _log_eps(tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.array([0.0, 1.0, 2.0, 3.0], np.float32))
    names = {"m": tmp_path / "m.onnx", "x": tmp_path / "x.npy", "tmp": tmp_path, "missing": tmp_path / "nope"}
    assert main([a.format(**names) for a in argv]) == 2
    out = capsys.readouterr()
    assert len(out.err.strip().splitlines()) == 1 and message in out.err and not out.out
    assert not (tmp_path / "f.onnx").exists() and not (tmp_path / "p.json").exists()
