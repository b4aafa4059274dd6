"""fp16guard's mmdeploy rewriters on a real mmocr PANet (ResNet-18 + FPEM_FFM) inside a real
mmdeploy ``RewriterContext``.

Runs in the OpenMMLab environment `.ci/run` creates (see README, "Using fp16guard with
mmdeploy"); skipped where mmdeploy is not installed.

The overflow is made real and explicit by the PANet fixture (``panet.py``, ``conftest.py``).
"""

import copy
import io
from pathlib import Path

import numpy as np
import pytest

mmdeploy = pytest.importorskip("mmdeploy")
torch = pytest.importorskip("torch")

from mmdeploy.core import RewriterContext  # noqa: E402
from panet import image  # noqa: E402

import fp16guard.rewriters  # noqa: E402,F401 - registers the rewriters
from fp16guard.backends import get_backend  # noqa: E402
from fp16guard.fixing import calibrate  # noqa: E402
from fp16guard.fp16_onnx import to_typed_fp16  # noqa: E402
from tests.models import residual_input, residual_net  # noqa: E402


def _export(net, x, deploy_cfg=None, opset=13):
    """ONNX bytes of ``net(x)`` traced (TorchScript exporter), inside a tensorrt RewriterContext
    when ``deploy_cfg`` is given."""
    buf = io.BytesIO()
    args = (torch.from_numpy(x),)
    if deploy_cfg is None:
        torch.onnx.export(net, args, buf, dynamo=False, opset_version=opset)
    else:
        with RewriterContext(cfg=deploy_cfg, backend="tensorrt", opset=opset):
            torch.onnx.export(net, args, buf, dynamo=False, opset_version=opset)
    return buf.getvalue()


def _run_fp16(onnx_bytes, x):
    import onnx

    model, _ = to_typed_fp16(onnx.load_from_string(onnx_bytes))
    return get_backend("emulate").build(model).run({model.graph.input[0].name: x})


