"""Pure math of the rewrites: BatchNorm folding and power-of-two rescaling of weights.

Arrays in, arrays out, no graphs: the ONNX rewriter (:mod:`fp16guard.fixing.onnx_pass`), the PyTorch
rewriter (:mod:`fp16guard.fixing.torch_pass`) and the TensorRT helpers share these functions, so the
three paths cannot drift apart. Everything is computed in float64 and returned in float64; callers
cast to their storage type (FP32 in the FP32 graph, FP16 when the graph is converted).

Conventions. A *scale exponent* ``s`` means a tensor is stored as ``true_value * 2**-s``: ``s = 3``
stores one eighth of the true value. A linear layer ``y = W x + b`` whose input is stored with
exponent ``s_in`` and whose output must be stored with exponent ``s_out`` computes the stored
output exactly with ``W' = W * 2**(s_in - s_out)`` and ``b' = b * 2**-s_out``, because
``W' (x 2**-s_in) + b' = (W x + b) 2**-s_out``. Multiplying by a power of two is exact in binary
floating point (no rounding) as long as nothing overflows or becomes subnormal, which is why
fp16guard only uses factors ``F = 2**k``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from fp16guard.fp16 import FP16_MIN_NORMAL


def fold_batchnorm(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                   eps: float) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm as a per-channel affine map ``y = x * scale + shift``, in float64.

    Args:
        gamma, beta, mean, var: arrays of shape ``[C]`` (any float dtype).
        eps: the BatchNorm epsilon.

    Returns:
        ``(scale, shift)``, float64 arrays of shape ``[C]``:
        ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``
        (seed 000; PyTorch ``torch.nn.utils.fusion.fuse_conv_bn_weights`` with no conv).
    """
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def fold_affine_into_weights(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray,
                             shift: np.ndarray, *, channel_axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``y = conv(x) * scale + shift`` (per output channel) into the conv's own weights.

    ``w' = w * scale`` along the output-channel axis and ``b' = b * scale + shift``: with the
    BatchNorm's ``(scale, shift)`` from :func:`fold_batchnorm` this is seed 000's
    ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

    Args:
        weight: conv/linear weight; output channels along ``channel_axis`` (0 for ``Conv``,
            ``Gemm``/``nn.Linear``; 1 for ``ConvTranspose`` with one group).
        bias: ``[C_out]`` or None (zero).
        scale, shift: ``[C_out]``.
        channel_axis: see ``weight``.

    Returns:
        ``(weight', bias')`` in float64, shapes of ``weight`` and ``[C_out]``.

    Raises:
        ValueError: ``scale`` does not have one value per output channel.
    """
    w = np.asarray(weight, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    c = w.shape[channel_axis]
    if scale.size != c or shift.size != c:
        raise ValueError(f"{scale.size} BatchNorm channels cannot fold into a weight with {c} output "
                         f"channels (axis {channel_axis} of shape {list(w.shape)})")
    shape = [1] * w.ndim
    shape[channel_axis] = c
    b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    return w * scale.reshape(shape), b * scale + shift


def exponent_for(amax: float, target_log2: int) -> int:
    """The smallest ``k >= 0`` with ``amax * 2**-k <= 2**target_log2``.

    Args:
        amax: largest magnitude seen in calibration (finite, >= 0).
        target_log2: the headroom target, e.g. 13 keeps stored magnitudes at or below 8192,
            three bits (8x) below FP16's 65504.

    Raises:
        ValueError: ``amax`` is inf or NaN (nothing can scale it into range).
    """
    if not math.isfinite(amax):
        raise ValueError(f"amax {amax} is not finite: no power-of-two factor brings it into FP16 range")
    if amax <= 2.0 ** target_log2:
        return 0
    m, e = math.frexp(amax / 2.0 ** target_log2)  # amax / 2^t = m * 2^e, 0.5 <= m < 1
    return e if m > 0.5 else e - 1


def constant_range(value) -> tuple[float, float]:
    """``(amax, amin)`` of a constant an op folds exponents into
    (:class:`~fp16guard.fixing.solver_model.ScaledConstant`):
    its largest finite magnitude, and the RMS of its nonzero elements FP16 holds (``|c| > 2**-25``;
    0 when there are none). For a scalar, ``amin`` is the scalar; for a weight, its typical element:
    a weight of FP16 subnormals is off by up to ``2**-25`` each, which relative to a dot product
    of typical weights is ``2**-25 / rms``, FP16's own ``2**-11`` when ``rms = 2**-14``.

    Args:
        value: a number or an array (any float dtype).
    """
    v = np.asarray(value)
    if v.dtype not in (np.float16, np.float32, np.float64):
        v = v.astype(np.float64)
    a = np.abs(v).reshape(-1)  # in its own dtype: the same comparisons, the same elements held
    if a.size and not np.isfinite(a.max()):
        a = a[np.isfinite(a)]
    held = a[a > 2.0 ** -25].astype(np.float64)
    return (float(a.max()) if a.size else 0.0), (float(np.sqrt(np.mean(held ** 2))) if held.size else 0.0)


def pow2(exponent: int) -> float:
    """``2.0 ** exponent`` as a Python float (exact)."""
    return math.ldexp(1.0, int(exponent))


def simple_fraction(c: float) -> Fraction | None:
    """``c`` as a nonzero fraction with denominator at most 4 (2, 0.5, -1, 1.5), else None: the
    exponents whose powers of two stay powers of two with an integer exponent after rounding."""
    if not math.isfinite(c):
        return None
    f = Fraction(c).limit_denominator(4)
    return f if f != 0 and abs(float(f) - c) <= 1e-12 * max(1.0, abs(c)) else None


def fp16_exact_steps(exponent: int) -> list[int]:
    """Split ``2**exponent`` into factors that are each a normal FP16 number: exponents in
    [-14, 15] (2**15 = 32768 <= 65504; 2**-14 is FP16's smallest normal), their sum ``exponent``.

    A rescale by ``2**20`` stored as one FP16 constant would be inf, by ``2**-25`` zero; as the
    chain ``2**15 * 2**5`` every factor is exact in FP16 and the product is exact in any precision.

    Returns:
        The step exponents, largest magnitude first; ``[]`` for 0.
    """
    steps, left = [], int(exponent)
    while left:
        step = max(-14, min(15, left))
        steps.append(step)
        left -= step
    return steps


def keeps_fp16_precision(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether a fold keeps FP16 weights out of the subnormal range.

    The count of nonzero ``|w| < 2**-14`` may not grow by more than 1% of the weights: a
    BatchNorm with a running variance of 1e8 multiplies the conv's weights by 1e-4, which FP16
    holds with 1 to 3 significant bits.

    Args:
        before, after: the weight before and after the fold (same size, any float dtype).
    """
    def sub(a):
        """Count of nonzero elements below the smallest FP16 normal."""
        a = np.abs(np.asarray(a, dtype=np.float64))
        return int(np.count_nonzero((a > 0) & (a < FP16_MIN_NORMAL)))
    return sub(after) <= sub(before) + 0.01 * np.asarray(before).size


def raise_small(values: np.ndarray, floor: float) -> tuple[np.ndarray, int]:
    """Raise every nonzero ``|x| < floor`` to ``sign(x) * floor`` (the plan's consented underflow fix).

    Returns:
        ``(values', count)``: same dtype as ``values``, and how many elements were raised.
    """
    v = np.asarray(values)
    small = (v != 0) & (np.abs(v) < floor)
    return np.where(small, np.sign(v) * floor, v).astype(v.dtype), int(small.sum())
