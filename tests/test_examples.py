"""The bundled real models on real inputs: the findings the README promises, from real runs."""

import pytest
import torch

from fp16guard import FP16_MAX, FInspect, inspect_onnx
from fp16guard.examples import crepe, get_example, ppocr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ppocr_report():
    photos = ppocr.photos()
    feeds = [ppocr.preprocess(photos[k]) for k in ("page", "coffee")]
    return inspect_onnx(ppocr.model_path(), feeds, labels=["page", "coffee"])


def test_ppocr_fp32_finds_text_on_the_photos():
    import onnxruntime as ort

    sess = ort.InferenceSession(str(ppocr.model_path()), providers=["CPUExecutionProvider"])
    for name, img in ppocr.photos().items():
        prob = sess.run(None, {"x": ppocr.preprocess(img)})[0]
        assert (prob > ppocr.DB_THRESH).mean() > 1e-3, name


def test_ppocr_batchnorm_variance_out_of_fp16_range(ppocr_report):
    over = [s for s in ppocr_report.static if s.rule == "overflow"]
    assert [(s.tensor, s.count, s.stats.numel) for s in over] == [("batch_norm_0.w_2", 24, 24)]
    assert over[0].stats.amax == pytest.approx(9.8e7, rel=0.01)
    assert over[0].layer == "p2o.BatchNormalization.1"
    fold = next(s for s in ppocr_report.static if s.rule == "bn_fold")
    assert fold.severity == "info" and fold.extra["scale_amax"] < 1 and fold.extra["shift_amax"] < 1


def test_ppocr_peak_activation_at_the_db_head_conv(ppocr_report):
    peak = ppocr_report.peak
    # the conv whose output feeds the BatchNorm with the out-of-range variance
    assert (peak.name, peak.kind, peak.scope) == ("p2o.Conv.61", "Conv", "conv2d_497.tmp_0")
    assert 0.3 < peak.outputs.amax / FP16_MAX < 0.6
    assert ppocr_report.transitions() == []
    assert ppocr_report.overflow_found  # because of the variance


@pytest.fixture(scope="module")
def crepe_run():
    model = crepe.load_crepe()
    frames = torch.from_numpy(get_example("crepe-full").inputs()[0].arrays[0])
    with torch.no_grad(), FInspect(model, ops=True) as probe:
        probs = model(frames)
    return model, frames, probs, probe.report()


def test_crepe_weights_give_speech_pitch(crepe_run):
    _, _, probs, _ = crepe_run
    conf, bins = probs.max(dim=1)
    voiced = conf > 0.5
    assert voiced.float().mean() > 0.3
    hz = crepe.bins_to_frequency(bins[voiced])
    assert 70 < hz.median() < 250  # eSpeak's default male voice


def test_crepe_running_var_and_conv2_activations(crepe_run):
    _, _, _, report = crepe_run
    var = next(s for s in report.static if s.tensor == "conv2_BN.running_var" and s.rule == "overflow")
    assert var.count == 64 and var.stats.numel == 128
    assert var.stats.amax == pytest.approx(4.97e5, rel=0.01)
    assert next(s for s in report.static if s.rule == "bn_fold").severity == "info"
    conv2 = next(s for s in report.layers() if s.name == "conv2")
    assert 0.2 < conv2.outputs.amax / FP16_MAX < 0.3
    assert report.overflow_found and report.transitions() == []


def test_crepe_op_view_attributes_functional_relu(crepe_run):
    _, _, _, report = crepe_run
    relus = [r for r in report.ops if r.kind == "relu"]
    assert len(relus) == 6 and all(r.scope == "" for r in relus)
    conv_ops = {r.scope for r in report.ops if r.kind == "convolution"}
    assert conv_ops == {f"conv{i}" for i in range(1, 7)}


def test_naive_fp16_cast_silently_breaks_crepe(crepe_run):
    """The static finding is real: cast before folding, conv2_BN's scale becomes 0 on 64 channels."""
    model, _, _, _ = crepe_run
    bn = model.conv2_BN.requires_grad_(False)
    var16 = bn.running_var.half()
    assert int(torch.isinf(var16).sum()) == 64
    scale16 = (bn.weight.half().float() / torch.sqrt(var16.float() + bn.eps))
    assert int((scale16 == 0).sum()) == 64
    scale32 = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert float(scale32.abs().max()) < 1 and bool((scale32 != 0).all())


def test_asset_files_match_pinned_hashes():
    from fp16guard.examples.assets import ASSETS, asset_path, file_sha256

    for name, asset in ASSETS.items():
        assert file_sha256(asset_path(name)) == asset.sha256


def test_photos_keep_grayscale_and_drop_alpha():
    from fp16guard.examples import ppocr

    shapes = {k: v.shape for k, v in ppocr.photos(ppocr.PHOTOS).items()}
    assert shapes["page"] == (191, 384) and shapes["text"] == (172, 448)  # grayscale stays 2-D
    assert shapes["logo"] == (500, 500, 3)  # RGBA -> RGB
    assert ppocr.preprocess(ppocr.photos(("text",))["text"]).shape == (1, 3, 736, 1920)