def _run_fp32(onnx_bytes, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def test_plan_names_the_block_and_the_neck_conv(setup):
    net, plan, _ = setup
    scaled = {m["module"]: (m["input_exponent"], m["output_exponent"]) for m in plan.modules}
    k = scaled["detector.backbone.layer4.1"][1]
    assert k > 0 and scaled["detector.backbone.layer4.0"] == (0, k)  # layer4's residual stream, tied
    assert scaled["detector.neck.reduce_conv_c5"] == (k, 0)  # the neck's first conv+BN undoes it
    assert not plan.rescale_ops and not plan.unfixable  # every factor folds into weights


def test_plain_export_overflows_and_the_plan_export_does_not(setup):
    net, plan, path = setup
    x = image(2)  # validation image, not used for calibration
    plain = _export(net, x)
    assert not all(np.isfinite(y).all() for y in _run_fp16(plain, x))
    fixed = _export(net, x, dict(fp16guard=dict(plan=str(path))))
    ref = _run_fp32(plain, x)
    # measured: FP32 max relative difference 2.3e-7..5.9e-7; FP16 relative L2 4.0e-4..9.6e-4
    for a, b in zip(_run_fp32(fixed, x), ref):  # equal to the original in FP32, within rounding
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    for a, b in zip(_run_fp16(fixed, x), ref):  # finite and close in strict FP16
        assert np.isfinite(a).all()
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 5e-3


def test_rewriters_apply_only_inside_the_context_and_leave_no_state(setup):
    from mmdet.models.backbones.resnet import BasicBlock
    from mmocr.models.textdet.necks.fpem_ffm import FPEM_FFM

    net, plan, path = setup
    originals = (BasicBlock.forward, FPEM_FFM.forward)
    x = image(2)
    cfg = dict(fp16guard=dict(plan=str(path)))
    first, second = _export(net, x, cfg), _export(net, x, cfg)
    assert first == second  # no hidden state between exports
    assert (BasicBlock.forward, FPEM_FFM.forward) == originals  # restored after the context
    assert _export(net, x) != first  # outside the context: the original forward
    without_plan = _export(net, x, dict())  # inside, but no plan in the deploy config: nothing scaled
    assert not all(np.isfinite(y).all() for y in _run_fp16(without_plan, x))
    state = copy.deepcopy(net.state_dict())
    _export(net, x, cfg)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_generic_rewriters_apply_any_plan_to_conv_linear_and_batchnorm_modules(tmp_path):
    """A plain PyTorch residual network (no OpenMMLab class): only the generic Conv/BatchNorm
    rewriters can apply its plan."""
    net = residual_net()
    plan = calibrate(net, [residual_input(1), residual_input(2)])
    assert any(m["type"] == "BatchNorm2d" for m in plan.modules)  # folded BNs run unfolded here
    path = tmp_path / "plan.json"
    plan.save(path)
    x = residual_input(3)
    plain, fixed = _export(net, x), _export(net, x, dict(fp16guard=dict(plan=str(path))))
    assert not all(np.isfinite(y).all() for y in _run_fp16(plain, x))
    ref = _run_fp32(plain, x)
    for a, b in zip(_run_fp32(fixed, x), ref):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    for a, b in zip(_run_fp16(fixed, x), ref):
        assert np.isfinite(a).all() and np.abs(a - b).max() < 1e-2  # sigmoid outputs
    assert fixed == _export(net, x, dict(fp16guard=dict(plan=str(path))))
    assert torch.nn.Conv2d.forward is torch.nn.modules.conv.Conv2d.forward  # restored


def test_cli_calibrates_an_openmmlab_checkpoint_in_deploy_py_argument_order(setup, tmp_path):
    """`fp16guard calibrate --deploy-cfg D --model-cfg M CHECKPOINT --img IMG`: the model built
    from mmocr's config, the checkpoint loaded, images through the model's data_preprocessor."""
    import mmocr
    from PIL import Image
    from skimage import data

    from fp16guard.cli import main
    from fp16guard.plan import RewritePlan

    net, _, _ = setup
    ckpt = tmp_path / "panet.pth"
    torch.save({"state_dict": net.detector.state_dict()}, ckpt)
    deploy = tmp_path / "deploy.py"
    deploy.write_text("codebase_config = dict(type='mmocr', task='TextDetection')\n"
                      "backend_config = dict(type='tensorrt')\n"
                      "onnx_config = dict(type='onnx', input_shape=[320, 320], opset_version=13)\n")
    images = []
    for name in ("astronaut", "coffee"):
        images += ["--img", str(tmp_path / f"{name}.png")]
        Image.fromarray(getattr(data, name)()).save(images[-1])
    model_cfg = Path(mmocr.__file__).parent / ".mim/configs/textdet/panet/panet_resnet18_fpem-ffm_600e_ctw1500.py"
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--deploy-cfg", str(deploy), "--model-cfg", str(model_cfg), str(ckpt), *images,
                 "-o", str(out)]) == 0
    plan = RewritePlan.load(out)
    scaled = {m["module"]: (m["input_exponent"], m["output_exponent"]) for m in plan.modules}
    assert scaled["model.backbone.layer4.1"][1] > 0 and scaled["model.neck.reduce_conv_c5"][1] == 0
    x = image(2)
    fixed = _export(net, x, dict(fp16guard=dict(plan=str(out))))
    assert all(np.isfinite(y).all() for y in _run_fp16(fixed, x))
    assert main(["calibrate", "--model-cfg", str(model_cfg), str(ckpt), *images, "-o", str(out)]) == 2


def test_cli_bisect_names_the_overflowing_block_in_deploy_py_argument_order(setup, tmp_path, capsys):
    import json

    import mmocr
    from PIL import Image
    from skimage import data

    from fp16guard.cli import main

    net, _, _ = setup
    ckpt = tmp_path / "panet.pth"
    torch.save({"state_dict": net.detector.state_dict()}, ckpt)
    deploy = tmp_path / "deploy.py"
    deploy.write_text("onnx_config = dict(type='onnx', input_shape=[320, 320], opset_version=13)\n")
    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    model_cfg = Path(mmocr.__file__).parent / ".mim/configs/textdet/panet/panet_resnet18_fpem-ffm_600e_ctw1500.py"
    code = main(["bisect", "--deploy-cfg", str(deploy), "--model-cfg", str(model_cfg), str(ckpt),
                 "--img", str(tmp_path / "chelsea.png"), "--backend", "emulate", "--json", str(tmp_path / "b.json")])
    assert code == 1  # an offender was found
    result = json.loads((tmp_path / "b.json").read_text())
    # measured: 8 engine builds, 7.7 s; offender model.backbone.layer4.1.bn2, the scaled BatchNorm
    assert result["offenders"][0]["name"] == "model.backbone.layer4.1.bn2"


