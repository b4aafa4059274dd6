"""fp16guard: find and fix FP16 overflow in neural networks bound for TensorRT.

Three stages over one shared layer (see the README's Layout section):

* :mod:`fp16guard.inspect`: :class:`FInspect` (forward hooks that record every module's
  activation range), :func:`inspect_onnx` (the same report for an ``.onnx`` file),
  :func:`check_module` (static range check of weights, buffers and folded BatchNorms),
  :class:`InspectionReport` (what they return).
* :mod:`fp16guard.bisect`: :func:`bisect`, the first module whose FP16 execution breaks the
  output (a :class:`BisectResult`). The function shadows the package's name as an attribute of
  ``fp16guard``; ``from fp16guard.bisect import BisectResult`` still reaches the package.
* :mod:`fp16guard.fix`: :func:`fix` rewrites a model so it runs entirely in FP16 (BatchNorm
  folding, power-of-two scale regions folded into the weights), as a typed FP16 ONNX or a
  ``.pt2`` program, verified; returns ``(fixed, plan)``. :func:`calibrate` gives only the
  :class:`RewritePlan` (``fp16guard.plan/1``). :func:`warp_conv`, :func:`warp_bn`,
  :func:`warp_linear`: the seed's functional scale forms. ``fp16guard.fix`` is the function
  here; the package is ``import fp16guard.fix.pipeline`` and its siblings.

Errors: every error raised on purpose derives from :class:`Fp16GuardError`
(:mod:`fp16guard.errors`).
"""

from fp16guard.bisect import BisectResult
from fp16guard.bisect import bisect as _bisect
from fp16guard.errors import Fp16GuardError
from fp16guard.fix import calibrate as _calibrate
from fp16guard.fix import fix as _fix
from fp16guard.fix import warp_bn, warp_conv, warp_linear
from fp16guard.fp16 import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, headroom_bits
from fp16guard.inspect import FInspect, InspectionReport, check_module, fold_batchnorm, inspect_onnx
from fp16guard.plan import RewritePlan
from fp16guard.stats import RangeStats

bisect = _bisect
fix = _fix
calibrate = _calibrate

__version__ = "0.1.0"

__all__ = [
    "BisectResult",
    "Fp16GuardError",
    "bisect",
    "calibrate",
    "fix",
    "RewritePlan",
    "warp_bn",
    "warp_conv",
    "warp_linear",
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "FP16_MIN_SUBNORMAL",
    "FInspect",
    "InspectionReport",
    "RangeStats",
    "check_module",
    "fold_batchnorm",
    "headroom_bits",
    "inspect_onnx",
]
