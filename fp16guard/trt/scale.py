"""The fix's power-of-two scale region, for networks built with the TensorRT Python API.

A region (:class:`fp16guard.plan.PlanRegion`) stores its activations as ``true / 2**k``: the
layers that write it (``opened_by``) scale their weights and biases by ``2**-k``, the layers that
read it and return to true values (``closed_by``) scale their weights by ``2**k``, and
scale-equivariant layers in between (ReLU, pooling, concatenation, elementwise sums of region
tensors) need nothing. Powers of two are exact in floating point, so the network computes the same
values in real arithmetic (:mod:`fp16guard.folding` gives the rule). Where no layer can absorb the
factor, :func:`insert_rescale` adds one ``IScaleLayer`` multiplying by ``2**k``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fp16guard.folding import pow2


def layers_by_name(network, trt) -> dict:
    """``{layer name: ILayer}`` of a TensorRT ``INetworkDefinition`` (``trt``: the imported module)."""
    out = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        cls = {trt.LayerType.CONVOLUTION: trt.IConvolutionLayer, trt.LayerType.DECONVOLUTION: trt.IDeconvolutionLayer,
               trt.LayerType.SCALE: trt.IScaleLayer}.get(layer.type)
        if cls is not None:
            layer.__class__ = cls  # the Python API returns ILayer; the subclass exposes the weights
        out[layer.name] = layer
    return out


def _scaled(values, factor: float, keep: list) -> np.ndarray:
    """``values * factor`` computed in float64, stored in ``values``' dtype (kept alive)."""
    v = np.asarray(values)
    out = np.ascontiguousarray((v.astype(np.float64) * factor).astype(v.dtype))
    keep.append(out)
    return out


def _scale_weights(layer, trt, weight_factor: float | None, bias_factor: float | None, keep: list) -> None:
    """Multiply a convolution's kernel/bias or a scale layer's scale/shift in place on the network."""
    if layer.type in (trt.LayerType.CONVOLUTION, trt.LayerType.DECONVOLUTION):
        if weight_factor is not None:
            layer.kernel = _scaled(layer.kernel, weight_factor, keep)
        if bias_factor is not None and np.asarray(layer.bias).size:
            layer.bias = _scaled(layer.bias, bias_factor, keep)
        return
    if layer.type == trt.LayerType.SCALE:
        if np.asarray(layer.power).size and np.any(np.asarray(layer.power) != 1):
            raise ValueError(f"{layer.name}: an IScaleLayer with power != 1 is not linear; insert_rescale before it")
        scale, shift = np.asarray(layer.scale), np.asarray(layer.shift)
        n = max(scale.size, shift.size, 1)
        dtype = scale.dtype if scale.size else shift.dtype if shift.size else np.float32
        if weight_factor is not None:
            layer.scale = _scaled(scale if scale.size else np.ones(n, dtype), weight_factor, keep)
        if bias_factor is not None and shift.size:
            layer.shift = _scaled(shift, bias_factor, keep)
        return
    raise ValueError(f"{layer.name} ({layer.type}) has no weights to absorb a power-of-two factor; "
                     f"use insert_rescale on its input or output")


def scale_region(network, *, exponent: int, opened_by: Sequence[str], closed_by: Sequence[str],
                 inside: Sequence[str] = (), keep: list) -> None:
    """Fold a region's ``2**exponent`` into the weights of the layers around it, on the network.

    * ``opened_by`` (convolution, deconvolution or scale layers writing the region): kernel and
      bias, or scale and shift, times ``2**-exponent``;
    * ``closed_by`` (layers reading the region, writing true values): kernel or scale times
      ``2**exponent`` (bias and shift unchanged);
    * ``inside`` (scale layers that read and write the region, e.g. a BatchNorm between two
      region tensors): shift times ``2**-exponent``.

    Every reader of a region tensor must be in ``closed_by``, ``inside``, or scale-equivariant
    (activation ReLU/LeakyReLU, pooling, concatenation, elementwise SUM/MAX/MIN of region tensors,
    shuffle, slice); this function does not check the graph.

    Args:
        network: ``tensorrt.INetworkDefinition`` (modified: this is its purpose).
        exponent: ``k`` of ``F = 2**k``.
        opened_by, closed_by, inside: layer names.
        keep: list that keeps the new weight arrays alive until the engine is built.

    Raises:
        MissingDependencyError: TensorRT is not installed.
        KeyError: a layer name the network does not have.
        ValueError: a named layer cannot absorb the factor.
    """
    from fp16guard.trt import import_tensorrt

    trt = import_tensorrt()
    layers = layers_by_name(network, trt)
    for names in (opened_by, closed_by, inside):
        missing = [n for n in names if n not in layers]
        if missing:
            raise KeyError(f"the network has no layer named {missing[0]!r}")
    for name in opened_by:
        _scale_weights(layers[name], trt, pow2(-exponent), pow2(-exponent), keep)
    for name in closed_by:
        _scale_weights(layers[name], trt, pow2(exponent), None, keep)
    for name in inside:
        if layers[name].type != trt.LayerType.SCALE:
            raise ValueError(f"{name}: only scale layers can sit inside a region with weights")
        _scale_weights(layers[name], trt, None, pow2(-exponent), keep)


def insert_rescale(network, tensor, exponent: int, *, keep: list):
    """Multiply ``tensor`` by ``2**exponent`` with one ``IScaleLayer`` (``UNIFORM``) and make every
    layer that read ``tensor`` read the result instead (a network output stays as it is).

    Args:
        network: ``tensorrt.INetworkDefinition`` (modified).
        tensor: the ``ITensor`` to rescale.
        exponent: the power of two.
        keep: list that keeps the scale array alive until the engine is built.

    Returns:
        The new ``IScaleLayer``.

    Raises:
        MissingDependencyError: TensorRT is not installed.
    """
    from fp16guard.trt import import_tensorrt

    trt = import_tensorrt()
    readers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            if t is not None and t.name == tensor.name:
                readers.append((layer, j))
    scale = np.array([pow2(exponent)], dtype=trt.nptype(tensor.dtype))
    keep.append(scale)
    layer = network.add_scale(tensor, trt.ScaleMode.UNIFORM, scale=trt.Weights(scale))
    layer.name = f"{tensor.name}__x2^{exponent}"
    for reader, j in readers:
        reader.set_input(j, layer.get_output(0))
    return layer