def test_mmdeploy_own_onnx_export_applies_the_plan(setup, tmp_path):
    """Through mmdeploy.apis.onnx.export (patch_model + RewriterContext + torch.onnx.export), the
    path torch2onnx takes after building its inputs."""
    from fp16guard.inputs import NamedInput
    from fp16guard.openmmlab import mmdeploy_export

    net, _, path = setup
    x = image(2)
    cfg = dict(backend_config=dict(type="tensorrt"), onnx_config=dict(type="onnx"), fp16guard=dict(plan=str(path)))
    fixed = mmdeploy_export(cfg, net.detector, NamedInput("chelsea", (x,)), tmp_path / "fixed").read_bytes()
    plain_cfg = {k: v for k, v in cfg.items() if k != "fp16guard"}
    plain = mmdeploy_export(plain_cfg, net.detector, NamedInput("chelsea", (x,)), tmp_path / "plain").read_bytes()
    assert not all(np.isfinite(y).all() for y in _run_fp16(plain, x))
    ref = _run_fp32(plain, x)
    for a, b in zip(_run_fp32(fixed, x), ref):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    for a, b in zip(_run_fp16(fixed, x), ref):
        assert np.isfinite(a).all() and np.linalg.norm(a - b) / np.linalg.norm(b) < 5e-3


def test_dbnet_whole_model_through_the_generic_rewriters(tmp_path):
    """mmocr's DBNet (ResNet-18 + FPNC + DBHead), whole tensor-mode model: the region runs from
    layer4 through the FPNC neck (convs without norms, upsampling, sums, concatenation) to the
    head's first BatchNorm, so only the BasicBlock and the generic Conv/BatchNorm rewriters apply.
    Same fixture rule as PANet: layer4's last gamma doubled until the block writes 1.5e5, and the
    head's first BatchNorm given its input's running statistics."""
    import mmocr
    import mmocr.models  # noqa: F401
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmocr.registry import MODELS

    from fp16guard.openmmlab import TensorForward

    init_default_scope("mmocr")
    root = Path(mmocr.__file__).parent / ".mim" / "configs" / "textdet" / "dbnet"
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(root / "dbnet_resnet18_fpnc_1200e_icdar2015.py")).model).eval()
    calib = [image(0), image(1)]
    x = torch.from_numpy(calib[0])
    with torch.no_grad():
        gamma = model.backbone.layer4[-1].norm2.weight
        while float(model.backbone(x)[-1].abs().max()) < 1.5e5:
            gamma.mul_(2.0)
        y = model.det_head.binarize[0](model.neck(model.backbone(x)))
        bn = model.det_head.binarize[1]
        bn.running_mean.copy_(y.mean((0, 2, 3)))
        bn.running_var.copy_(y.var((0, 2, 3)))
    net = TensorForward(model)
    plan = calibrate(net, calib)
    assert len(plan.regions) >= 3 and not plan.rescale_ops and not plan.unfixable
    path = tmp_path / "plan.json"
    plan.save(path)
    xv = image(2)
    cfg = dict(onnx_config=dict(type="onnx", input_shape=None), fp16guard=dict(plan=str(path)))
    plain, fixed = _export(net, xv, opset=11), _export(net, xv, cfg, opset=11)
    assert not all(np.isfinite(y).all() for y in _run_fp16(plain, xv))
    ref = _run_fp32(plain, xv)
    for a, b in zip(_run_fp32(fixed, xv), ref):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    for a, b in zip(_run_fp16(fixed, xv), ref):
        assert np.isfinite(a).all() and np.abs(a - b).max() < 1e-2  # probabilities


def test_generic_rewriters_apply_a_plan_to_layernorm_and_multihead_attention(tmp_path):
    """A DETR-style pre-norm transformer of plain ``nn.MultiheadAttention``, ``nn.LayerNorm`` and
    ``nn.Linear`` (``tests/models.py``): its residual stream (1.3e5) and one attention's input
    (1e5) pass 65504; the plan scales them and the LayerNorm/MultiheadAttention rewriters apply it."""
    from tests.models import PreNormEncoder, tokens

    net = PreNormEncoder().eval()
    plan = calibrate(net, [tokens(1), tokens(2)])
    types = {m["type"] for m in plan.modules}
    assert {"LayerNorm", "MultiheadAttention", "Linear"} <= types and not plan.rescale_ops and not plan.unfixable
    path = tmp_path / "plan.json"
    plan.save(path)
    x = tokens(3)
    plain, fixed = _export(net, x, opset=17), _export(net, x, dict(fp16guard=dict(plan=str(path))), opset=17)
    assert not all(np.isfinite(y).all() for y in _run_fp16(plain, x))
    ref = _run_fp32(plain, x)
    for a, b in zip(_run_fp32(fixed, x), ref):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    for a, b in zip(_run_fp16(fixed, x), ref):
        assert np.isfinite(a).all() and np.linalg.norm(a - b) <= 5e-3 * np.linalg.norm(b)
    assert torch.nn.MultiheadAttention.forward is torch.nn.modules.activation.MultiheadAttention.forward  # restored
