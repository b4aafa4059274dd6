"""Issue 24 item 7: when one export route fails, try the other; fix the part of a model that captures.

* ``torch.cdist`` has no ONNX function in the dynamo exporter (``aten._cdist_forward``: a
  DispatchError at step 3/3); the TorchScript exporter exports it, and the fix says so.
* A bfloat16 buffer read by a ``Mul`` (ALiBi slopes kept in bfloat16) exports to a graph ONNX
  Runtime cannot load (no bfloat16 ``Mul``): its bfloat16 computation is widened to float32.
* A tiny detector whose backbone overflows FP16 (~1e5) and whose post-processing is data-dependent
  (``nonzero`` and a branch on its count): ``torch.export`` cannot capture it whole; the backbone is
  captured and fixed on the inputs it gets in the FP32 model, chosen automatically or with
  ``--submodule backbone``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fp16guard.errors import ExportError, UsageError
from fp16guard.fixing import calibrate, fix_model
from fp16guard.fixing.submodule import FixedSubmodule
from fp16guard.torch_onnx import export_onnx_routes, widen_bfloat16


class Dist(nn.Module):
    """Pairwise distances of ~1e4 features: ~1e5, beyond FP16; ``cdist`` is not in the dynamo exporter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(6, 4)
        with torch.no_grad():
            self.a.weight.mul_(3e3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.cdist(h, h) / 100)


class Alibi(nn.Module):
    """ALiBi-style slopes kept in bfloat16 and multiplied in bfloat16; the Linear writes ~1e5."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625, 1, 2, 3, 4], dtype=torch.bfloat16))
        with torch.no_grad():
            self.lin.weight.mul_(1e5)

    def forward(self, x):
        return (self.lin(x).to(torch.bfloat16) * self.slopes).float() / 1e4


class Backbone(nn.Module):
    """Two convs writing ~1.1e5 and ~4.7e4, and a head back to ~1 (4 box values and a score logit)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)
        with torch.no_grad():
            self.conv1.weight.mul_(6e4)
            self.conv1.bias.mul_(6e4)
            self.head.weight.mul_(1e-4)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


class Post(nn.Module):
    """Data-dependent post-processing: the boxes whose score is above 0.5."""

    def forward(self, out):
        scores = out[0, 4].flatten().sigmoid()
        boxes = out[0, :4].flatten(1).t()
        keep = torch.nonzero(scores > 0.5).squeeze(1)
        if keep.numel() == 0:
            return boxes[:0], scores[:0]
        return boxes[keep], scores[keep]


class Det(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.post = Post()

    def forward(self, x):
        return self.post(self.backbone(x))


def det() -> Det:
    torch.manual_seed(0)
    return Det()


#: The detector factory for the command line (``package.module:factory`` in the test's folder).
FACTORY = """
import sys
sys.path.insert(0, {tests!r})
from test_export_routes import det
"""


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(n)]


def _worst(v) -> float:
    return max(r.rel_l2 for r in v.rows)


def test_dynamo_fails_torchscript_exports():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 6, 8)).astype(np.float32)
    result = fix_model(Dist(), [x], output="onnx")
    assert result.verification.finite
    assert _worst(result.verification) <= 1.5 * _worst(result.fallback) + 2 ** -10
    note = result.notes[0]
    assert note.kind == "onnx_export"
    assert "TorchScript exporter" in note.detail and "aten._cdist_forward" in note.detail
    assert "TorchScript exporter" in str(result)  # the summary says which route
    assert result.to_json()["rewrites"][0]["kind"] == "onnx_export"


def test_bfloat16_buffer_exports_in_float32():
    torch.manual_seed(0)
    model = Alibi()
    x = np.random.default_rng(0).standard_normal((2, 6, 8)).astype(np.float32)
    result = fix_model(model, [x], output="onnx")
    assert result.verification.finite and _worst(result.verification) < 1e-2 and not result.naive.finite
    assert "bfloat16" in result.notes[0].detail and "ONNX Runtime" in result.notes[0].detail
    assert model.slopes.dtype == torch.bfloat16  # the caller's module is not changed


def test_widen_bfloat16_keeps_values():
    import onnx
    from onnx import helper, numpy_helper
    import ml_dtypes

    slopes = numpy_helper.from_array(np.array([0.5, 3.0], dtype=ml_dtypes.bfloat16), "s")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=onnx.TensorProto.BFLOAT16),
         helper.make_node("Mul", ["xb", "s"], ["yb"]), helper.make_node("Cast", ["yb"], ["y"], to=1)],
        "g", [helper.make_tensor_value_info("x", 1, [2])], [helper.make_tensor_value_info("y", 1, [2])], [slopes])
    wide, what = widen_bfloat16(helper.make_model(graph))
    assert "2 Cast(s) to bfloat16" not in what and "1 Cast(s) to bfloat16" in what
    assert wide.graph.initializer[0].data_type == onnx.TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(wide.graph.initializer[0]), [0.5, 3.0])
    import onnxruntime as ort

    y = ort.InferenceSession(wide.SerializeToString()).run(None, {"x": np.array([2.0, 4.0], np.float32)})[0]
    np.testing.assert_array_equal(y, [1.0, 12.0])


