"""A PyTorch plan per module (fp16guard.module_scales) and the plan-driven block forwards
(fp16guard.rewriters.blocks) on a residual network shaped like mmdet's ResNet BasicBlocks."""

import numpy as np
import torch
import torch.nn as nn

from fp16guard.fixing import calibrate
from fp16guard.module_scales import ScaleTable, module_fingerprint, module_scales
from fp16guard.plan import RewritePlan
from fp16guard.rewriters.blocks import basic_block_forward, conv_norm_act


class Block(nn.Module):
    """The attribute layout of ``mmdet.models.backbones.resnet.BasicBlock`` (conv1, norm1, conv2,
    norm2, relu, downsample) with its forward; the real class is tested in tests/openmmlab."""

    def __init__(self, cin, c, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.downsample = None if stride == 1 and cin == c else nn.Sequential(
            nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer = nn.Sequential(Block(8, 8), Block(8, 16, stride=2), Block(16, 16))
        self.head = nn.Sequential(nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.head(self.layer(self.stem(x))).sigmoid()


def _net():
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2)
        net.layer[2].norm2.weight.fill_(2e5)  # the last block writes ~2e5
        net.head[0].weight.mul_(1e-4)
    return net


def _x(seed):
    return np.random.default_rng(seed).normal(size=(1, 3, 16, 16)).astype(np.float32)


def test_calibrated_plan_lists_module_scales_that_survive_json():
    net = _net()
    with torch.no_grad():
        assert float(net.layer(net.stem(torch.from_numpy(_x(1)))).abs().max()) > 65504
    plan = calibrate(net, [_x(1), _x(2)])
    scales = {m["module"]: (m["input_exponent"], m["output_exponent"]) for m in plan.modules}
    k = scales["layer.2"][1]
    assert k > 0 and scales["head"][0] == k  # the head reads the block's scaled output
    assert scales["layer.2"][0] == k  # the residual ties the block's input to its output
    again = RewritePlan.from_json(plan.to_json())
    assert again.modules == plan.modules
    table = ScaleTable.from_plan(again)
    assert table.exponents(net.layer[2]) == scales["layer.2"]
    assert table.find(net.layer[0].relu) is None  # no parameters, no fingerprint


def test_fingerprint_follows_the_weights():
    a, b = _net(), _net()
    assert module_fingerprint(a.layer[2]) == module_fingerprint(b.layer[2])
    with torch.no_grad():
        b.layer[2].conv1.weight[0, 0, 0, 0] += 1e-3
    assert module_fingerprint(a.layer[2]) != module_fingerprint(b.layer[2])


def test_block_forwards_from_the_plan_are_exact_and_stay_in_fp16_range():
    net = _net()
    plan = calibrate(net, [_x(1), _x(2)])
    table = ScaleTable.from_plan(plan)
    x = torch.from_numpy(_x(3))  # not used for calibration
    with torch.no_grad():
        ref = net.layer(net.stem(x))
        ref_head = net.head(ref)
        e_stem = table.exponents(net.stem)[1]
        h = net.stem(x) * 2.0**-e_stem  # the stem conv writes the residual stream scaled
        for block in net.layer:
            h = basic_block_forward(block, h, table)
            assert float(h.abs().max()) < 2**13 + 1
        k = table.exponents(net.layer[2])[1]
        np.testing.assert_allclose((h * 2.0**k).numpy(), ref.numpy(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        head = conv_norm_act(net.head, h, table)
        np.testing.assert_allclose(head.numpy(), ref_head.numpy(), rtol=1e-4, atol=1e-4)
    # layer.1's downsample conv opens the region: layer.0 stays unscaled, layer.1 maps 0 -> k
    found = {m.module: (m.input_exponent, m.output_exponent) for m in module_scales(net, plan, [(x,)], types=["Block"])}
    assert found == {"layer.1": (0, k), "layer.2": (k, k)}
