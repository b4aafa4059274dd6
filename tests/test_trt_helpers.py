"""fp16guard.trt: the numpy math against PyTorch's own layers, .wts files, and (where TensorRT or
TensorRT-RTX imports) the network helpers and engine builds."""

import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fp16guard.trt.layers import batchnorm_scale_shift, fold_conv_bn, fully_connected, hswish
from fp16guard.trt.wts import WtsError, check_wts, read_wts, write_wts


def _bn(rng, c, var_scale=1.0):
    return (rng.uniform(0.2, 2, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.1, 2, c) * var_scale)


# ---------------------------------------------------------------- math, against PyTorch

@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), var_log10=st.floats(-3, 9))
def test_fold_conv_bn_is_the_correctly_rounded_fold_and_matches_pytorch(seed, var_log10):
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(6, 3, 3, 3)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    gamma, beta, mean, var = (a.astype(np.float32) for a in _bn(rng, 6, 10.0**var_log10))
    fw, fb = fold_conv_bn(w, b, gamma, beta, mean, var, 1e-5)
    # exactly float32(the float64 fold): one rounding
    inv = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    np.testing.assert_array_equal(fw, (w.astype(np.float64) * inv[:, None, None, None]).astype(np.float32))
    np.testing.assert_array_equal(fb, ((b.astype(np.float64) - mean) * inv + beta).astype(np.float32))
    # PyTorch's float32 fold agrees to a few ulps
    tw, tb = torch.nn.utils.fusion.fuse_conv_bn_weights(*(torch.from_numpy(a) for a in (w, b, mean, var)), 1e-5,
                                                        torch.from_numpy(gamma), torch.from_numpy(beta))
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=4e-7, atol=0)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=1e-6, atol=1e-6 * float(np.abs(fb).max()))


def test_folded_conv_equals_conv_then_batchnorm():
    rng = np.random.default_rng(0)
    conv, bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        for p, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), _bn(rng, 6, 1e6)):
            p.copy_(torch.from_numpy(v))
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    fw, fb = fold_conv_bn(conv.weight.detach().numpy(), conv.bias.detach().numpy(),
                          *(t.detach().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)))
    with torch.no_grad():
        ref = bn(conv(x))
        out = F.conv2d(x, torch.from_numpy(fw), torch.from_numpy(fb))
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_batchnorm_scale_shift_equals_pytorch_batchnorm():
    rng = np.random.default_rng(1)
    bn = nn.BatchNorm2d(5).eval()
    params = _bn(rng, 5, 1e8)  # a running variance far beyond FP16: harmless once folded in float64
    with torch.no_grad():
        for p, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), params):
            p.copy_(torch.from_numpy(v))
    scale, shift = batchnorm_scale_shift(*params, eps=bn.eps)
    assert scale.dtype == np.float32 and np.abs(scale).max() < 1e-3
    x = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(1)) * 1e4
    with torch.no_grad():
        ref = bn(x).numpy()
    out = x.numpy() * scale[:, None, None] + shift[:, None, None]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hswish_is_bitwise_pytorch_hardswish(dtype):
    x = torch.linspace(-8, 8, 20001, dtype=torch.float32).to(dtype)
    ours = hswish(x.numpy())
    ref = F.hardswish(x.float()).to(dtype).numpy() if dtype == torch.float16 else F.hardswish(x).numpy()
    if dtype == torch.float16:  # PyTorch computes FP16 hardswish in FP32 and rounds once
        ours = hswish(x.float().numpy()).astype(np.float16)
    np.testing.assert_array_equal(ours, ref)


def test_fully_connected_equals_nn_linear_on_flattened_input():
    torch.manual_seed(0)
    lin = nn.Linear(3 * 4 * 5, 7)
    x = torch.randn(2, 3, 4, 5)
    with torch.no_grad():
        ref = lin(x.flatten(1)).numpy()
    out = fully_connected(x.numpy(), lin.weight.detach().numpy().reshape(7, 3, 4, 5), lin.bias.detach().numpy())
    assert out.shape == (2, 7)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- .wts files

def test_wts_round_trip_is_bitwise_and_in_tensorrtx_encoding(tmp_path):
    special = np.array([1.0, -0.0, 65504.0, 7e4, 1e-10, np.inf, -np.inf, 2.0**-149], dtype=np.float32)
    weights = {"conv1.weight": np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32),
               "special": special}
    path = write_wts(tmp_path / "m.wts", weights)
    lines = path.read_text().splitlines()
    assert lines[0] == "2" and lines[2].split()[:3] == ["special", "8", struct.pack(">f", 1.0).hex()]
    back = read_wts(path)
    assert list(back) == ["conv1.weight", "special"]
    np.testing.assert_array_equal(back["conv1.weight"], weights["conv1.weight"].reshape(-1))
    assert back["special"].tobytes() == special.tobytes()  # -0.0 and the subnormal survive


def test_wts_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(WtsError, match="no such .wts file"):
        read_wts(tmp_path / "nope.wts")
    bad = tmp_path / "bad.wts"
    bad.write_text("2\nw 2 3f800000 3f800000\n")
    with pytest.raises(WtsError, match="announces 2 tensors, the file has 1"):
        read_wts(bad)
    bad.write_text("1\nw 3 3f800000 3f800000\n")
    with pytest.raises(WtsError, match=r"bad.wts:2: w announces 3 values and has 2"):
        read_wts(bad)
    with pytest.raises(WtsError, match="whitespace"):
        write_wts(bad, {"a b": np.ones(1)})