def test_a_trace_that_fixes_a_branch_is_checked():
    """The TorchScript trace of a branch on a tensor's value records one branch: refused when the
    module takes the other on an input given."""
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x + 1

    examples = [(torch.ones(2, 3),), (-torch.ones(2, 3),)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match="torchscript: its outputs differ from the module's on input 1"):
            export_onnx_routes(Branchy(), examples[0], checks=examples)
        one = export_onnx_routes(Branchy(), examples[0], checks=examples[:1])
    assert one.route == "torchscript" and one.traced and "give more inputs" in one.describe()


def test_detector_backbone_chosen_automatically():
    model = det()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration, validation = _images(2), _images(1, seed=1)
    result = fix_model(model, calibration, validation=validation)
    sub = result.submodule
    assert sub is not None and sub.name == "backbone" and sub.auto and sub.share == 1.0
    assert "data-dependent" in " ".join(sub.lines()) and "--submodule backbone" in str(result)
    assert ("post", 0, "data-dependent") in sub.rest
    # the backbone's fix: finite, no worse than the FP32 fallback's error (the delivery bar)
    assert result.verification.finite and result.naive is not None and not result.naive.finite
    assert _worst(result.verification) <= 1.5 * _worst(result.fallback) + 2 ** -10
    # the whole model with the fixed backbone, end to end against FP32
    assert isinstance(result.model.backbone, FixedSubmodule) and isinstance(model.backbone, Backbone)
    rows = sub.end_to_end.rows
    assert [r.split for r in rows] == ["calibration", "calibration", "validation"]
    assert all(r.nonfinite == 0 and r.rel_l2 < 1e-2 for r in rows), rows
    with torch.no_grad():
        boxes, scores = result.model(torch.from_numpy(calibration[0]))
        ref_boxes, ref_scores = model(torch.from_numpy(calibration[0]))
    assert boxes.shape == ref_boxes.shape and torch.allclose(scores, ref_scores, atol=1e-2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.backbone._forward_pre_hooks and not model._forward_pre_hooks  # the caller's model is not hooked


def test_detector_backbone_named():
    plan = calibrate(det(), _images(1), submodule="backbone.conv1")
    assert plan.source == "Det.backbone.conv1" and plan.regions
    with pytest.raises(UsageError, match=r"Det has no submodule 'nope'; its children: backbone \(853 parameters\), "
                                         r"post \(no parameters\)"):
        fix_model(det(), _images(1), submodule="nope")


def test_no_submodule_captures_says_onnx_works():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.eye(4))

        def forward(self, x):
            y = x @ self.w
            return y * 2 if y.sum() > 0 else y

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match=r"cannot capture Flat .* its ONNX export works with the TorchScript "
                                              r"exporter .*write an \.onnx"):
            fix_model(Flat(), [np.ones((2, 4), np.float32)])


def _cli(argv, capsys):
    from fp16guard.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_submodule(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    (tmp_path / "fg_routes_det.py").write_text(FACTORY.format(tests=str(Path(__file__).parent)))
    np.save(tmp_path / "x.npy", _images(1)[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = _cli(["fix", "fg_routes_det:det", "--input", "x.npy", "--submodule", "backbone", "-o", "o.pt2",
                           "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "o.pt2").is_file() and "of backbone" in out
    program = torch.export.load(str(tmp_path / "o.pt2")).module()
    y = program(torch.from_numpy(np.load(tmp_path / "x.npy")))
    assert tuple(y.shape) == (1, 5, 8, 8) and torch.isfinite(y).all()
    code, out, err = _cli(["fix", "fg_routes_det:det", "--input", "x.npy", "--submodule", "nope", "-o", "p.pt2",
                           "-q"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "backbone (853 parameters), post (no parameters)" in lines[0], err
    assert not (tmp_path / "p.pt2").exists()
    code, out, err = _cli(["fix", "fg_routes_det:det", "--input", "x.npy", "-o", "a.pt2", "-q"], capsys)
    assert code == 0, err
    assert "fp16guard fix fg_routes_det:det --input x.npy --submodule backbone -o a.pt2" in " ".join(out.split())


class _NoGradRegion(nn.Module):
    """An overflow that crosses a ``with torch.no_grad():`` region in ``forward`` (Llama's rotary
    embedding in some transformers releases): ``torch.export`` writes the region as a
    ``wrap_with_set_grad_enabled`` higher-order op around a subgraph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x) * 1e6  # beyond FP16
        with torch.no_grad():
            z = torch.relu(y.float()) * 0.5 + y
        return self.out(z)


def test_a_no_grad_region_is_fixed_through_its_body():
    from fp16guard.torch_graph import capture, inline_wrapped_regions

    torch.manual_seed(0)
    model = _NoGradRegion().eval()
    x = [torch.randn(2, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    gm = capture(model, [(x[0],)])
    assert not [n for n in gm.graph.nodes if "wrap_with" in str(n.target)]  # inlined: ATen ops only
    assert torch.equal(gm(x[1])[0] if isinstance(gm(x[1]), (tuple, list)) else gm(x[1]), model(x[1]))
    assert inline_wrapped_regions(gm) == 0
    result = fix_model(model, [t.numpy() for t in x[:1]], validation=[x[1].numpy()])
    assert result.delivered == "fixed" and not result.naive.finite
    assert max(r.rel_l2 for r in result.verification.rows) < 2e-3, result.verification.rows
