"""The PANet fixture shared by the OpenMMLab tests: mmocr's real PANet with an explicit overflow.

OpenMMLab's pretrained weights cannot be downloaded here and a randomly initialized PANet does not
overflow, so the fixture makes the overflow real and explicit: it multiplies the gamma of the last
BatchNorm of ``backbone.layer4`` (``layer4[-1].bn2``) until the block's output reaches ~1e5, the
situation seed 002 patched.
"""

from pathlib import Path

import numpy as np
import torch


class Features(torch.nn.Module):
    """PANet's backbone and neck: image ``[N, 3, H, W]`` -> the four FPEM_FFM feature maps."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, x):
        return self.detector.neck(self.detector.backbone(x))


def panet(calibration_image):
    """mmocr's PANet (ResNet-18 + FPEM_FFM, the CTW1500 config) with random weights, eval mode, and
    ``layer4[-1].norm2``'s gamma doubled until the backbone's last output reaches 1.5e5 on
    ``calibration_image`` (the explicit overflow: see the module docstring)."""
    import mmocr
    import mmocr.models  # noqa: F401 - registers the models (register_all_modules needs torchvision)
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmocr.registry import MODELS

    init_default_scope("mmocr")
    root = Path(mmocr.__file__).parent / ".mim" / "configs" / "textdet" / "panet"
    cfg = Config.fromfile(str(root / "panet_resnet18_fpem-ffm_600e_ctw1500.py"))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    x = torch.from_numpy(calibration_image)
    with torch.no_grad():
        gamma = model.backbone.layer4[-1].norm2.weight
        while float(model.backbone(x)[-1].abs().max()) < 1.5e5:
            gamma.mul_(2.0)
        # the neck's first BatchNorm after c5 normalizes it, as training would have made it: its
        # running statistics are those of its input on this image (a running variance ~1e9)
        conv, bn = model.neck.reduce_conv_c5[0], model.neck.reduce_conv_c5[1]
        y = conv(model.backbone(x)[-1])
        bn.running_mean.copy_(y.mean((0, 2, 3)))
        bn.running_var.copy_(y.var((0, 2, 3)))
    return model


def image(seed=0, size=320):
    from skimage import data, transform

    img = [data.astronaut, data.coffee, data.chelsea][seed]()
    img = transform.resize(img, (size, size), anti_aliasing=True).astype(np.float32)
    x = (img - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