def test_check_wts_flags_a_running_variance_and_a_flushed_epsilon(tmp_path):
    path = write_wts(tmp_path / "m.wts", {
        "bn1.weight": np.ones(4), "bn1.bias": np.zeros(4), "bn1.running_mean": np.zeros(4),
        "bn1.running_var": np.full(4, 1e8), "head.eps": np.array([1e-10])})
    kinds = {(f.tensor, f.rule) for f in check_wts(path)}
    assert ("bn1.running_var", "overflow") in kinds
    assert ("head.eps", "flush_to_zero") in kinds
    assert any(kind == "bn_fold" for _, kind in kinds)


# ---------------------------------------------------------------- networks (TensorRT or TensorRT-RTX)

def _trt():
    try:
        from fp16guard.trt import import_tensorrt

        return import_tensorrt()
    except ImportError:
        pytest.skip("neither tensorrt nor tensorrt_rtx_bindings is installed")


def _network(trt):
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT-RTX: always typed
    return builder, builder.create_network(0 if flag is None else 1 << int(flag))


def test_network_helpers_build_the_layers_the_seeds_describe():
    trt = _trt()
    builder, net = _network(trt)
    keep = []
    rng = np.random.default_rng(0)
    x = net.add_input("x", trt.DataType.HALF, (1, 3, 8, 8))
    from fp16guard.trt.layers import add_batchnorm, add_fully_connected, add_hswish

    conv = net.add_convolution_nd(x, 4, (3, 3), trt.Weights(keep_arr(keep, rng.normal(size=(4, 3, 3, 3)), np.float16)),
                                  trt.Weights(keep_arr(keep, rng.normal(size=4), np.float16)))
    bn = add_batchnorm(net, conv.get_output(0), *_bn(rng, 4), keep=keep)
    hs = add_hswish(net, bn.get_output(0), keep=keep)
    fc = add_fully_connected(net, hs.get_output(0), rng.normal(size=(5, 4 * 6 * 6)), rng.normal(size=5), keep=keep)
    net.mark_output(fc.get_output(0))
    types = [net.get_layer(i).type for i in range(net.num_layers)]
    assert types.count(trt.LayerType.SCALE) == 1 and types.count(trt.LayerType.MATRIX_MULTIPLY) == 1
    assert tuple(fc.get_output(0).shape) == (1, 5) and fc.get_output(0).dtype == trt.DataType.HALF
    with pytest.raises(ValueError, match="beyond"):
        add_batchnorm(net, conv.get_output(0), np.full(4, 1e3), np.zeros(4), np.zeros(4), np.full(4, 1e-6), keep=keep)
    plan = builder.build_serialized_network(net, builder.create_builder_config())
    assert plan is not None and plan.nbytes > 0


def keep_arr(keep, values, dtype):
    a = np.ascontiguousarray(np.asarray(values, dtype=dtype))
    keep.append(a)
    return a


def test_scale_region_folds_the_factor_into_the_weights_around_it():
    trt = _trt()
    from fp16guard.trt.scale import insert_rescale, scale_region

    builder, net = _network(trt)
    keep = []
    rng = np.random.default_rng(1)
    w1, b1, w2 = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4), rng.normal(size=(2, 4, 1, 1))
    x = net.add_input("x", trt.DataType.HALF, (1, 3, 8, 8))
    c1 = net.add_convolution_nd(x, 4, (3, 3), trt.Weights(keep_arr(keep, w1, np.float16)),
                                trt.Weights(keep_arr(keep, b1, np.float16)))
    c1.name = "conv1"
    relu = net.add_activation(c1.get_output(0), trt.ActivationType.RELU)
    c2 = net.add_convolution_nd(relu.get_output(0), 2, (1, 1), trt.Weights(keep_arr(keep, w2, np.float16)), None)
    c2.name = "conv2"
    out = net.add_activation(c2.get_output(0), trt.ActivationType.SIGMOID)
    net.mark_output(out.get_output(0))
    scale_region(net, exponent=3, opened_by=["conv1"], closed_by=["conv2"], keep=keep)
    from fp16guard.trt.scale import layers_by_name

    layers = layers_by_name(net, trt)
    def weights(name, attr):
        return np.asarray(getattr(layers[name], attr)).reshape(-1)  # TensorRT hands weights back flat

    np.testing.assert_array_equal(weights("conv1", "kernel"), (w1.astype(np.float16) / 8).reshape(-1))
    np.testing.assert_array_equal(weights("conv1", "bias"), (b1.astype(np.float16) / 8).reshape(-1))
    np.testing.assert_array_equal(weights("conv2", "kernel"), (w2.astype(np.float16) * 8).reshape(-1))
    rescale = insert_rescale(net, c2.get_output(0), -1, keep=keep)
    assert out.get_input(0).name == rescale.get_output(0).name
    with pytest.raises(KeyError, match="nope"):
        scale_region(net, exponent=1, opened_by=["nope"], closed_by=[], keep=keep)
    plan = builder.build_serialized_network(net, builder.create_builder_config())
    assert plan is not None and plan.nbytes > 0
