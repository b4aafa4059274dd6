"""fp16guard: find and fix FP16 overflow in neural networks bound for TensorRT.

Public API:

* :class:`FInspect`: forward hooks that record every module's activation range (PyTorch).
* :func:`inspect_onnx`: the same report for an ``.onnx`` file, from an FP32 ONNX Runtime run.
* :func:`check_module`: static range check of weights, buffers and folded BatchNorms.
* :class:`InspectionReport`: what both inspectors return (``to_json``, ``findings``, ...).
* :func:`bisect`: the first module whose FP16 execution breaks the output (a
  :class:`~fp16guard.bisect.BisectResult`). The function shadows the module's name as an
  attribute; ``from fp16guard.bisect import BisectResult`` still reaches the module.
"""

from .bisect import BisectResult
from .bisect import bisect as _bisect
from .fp16 import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, headroom_bits
from .inspector import FInspect
from .onnx_inspector import inspect_onnx
from .report import InspectionReport
from .static_check import check_module, fold_batchnorm
from .stats import RangeStats

bisect = _bisect

__version__ = "0.1.0"

__all__ = [
    "BisectResult",
    "bisect",
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
