"""``mmdeploy.apis.torch2onnx`` itself, on the CPU, with fp16guard's rewriters and plan.

mmdeploy builds the model from mmocr's PANet config, loads the checkpoint, builds the input with
mmocr's own test pipeline, and exports in ``predict`` mode inside its ``RewriterContext``: the
full path of mmdeploy's ``tools/deploy.py`` up to the engine build. fp16guard's entry point
(:func:`fp16guard.openmmlab.torch2onnx`) only adds its rewriters and lets a TensorRT deploy
config export on the CPU. The checkpoint is the PANet fixture (random
weights, ``layer4[-1].norm2``'s gamma raised until the block writes 1.5e5; ``conftest.py``).

Needs torchvision (mmocr's dataset transforms import it), which the OpenMMLab environment of
``.ci/openmmlab-env`` has.
"""

from pathlib import Path

import numpy as np
import pytest

mmdeploy = pytest.importorskip("mmdeploy")
torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")


DEPLOY_CFG = """\
codebase_config = dict(type='mmocr', task='TextDetection')
backend_config = dict(type='tensorrt', common_config=dict(fp16_mode=True, max_workspace_size=1 << 30),
                      model_inputs=[dict(input_shapes=dict(input=dict(min_shape=[1, 3, 320, 320],
                                                                      opt_shape=[1, 3, 320, 320],
                                                                      max_shape=[1, 3, 320, 320])))])
onnx_config = dict(type='onnx', export_params=True, keep_initializers_as_inputs=False, opset_version=13,
                   save_file='end2end.onnx', input_names=['input'], output_names=['output'],
                   input_shape=[320, 320], optimize=False)
"""


@pytest.fixture(scope="module")
def files(setup, tmp_path_factory):
    import mmocr
    from PIL import Image
    from skimage import data

    net, _, plan = setup
    root = tmp_path_factory.mktemp("panet")
    ckpt = root / "panet.pth"
    torch.save({"state_dict": net.detector.state_dict()}, ckpt)
    deploy = root / "text-detection_tensorrt-fp16_static-320x320.py"
    deploy.write_text(DEPLOY_CFG)
    img = root / "chelsea.png"  # not a calibration image
    Image.fromarray(data.chelsea()).save(img)
    model_cfg = Path(mmocr.__file__).parent / ".mim/configs/textdet/panet/panet_resnet18_fpem-ffm_600e_ctw1500.py"
    return dict(ckpt=ckpt, deploy=deploy, img=img, model_cfg=model_cfg, plan=plan, root=root)


def test_torch2onnx_exports_on_the_cpu_and_applies_the_plan(files):
    from mmdeploy.apis.utils import utils as api_utils
    from mmengine.config import Config

    from fp16guard.openmmlab import load_model, model_inputs, torch2onnx, verify_export

    f = files
    check = api_utils.check_backend_device
    with pytest.raises(ValueError, match="invalid for the backend tensorrt"):  # mmdeploy's own refusal
        check(Config.fromfile(str(f["deploy"])), "cpu")
    plain = torch2onnx(f["img"], f["root"] / "plain", "end2end.onnx", str(f["deploy"]), f["model_cfg"], f["ckpt"])
    fixed = torch2onnx(f["img"], f["root"] / "fixed", "end2end.onnx", str(f["deploy"]), f["model_cfg"], f["ckpt"],
                       plan=f["plan"])
    assert api_utils.check_backend_device is check  # restored after each export

    inputs = model_inputs(load_model(f["model_cfg"], f["ckpt"]), [f["img"]], Config.fromfile(str(f["deploy"])))
    naive, ok = verify_export(plain, inputs), verify_export(fixed, inputs)
    assert naive.rows[0].nonfinite > 0  # without the plan FP16 overflows
    assert ok.finite and ok.rows[0].rel_l2 < 5e-3  # with it: finite and close in strict FP16

    import onnxruntime as ort

    x = inputs[0].arrays[0]
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})
            for p in (plain, fixed)]
    for a, b in zip(outs[1], outs[0]):  # the plan changes nothing in FP32, beyond rounding
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_cli_export_in_deploy_py_argument_order(files, capsys):
    from fp16guard.cli import main

    f = files
    args = ["export", "--deploy-cfg", str(f["deploy"]), "--model-cfg", str(f["model_cfg"]), str(f["ckpt"]),
            "--img", str(f["img"])]
    assert main(args + ["--work-dir", str(f["root"] / "cli-plain")]) == 1  # exported, FP16 gives inf/NaN
    assert main(args + ["--work-dir", str(f["root"] / "cli-fixed"), "--plan", str(f["plan"])]) == 0
    out = capsys.readouterr().out
    assert "exported ONNX in FP16: finite" in out and (f["root"] / "cli-fixed" / "end2end.onnx").is_file()
    assert main(args[:-2] + ["--work-dir", str(f["root"] / "x")]) == 2  # no --img
