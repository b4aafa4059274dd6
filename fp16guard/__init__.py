"""fp16guard: find and fix FP16 overflow in neural networks bound for TensorRT.

Three stages over one shared layer (see the README's Layout section):

* :mod:`fp16guard.inspect`: :class:`FInspect` (forward hooks that record every module's
  activation range), :func:`inspect_onnx` (the same report for an ``.onnx`` file),
  :func:`check_module` (static range check of weights, buffers and folded BatchNorms),
  :class:`InspectionReport` (what they return).
* :mod:`fp16guard.bisection`: :func:`bisect`, the first module whose FP16 execution breaks the
  output (a :class:`BisectResult`).
* :mod:`fp16guard.fixing`: :func:`fix` rewrites a model so it runs entirely in FP16 (BatchNorm
  folding, power-of-two scale regions folded into the weights), as a typed FP16 ONNX or a
  ``.pt2`` program, verified; returns a :class:`FixResult` that unpacks as ``fixed, plan`` and
  holds the verification (``result.verification``). :func:`calibrate` gives only the
  :class:`RewritePlan` (``fp16guard.plan/1``). :func:`warp_conv`, :func:`warp_bn`,
  :func:`warp_linear`: the seed's functional scale forms.
  The stage packages are named for the stage (``fp16guard.bisection``, ``fp16guard.fixing``) so
  the functions ``fp16guard.bisect`` and ``fp16guard.fix`` shadow nothing.

Results speak for themselves: ``print(x)`` of an :class:`InspectionReport`, a
:class:`BisectResult` or a :class:`FixResult` gives a few lines (verdict, peak or offender, next
step), ``rich.print(x)`` (or a notebook's rich console) the full report the command line prints.

Errors: every error raised on purpose derives from :class:`Fp16GuardError`
(:mod:`fp16guard.errors`).
"""

import importlib

from fp16guard.errors import Fp16GuardError

__version__ = "0.1.0"

#: Public names, imported on first use (PEP 562) so ``import fp16guard.cli`` (``fp16guard --help``)
#: does not import torch, onnx and onnxruntime: name -> (module, attribute).
_LAZY = {
    "BisectResult": ("fp16guard.bisection", "BisectResult"),
    "bisect": ("fp16guard.bisection", "bisect"),
    "calibrate": ("fp16guard.fixing", "calibrate"),
    "fix": ("fp16guard.fixing", "fix"),
    "FixResult": ("fp16guard.fixing", "FixResult"),
    "warp_bn": ("fp16guard.fixing", "warp_bn"),
    "warp_conv": ("fp16guard.fixing", "warp_conv"),
    "warp_linear": ("fp16guard.fixing", "warp_linear"),
    "FP16_MAX": ("fp16guard.fp16", "FP16_MAX"),
    "FP16_MIN_NORMAL": ("fp16guard.fp16", "FP16_MIN_NORMAL"),
    "FP16_MIN_SUBNORMAL": ("fp16guard.fp16", "FP16_MIN_SUBNORMAL"),
    "headroom_bits": ("fp16guard.fp16", "headroom_bits"),
    "FInspect": ("fp16guard.inspect", "FInspect"),
    "InspectionReport": ("fp16guard.inspect", "InspectionReport"),
    "check_module": ("fp16guard.inspect", "check_module"),
    "fold_batchnorm": ("fp16guard.inspect", "fold_batchnorm"),
    "inspect_onnx": ("fp16guard.inspect", "inspect_onnx"),
    "RewritePlan": ("fp16guard.plan", "RewritePlan"),
    "RangeStats": ("fp16guard.stats", "RangeStats"),
}


def __getattr__(name: str):
    """Import a public name on first use (module ``__getattr__``, PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'fp16guard' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))



__all__ = [
    "BisectResult",
    "Fp16GuardError",
    "bisect",
    "calibrate",
    "fix",
    "FixResult",
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
