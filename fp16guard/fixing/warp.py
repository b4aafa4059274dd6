"""Power-of-two rescaling of linear layers: the seed's "warp" trick and its folded form.

*Warped* forms (seed 002) evaluate a layer on a shrunken input and restore the result::

    warp_conv(x, conv, F) = conv(x / F) * F - (F - 1) * b            == conv(x)
    warp_bn(x, bn, F)     = bn(x / F) * F - (F - 1) * shift          == bn(x)
    warp_linear(x, lin, F)= lin(x / F) * F - (F - 1) * b             == lin(x)

The identity holds because the layer is affine, ``m(x) = A x + b``: ``m(x / F) * F = A x + F b``,
and subtracting ``(F - 1) b`` leaves ``A x + b``. What it buys: the layer itself (the kernel that a
backend runs in FP16) only ever sees ``m(x / F) = A x / F + b``, about ``F`` times smaller when
``A x`` dominates ``b``. The restore ``* F - (F - 1) b`` produces ``m(x)`` again, so in the *same*
dtype it overflows exactly when ``m(x)`` does: it must run where ``m(x)`` fits (FP32, e.g. the
PyTorch side of a split TensorRT model), or the factor must be carried into the next layer instead,
which is what the *folded* forms do.

*Folded* forms (used by the rewriter) bake the factors into a copy of the weights. With the
convention of :mod:`fp16guard.folding` (a tensor stored with exponent ``s`` holds
``true_value * 2**-s``)::

    scaled_conv(conv, s_in, s_out)(x * 2**-s_in) == conv(x) * 2**-s_out
    with W' = W * 2**(s_in - s_out), b' = b * 2**-s_out

Why powers of two only: multiplying a binary floating-point number by ``2**k`` changes its exponent
and leaves the significand alone, so it is exact (no rounding) unless the result overflows or
becomes subnormal. ``x / F``, ``* F`` and the folded weights therefore add no error of their own;
the folded form is even bitwise equal to the original layer (same operations on values that are all
scaled by the same power of two round identically). In FP16 that caveat bites: small weights,
inputs or outputs (below 2**-14) are subnormal, and shifting them loses bits, so bitwise equality
is an FP32 property in practice. Any other factor would round at every step.
The only new error of the warped forms is the cancellation in ``- (F - 1) b``: about
``F * |b| * eps``.
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
from torch import nn

from fp16guard.folding import fold_batchnorm, pow2

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _check_factor(factor) -> float:
    """``factor`` as a float; ValueError unless it is a real power of two >= 1 (bools rejected)."""
    ok = isinstance(factor, numbers.Real) and not isinstance(factor, bool)
    if ok:
        try:
            f = float(factor)
        except OverflowError:  # an int beyond float range
            ok = False
        else:
            ok = math.isfinite(f) and f >= 1.0 and math.frexp(f)[0] == 0.5
    if not ok:
        raise ValueError(f"factor must be a power of two >= 1, got {factor!r}")
    return f


def _check_module(module, kinds: tuple, fn: str) -> None:
    if not isinstance(module, kinds):
        names = ", ".join(k.__name__ for k in kinds)
        raise TypeError(f"{fn} needs one of {names}, got {type(module).__name__}")


def _restore(y: torch.Tensor, factor: float, offset: torch.Tensor | None, shape: tuple) -> torch.Tensor:
    """``y * F - (F - 1) * offset``, with ``offset`` reshaped to ``shape`` and cast to ``y.dtype``."""
    y = y * factor
    if offset is None or factor == 1.0:
        return y
    return y - ((factor - 1.0) * offset).to(y.dtype).view(shape)


def warp_conv(x: torch.Tensor, conv: nn.Module, factor: float = 32) -> torch.Tensor:
    """``conv(x)`` computed as ``conv(x / F) * F - (F - 1) * conv.bias`` (seed 002, ``warp_conv``).

    Identity: ``conv(x / F) = W x / F + b``, so ``conv(x / F) * F - (F - 1) b = W x + b``.

    Args:
        x: input of ``conv``: ``[N, C_in, *spatial]`` or unbatched ``[C_in, *spatial]``; any float
            dtype that ``conv`` accepts.
        conv: ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d``, with or without bias; not modified.
        factor: ``F``, a power of two >= 1 (int or float).

    Returns:
        ``conv(x)``, same shape and dtype, up to float rounding (the bias cancellation adds about
        ``F * |b| * eps``). ``conv`` itself only sees ``x / F``.

    Raises:
        ValueError: ``factor`` is not a power of two >= 1.
        TypeError: ``conv`` is not one of the supported conv modules.
    """
    f = _check_factor(factor)
    _check_module(conv, _CONVS, "warp_conv")
    y = conv(x / f)
    # Output channels sit just before the k spatial dims, batched or not: broadcast, never repeat.
    return _restore(y, f, conv.bias, (-1, *[1] * len(conv.kernel_size)))


def warp_linear(x: torch.Tensor, linear: nn.Linear, factor: float = 32) -> torch.Tensor:
    """``linear(x)`` computed as ``linear(x / F) * F - (F - 1) * linear.bias``.

    Identity: as :func:`warp_conv`, ``(W x / F + b) F - (F - 1) b = W x + b``.

    Args:
        x: ``[*, in_features]``, any float dtype that ``linear`` accepts.
        linear: ``nn.Linear``, with or without bias; not modified.
        factor: ``F``, a power of two >= 1.

    Returns:
        ``linear(x)``, ``[*, out_features]``, same dtype, up to float rounding.

    Raises:
        ValueError: ``factor`` is not a power of two >= 1.
        TypeError: ``linear`` is not an ``nn.Linear``.
    """
    f = _check_factor(factor)
    _check_module(linear, (nn.Linear,), "warp_linear")
    return _restore(linear(x / f), f, linear.bias, (-1,))


def warp_bn(x: torch.Tensor, bn: nn.Module, factor: float = 32) -> torch.Tensor:
    """``bn(x)`` computed as ``bn(x / F) * F - (F - 1) * shift`` (seed 002, ``warp_bn``).

    An eval-mode BatchNorm is the per-channel affine map ``x * scale + shift`` with
    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``
    (:func:`fp16guard.folding.fold_batchnorm`, computed in float64 and cast once to the output
    dtype), so the :func:`warp_conv` identity applies. ``affine=False`` means gamma = 1, beta = 0.

    Args:
        x: ``[N, C]`` or ``[N, C, *spatial]``, any float dtype that ``bn`` accepts.
        bn: ``nn.BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``) in eval mode with running statistics;
            not modified.
        factor: ``F``, a power of two >= 1.

    Returns:
        ``bn(x)``, same shape and dtype, up to float rounding (the shift cancellation adds about
        ``F * |shift| * eps``).

    Raises:
        ValueError: ``factor`` is not a power of two >= 1; ``bn`` is in training mode or has no
            running statistics (batch statistics of ``x / F`` are not the running ones, so the
            map is not this fixed affine one).
        TypeError: ``bn`` is not a BatchNorm module.
    """
    f = _check_factor(factor)
    _check_module(bn, _BATCHNORMS, "warp_bn")
    if bn.training:
        raise ValueError(f"warp_bn needs {bn!r} in eval mode (call .eval()): in training mode it "
                         "normalizes with batch statistics, not a fixed affine map")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"warp_bn needs running statistics, but {bn!r} has none "
                         "(track_running_stats=False normalizes with batch statistics)")
    c = bn.num_features
    gamma = bn.weight if bn.weight is not None else torch.ones(c)
    beta = bn.bias if bn.bias is not None else torch.zeros(c)
    _, shift = fold_batchnorm(*(t.detach().cpu().double().numpy() for t in
                                (gamma, beta, bn.running_mean, bn.running_var)), bn.eps)
    y = bn(x / f)
    shift = torch.from_numpy(shift).to(y.device)  # float64 until _restore casts (F - 1) * shift once
    return _restore(y, f, shift, (-1, *[1] * (y.dim() - 2)))


def _scaled(module: nn.Module, in_exponent: int, out_exponent: int, kinds: tuple, fn: str) -> nn.Module:
    """Deep copy of ``module`` with ``weight * 2**(in - out)`` and ``bias * 2**-out``."""
    _check_module(module, kinds, fn)
    for name, e in (("in_exponent", in_exponent), ("out_exponent", out_exponent)):
        if not isinstance(e, numbers.Integral) or isinstance(e, bool):
            raise ValueError(f"{fn}: {name} must be an integer, got {e!r}")
    out = copy.deepcopy(module)
    with torch.no_grad():
        for p, e in ((out.weight, in_exponent - out_exponent), (out.bias, -out_exponent)):
            if p is None:
                continue
            finite = torch.isfinite(p)
            p.mul_(pow2(e))
            if (finite & ~torch.isfinite(p)).any():
                raise ValueError(f"{fn}: scaling {type(module).__name__} parameters by 2**{int(e)} "
                                 f"overflows {p.dtype}")
    return out


def scaled_conv(conv: nn.Module, in_exponent: int, out_exponent: int) -> nn.Module:
    """A copy of ``conv`` that maps inputs stored with ``in_exponent`` to outputs with ``out_exponent``.

    ``W' = W * 2**(in_exponent - out_exponent)``, ``b' = b * 2**-out_exponent``, so
    ``scaled_conv(conv, a, b)(x * 2**-a) == conv(x) * 2**-b`` (convention of
    :mod:`fp16guard.folding`). Power-of-two scaling is exact, so without overflow or subnormals this
    holds bitwise for the same kernel. ConvTranspose is linear in ``W`` too: same scaling.

    Args:
        conv: ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose1d/2d/3d``, with or without bias, any dtype;
            not modified (weights ``[C_out, C_in/groups, *k]``, transpose ``[C_in, C_out/groups, *k]``).
        in_exponent, out_exponent: integer scale exponents.

    Returns:
        A new module of the same type, shapes and dtype.

    Raises:
        TypeError: ``conv`` is not a supported conv module.
        ValueError: an exponent is not an integer, or the scaled parameters overflow their dtype.
    """
    return _scaled(conv, in_exponent, out_exponent, _CONVS, "scaled_conv")


def scaled_linear(linear: nn.Linear, in_exponent: int, out_exponent: int) -> nn.Linear:
    """:func:`scaled_conv` for ``nn.Linear`` (weight ``[out, in]``, bias ``[out]``).

    ``scaled_linear(linear, a, b)(x * 2**-a) == linear(x) * 2**-b``; same errors as
    :func:`scaled_conv`. Returns a new module; ``linear`` is not modified.
    """
    return _scaled(linear, in_exponent, out_exponent, (nn.Linear,), "scaled_linear")
