"""Fixtures of the OpenMMLab tests (run in the environment `.ci/openmmlab-env` builds)."""

import pytest
import torch
from panet import Features, image, panet

from fp16guard.fixing import calibrate


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """``(Features(PANet), plan, plan path)``: the overflowing PANet of :mod:`panet`, calibrated on
    two images; the third image (``image(2)``) is the validation image."""
    calib = [image(0), image(1)]
    net = Features(panet(calib[0]))
    with torch.no_grad():
        assert float(net.detector.backbone(torch.from_numpy(calib[0]))[-1].abs().max()) > 65504
    plan = calibrate(net, calib)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    return net, plan, path
