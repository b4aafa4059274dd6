"""fp16guard: find and fix FP16 overflow in neural networks bound for TensorRT.

Public API:

* :class:`FInspect`: forward hooks that record every module's activation range (PyTorch).
* :func:`inspect_onnx`: the same report for an ``.onnx`` file, from an FP32 ONNX Runtime run.
* :func:`check_module`: static range check of weights, buffers and folded BatchNorms.
* :class:`InspectionReport`: what both inspectors return (``to_json``, ``findings``, ...).
* :func:`bisect`: the first module whose FP16 execution breaks the output (a
  :class:`~fp16guard.bisect.BisectResult`). The function shadows the module's name as an
  attribute; ``from fp16guard.bisect import BisectResult`` still reaches the module.
* :func:`fix`: rewrite a model so it runs entirely in FP16 (BatchNorm folding, power-of-two scale
  regions folded into the weights), as a typed FP16 ONNX, verified; returns ``(fixed, plan)``.
* :func:`calibrate`: only the :class:`RewritePlan` (``fp16guard.plan/1``).
* :func:`warp_conv`, :func:`warp_bn`, :func:`warp_linear`: the seed's functional scale forms.
"""

from .bisect import BisectResult
from .bisect import bisect as _bisect
from .fixing import calibrate, fix
from .fp16 import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, headroom_bits
from .inspector import FInspect
from .onnx_inspector import inspect_onnx
from .plan import RewritePlan
from .report import InspectionReport
from .static_check import check_module, fold_batchnorm
from .stats import RangeStats
from .warp import warp_bn, warp_conv, warp_linear

bisect = _bisect

__version__ = "0.1.0"

__all__ = [
    "BisectResult",
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
