"""Layers for networks built with the TensorRT Python API, and the numpy math behind them.

Every ``add_*`` function takes an ``INetworkDefinition`` and an ``ITensor`` and returns the last
layer it added (``layer.get_output(0)`` is the result). Constants are created in the input
tensor's dtype (FP16 in an FP16 strongly typed network: TensorRT 11 has no other kind, and
TensorRT 10 needs matching types once ``STRONGLY_TYPED`` is set), computed in float64 first.

TensorRT does not copy weight arrays when a layer is added, only when the engine is built, so each
function appends the arrays it creates to ``keep``: keep that list alive until
``build_serialized_network`` returns.

The math (``batchnorm_scale_shift``, ``fold_conv_bn``, ``hswish``, ``fully_connected``) is plain
numpy, tested against PyTorch's own layers in ``tests/test_trt_helpers.py``.
"""

from __future__ import annotations

import numpy as np

from fp16guard.folding import fold_affine_into_weights, fold_batchnorm


def batchnorm_scale_shift(gamma, beta, mean, var, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNorm as ``y = x * scale + shift`` per channel, rounded once to float32.

    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` (seed 000), computed in
    float64 (:func:`fp16guard.folding.fold_batchnorm`) so a running variance beyond FP16's range
    never reaches an FP16 tensor.

    Args:
        gamma, beta, mean, var: ``[C]`` arrays (any float dtype).
        eps: the BatchNorm epsilon.

    Returns:
        ``(scale, shift)``: float32 ``[C]``.
    """
    scale, shift = fold_batchnorm(gamma, beta, mean, var, eps)
    return scale.astype(np.float32), shift.astype(np.float32)


def fold_conv_bn(conv_w, conv_b, gamma, beta, mean, var, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Fold a BatchNorm into the convolution before it (seed 000's fused weights).

    ``w' = w * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``, computed in float64 and rounded once to
    float32 (PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_weights`` computes in float32).

    Args:
        conv_w: ``[C_out, C_in/groups, *kernel]`` convolution weight.
        conv_b: ``[C_out]`` bias, or None.
        gamma, beta, mean, var: ``[C_out]`` BatchNorm parameters; ``eps`` its epsilon.

    Returns:
        ``(w', b')``: float32, shapes ``conv_w.shape`` and ``[C_out]``.

    Raises:
        ValueError: the BatchNorm's channel count differs from ``C_out``.
    """
    scale, shift = fold_batchnorm(gamma, beta, mean, var, eps)
    w, b = fold_affine_into_weights(conv_w, conv_b, scale, shift, channel_axis=0)
    return w.astype(np.float32), b.astype(np.float32)


def hswish(x: np.ndarray) -> np.ndarray:
    """Hard-swish as :func:`add_hswish` computes it: ``x * clip(x + 3, 0, 6) / 6``, in ``x``'s dtype,
    one rounding per op (the value PyTorch's ``F.hardswish`` gives)."""
    x = np.asarray(x)
    three, six = x.dtype.type(3), x.dtype.type(6)
    return (x * np.clip(x + three, x.dtype.type(0), six)) / six


def fully_connected(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """What :func:`add_fully_connected` computes: ``x.reshape(N, -1) @ weight.reshape(M, -1).T + bias``.

    Args:
        x: ``[N, ...]`` input (flattened per sample, as the old ``IFullyConnectedLayer`` did).
        weight: ``[M, K]`` or ``[M, C, H, W]`` with ``K = C*H*W`` (``nn.Linear.weight`` layout).
        bias: ``[M]`` or None.

    Returns:
        ``[N, M]``.
    """
    x = np.asarray(x)
    y = x.reshape(x.shape[0], -1) @ np.asarray(weight, dtype=x.dtype).reshape(weight.shape[0], -1).T
    return y if bias is None else y + np.asarray(bias, dtype=x.dtype)


def _np_dtype(trt, tensor) -> np.dtype:
    return np.dtype(trt.nptype(tensor.dtype))


def _constant(network, trt, array: np.ndarray, keep: list):
    """An ``IConstantLayer`` holding ``array`` (appended to ``keep``)."""
    array = np.ascontiguousarray(array)
    keep.append(array)
    return network.add_constant(trt.Dims(array.shape), trt.Weights(array))


def add_batchnorm(network, input, gamma, beta, mean, var, eps: float = 1e-5, *, keep: list):
    """An inference BatchNorm as one ``IScaleLayer`` in ``CHANNEL`` mode (seed 000/001).

    Args:
        network: ``tensorrt.INetworkDefinition``.
        input: ``ITensor`` ``[N, C, ...]`` (channel axis 1).
        gamma, beta, mean, var, eps: the BatchNorm's parameters (``[C]``).
        keep: list that keeps the weight arrays alive until the engine is built.

    Returns:
        The ``IScaleLayer``; scale and shift (:func:`batchnorm_scale_shift`) are stored in the
        input's dtype.

    Raises:
        MissingDependencyError: TensorRT is not installed.
        ValueError: scale or shift does not fit the input's dtype (e.g. FP16): fold it into the
            convolution before instead (:func:`fold_conv_bn`).
    """
    from fp16guard.trt import import_tensorrt

    trt = import_tensorrt()
    scale, shift = fold_batchnorm(gamma, beta, mean, var, eps)
    dtype = _np_dtype(trt, input)
    for what, v in (("scale", scale), ("shift", shift)):
        if np.any(np.abs(v) > np.finfo(dtype).max):
            raise ValueError(f"BatchNorm {what} reaches {np.abs(v).max():.4g}, beyond {dtype}; fold it into the "
                             f"convolution in FP32 (fold_conv_bn) or run this layer in FP32")
    scale, shift = scale.astype(dtype), shift.astype(dtype)
    keep += [scale, shift]
    return network.add_scale(input, trt.ScaleMode.CHANNEL, shift=trt.Weights(shift), scale=trt.Weights(scale))


def add_hswish(network, input, *, keep: list):
    """Hard-swish ``x * relu6(x + 3) / 6`` from an ``IActivationLayer`` (``CLIP`` 0..6) and
    ``IElementWiseLayer`` sum, product and division (TensorRT fuses them into one kernel).

    Args:
        network: ``tensorrt.INetworkDefinition``.
        input: ``ITensor`` of any shape.
        keep: list that keeps the constants alive until the engine is built.

    Returns:
        The last ``IElementWiseLayer`` (the division); numpy reference :func:`hswish`.

    Raises:
        MissingDependencyError: TensorRT is not installed.
    """
    from fp16guard.trt import import_tensorrt

    trt = import_tensorrt()
    dtype = _np_dtype(trt, input)
    ones = (1,) * len(input.shape)
    three = _constant(network, trt, np.full(ones, 3, dtype), keep).get_output(0)
    six = _constant(network, trt, np.full(ones, 6, dtype), keep).get_output(0)
    shifted = network.add_elementwise(input, three, trt.ElementWiseOperation.SUM).get_output(0)
    relu6 = network.add_activation(shifted, trt.ActivationType.CLIP)
    relu6.alpha, relu6.beta = 0.0, 6.0
    prod = network.add_elementwise(input, relu6.get_output(0), trt.ElementWiseOperation.PROD).get_output(0)
    return network.add_elementwise(prod, six, trt.ElementWiseOperation.DIV)


def add_fully_connected(network, input, weight: np.ndarray, bias: np.ndarray | None = None, *, keep: list):
    """A fully connected layer for TensorRT >= 10, which removed ``add_fully_connected`` (seed 004):
    ``IShuffleLayer`` (flatten to ``[N, K]``), ``IMatrixMultiplyLayer`` against the constant
    weight (transposed), and an ``IElementWiseLayer`` sum with the bias.

    Args:
        network: ``tensorrt.INetworkDefinition``.
        input: ``ITensor`` ``[N, ...]`` with ``K`` values per sample.
        weight: ``[M, K]`` (``nn.Linear.weight``) or ``[M, C, H, W]``.
        bias: ``[M]`` or None.
        keep: list that keeps the constants alive until the engine is built.

    Returns:
        The last layer; its output is ``[N, M]``. numpy reference :func:`fully_connected`.

    Raises:
        MissingDependencyError: TensorRT is not installed.
    """
    from fp16guard.trt import import_tensorrt

    trt = import_tensorrt()
    dtype = _np_dtype(trt, input)
    w = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1).astype(dtype)
    flat = network.add_shuffle(input)
    flat.reshape_dims = trt.Dims((0, -1))
    w_const = _constant(network, trt, w, keep).get_output(0)
    mm = network.add_matrix_multiply(flat.get_output(0), trt.MatrixOperation.NONE, w_const,
                                     trt.MatrixOperation.TRANSPOSE)
    if bias is None:
        return mm
    b = _constant(network, trt, np.asarray(bias, dtype=np.float64).reshape(1, -1).astype(dtype), keep)
    return network.add_elementwise(mm.get_output(0), b.get_output(0), trt.ElementWiseOperation.SUM)
