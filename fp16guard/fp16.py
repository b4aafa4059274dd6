"""IEEE 754 binary16 (FP16) range facts and the pure helpers built on them.

Every threshold fp16guard uses lives here, so the rest of the package never spells a magic number.
Source: IEEE 754-2008, table 3.5 (binary16: 5 exponent bits, 10 fraction bits, emax = 15).
"""

from __future__ import annotations

import math

#: Largest finite FP16 magnitude, (2 - 2**-10) * 2**15. Values in (65504, 65520) still round to
#: 65504 under round-to-nearest-even; fp16guard flags anything above 65504 (conservative).
FP16_MAX = 65504.0

#: Smallest positive normal FP16 magnitude, 2**-14 (about 6.1e-5). Below it values are subnormal
#: and lose precision (fewer than 11 significant bits).
FP16_MIN_NORMAL = 2.0**-14

#: Smallest positive subnormal FP16 magnitude, 2**-24 (about 6.0e-8). fp16guard counts a nonzero
#: value below it as flushed to zero (strictly, values below 2**-25 round to zero and values in
#: [2**-25, 2**-24) round up to 2**-24; counting the whole interval is the conservative choice).
FP16_MIN_SUBNORMAL = 2.0**-24

#: Largest finite BF16 magnitude, (2 - 2**-7) * 2**127 (about 3.39e38): bfloat16 is the upper half
#: of an IEEE binary32 (8 exponent bits, 7 fraction bits stored), so it has FP32's range at 8
#: significant bits. FP32's largest values (``finfo(float32).min`` masks, 3.4028e38) round to inf.
BF16_MAX = (2.0 - 2.0**-7) * 2.0**127

#: Smallest positive subnormal BF16 magnitude, 2**-133 (about 9.2e-41); half of it rounds to zero.
BF16_MIN_SUBNORMAL = 2.0**-133

#: Default bound on the relative L2 error of an FP16 output against FP32 (bisect: a cut is bad above
#: it; fix: a fixed model is refused above it). Calibrated on the bundled examples (the trial tables of
#: ``fp16guard bisect --example NAME``): ordinary FP16 rounding gives up to 0.017 on ppocr-det
#: (emulate; 0.024 with real FP16 kernels on ONNX Runtime's CUDA EP, H100) and 1.3e-4 on crepe-full,
#: while the first broken cuts give 1.0 (ppocr-det) and 0.215 (crepe-full). 0.07 sits about 3x above
#: the worst rounding and 3x below the smallest failure. Pass ``tolerance`` (``--tolerance``) or a
#: task metric for your model.
DEFAULT_TOLERANCE = 0.07


def headroom_bits(amax: float) -> float:
    """Headroom of a tensor in bits: ``log2(FP16_MAX / amax)``.

    Args:
        amax: largest finite magnitude of the tensor (any unit; compared with 65504).

    Returns:
        Positive when the tensor fits FP16 with room to spare (``3.0`` means it could grow 8x),
        negative when it overflows (``-1.0`` means it is twice too large), ``inf`` for an all-zero
        tensor and ``-inf`` when ``amax`` is itself inf or NaN.
    """
    if amax != amax or math.isinf(amax):
        return -math.inf
    if amax <= 0.0:
        return math.inf
    return math.log2(FP16_MAX / amax)


def fits_fp16(amax: float) -> bool:
    """True when a finite magnitude ``amax`` is representable in FP16 without overflow."""
    return amax == amax and amax <= FP16_MAX
