"""A PyTorch plan per module (fp16guard.fixing.module_scales) and the plan-driven block forwards
(fp16guard.rewriters.blocks) on a residual network shaped like mmdet's ResNet BasicBlocks."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from fp16guard.errors import PlanError
from fp16guard.fixing import calibrate
from fp16guard.fixing.module_scales import ModuleScale, ScaleTable, module_fingerprint, module_scales
from fp16guard.plan import RewritePlan
from fp16guard.rewriters.blocks import basic_block_forward, conv_norm_act
from tests.models import residual_input, residual_net


def test_calibrated_plan_lists_module_scales_that_survive_json():
    net = residual_net()
    with torch.no_grad():
        assert float(net.layer(net.stem(torch.from_numpy(residual_input(1)))).abs().max()) > 65504
    plan = calibrate(net, [residual_input(1), residual_input(2)])
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
    a, b = residual_net(), residual_net()
    assert module_fingerprint(a.layer[2]) == module_fingerprint(b.layer[2])
    with torch.no_grad():
        b.layer[2].conv1.weight[0, 0, 0, 0] += 1e-3
    assert module_fingerprint(a.layer[2]) != module_fingerprint(b.layer[2])


def test_block_forwards_from_the_plan_are_exact_and_stay_in_fp16_range():
    net = residual_net()
    plan = calibrate(net, [residual_input(1), residual_input(2)])
    table = ScaleTable.from_plan(plan)
    x = torch.from_numpy(residual_input(3))  # not used for calibration
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


def test_twin_modules_with_identical_weights_are_told_apart_by_name():
    """Two convs with the same weights but different scales: the table never lets the last one win
    silently; bound to the model it picks each by qualified name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    model[2].load_state_dict(model[0].state_dict())
    fp = module_fingerprint(model[0])
    assert module_fingerprint(model[2]) == fp
    entries = [ModuleScale("0", "Conv2d", fp, 0, 5), ModuleScale("2", "Conv2d", fp, 5, 0)]
    with pytest.raises(PlanError, match="identical weights but different scales"):
        ScaleTable(entries).find(model[2])
    table = ScaleTable(entries, model=model)
    assert table.exponents(model[0]) == (0, 5) and table.exponents(model[2]) == (5, 0)
    agreeing = ScaleTable([ModuleScale("0", "Conv2d", fp, 3, 3), ModuleScale("2", "Conv2d", fp, 3, 3)])
    assert agreeing.exponents(model[2]) == (3, 3)  # twins that agree need no name
