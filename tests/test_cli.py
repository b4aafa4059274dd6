"""The command line, run in-process through ``main`` and as a subprocess where isolation matters."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fp16guard.cli import main
from fp16guard.examples import speech_wav
from fp16guard.examples.assets import asset_path


@pytest.mark.slow
def test_ppocr_example_report_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["inspect", "--example", "ppocr-det", "--json", str(js), "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 1  # the BatchNorm variance does not fit FP16
    assert "batch_norm_0.w_2" in out and "p2o.Conv.61" in out and "FP16 overflow found" in out
    data = json.loads(js.read_text())
    assert data["schema"] == "fp16guard.inspect/1"
    assert data["summary"]["peak"]["name"] == "p2o.Conv.61"
    assert len(data["inputs"]) == 3
    assert {(s["tensor"], s["rule"]) for s in data["static"]} >= {("batch_norm_0.w_2", "overflow"),
                                                                  ("batch_norm_0.w_2", "bn_fold")}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.slow
def test_factory_with_checkpoint_and_npy_frames(tmp_path, capsys):
    from fp16guard.examples.crepe import frames_from_audio
    from fp16guard.inputs import read_wav

    x, rate = read_wav(speech_wav())
    frames = frames_from_audio(x[: rate], rate, hop_ms=100).numpy()
    np.save(tmp_path / "frames.npy", frames)
    code = main(["inspect", "fp16guard.examples.crepe:Crepe", "--checkpoint", str(asset_path("crepe-full")),
                 "--input", str(tmp_path / "frames.npy"), "--json", str(tmp_path / "c.json")])
    assert code == 1
    data = json.loads((tmp_path / "c.json").read_text())
    assert any(s["tensor"] == "conv2_BN.running_var" for s in data["static"])


def test_pt2_exported_program_clean_exit(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    ep = torch.export.export(model, (torch.randn(2, 4),))
    torch.export.save(ep, tmp_path / "m.pt2")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32))
    assert main(["inspect", str(tmp_path / "m.pt2"), "--input", str(tmp_path / "x.npy")]) == 0
    assert "no FP16 overflow found" in capsys.readouterr().out


@pytest.mark.slow
def test_wrong_input_shape_exit_2(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 64), np.float32))
    assert main(["inspect", "--example", "ppocr-det", "--input", str(tmp_path / "bad.npy")]) == 2
    assert "input 'x' must have shape [?, 3, ?, ?], got [1, 3, 64]" in capsys.readouterr().err


def test_torch_model_rejects_waveform_of_wrong_shape(capsys):
    code = main(["inspect", "fp16guard.examples.crepe:Crepe", "--input", str(speech_wav())])
    assert code == 2
    assert "rejected input speech.wav of shape [1, 98071]" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["inspect", "missing.onnx", "--input", "x.npy"], "ONNX model not found: missing.onnx"),
    (["inspect", "--example", "ppocr-det", "--input", "nope.png"], "input file not found: nope.png"),
    (["inspect", "model.bin", "--input", __file__], "cannot tell what 'model.bin' is"),
    (["inspect", "fp16guard.nothing:here", "--input", "x.npy"], "cannot import fp16guard.nothing:here"),
    (["inspect", "--example", "crepe-full", "--input", __file__], "unknown input type '.py'"),
    (["inspect"], "give a MODEL or --example NAME"),
    (["export", "c.pth", "--img", "i.png"], "export needs --deploy-cfg D --model-cfg M CHECKPOINT --img IMG"),
    (["export", "--deploy-cfg", "d.py", "--model-cfg", "m.py", "c.pth"], "export takes exactly one --img"),
])
def test_bad_usage_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_and_unreadable_model_files(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    assert main(["inspect", str(tmp_path / "none.onnx"), "--input", str(tmp_path / "x.npy")]) == 2
    assert "ONNX model not found" in capsys.readouterr().err
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage" * 50)
    assert main(["inspect", str(tmp_path / "bad.onnx"), "--input", str(tmp_path / "x.npy")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    code = main(["inspect", "fp16guard.examples.crepe:Crepe", "--checkpoint", str(tmp_path / "bad.pt"),
                 "--input", str(tmp_path / "x.npy")])
    assert code == 2 and "not a readable state_dict" in capsys.readouterr().err


def test_missing_optional_dependency_names_the_extra():
    """scikit-image hidden from the import system (sys.modules[...] = None makes import fail)."""
    code = ("import sys; sys.modules['skimage'] = None; sys.modules['skimage.data'] = None; "
            "from fp16guard.cli import main; sys.exit(main(['inspect', '--example', 'ppocr-det']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert "pip install 'fp16guard[examples]'" in done.stderr


def test_console_script_help():
    done = subprocess.run(["fp16guard", "inspect", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--example" in done.stdout
