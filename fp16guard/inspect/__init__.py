"""Stage 1, inspect: measure every activation against FP16's range.

* :class:`FInspect` (:mod:`~fp16guard.inspect.hooks`): forward hooks on a PyTorch module, with
  statistics kept on the device (:mod:`~fp16guard.inspect.triton_stats` on CUDA);
  :func:`run_torch` runs a model on inputs under it.
* :func:`inspect_onnx` (:mod:`~fp16guard.inspect.onnx_inspector`): the same report for an ONNX
  file, from an FP32 ONNX Runtime run of every value.
* :func:`check_module` (:mod:`~fp16guard.inspect.static_check`): weights, buffers and folded
  BatchNorms against FP16's range, without running anything.
* :class:`InspectionReport` (:mod:`~fp16guard.inspect.report`): what all of them return, with
  :func:`print_report` and :func:`plot_report` to show it.
"""

from fp16guard.inspect import render
from fp16guard.inspect.hooks import FInspect, run_torch
from fp16guard.inspect.onnx_inspector import inspect_onnx
from fp16guard.inspect.plot import plot_report
from fp16guard.inspect.render import print_report
from fp16guard.inspect.report import InspectionReport
from fp16guard.inspect.static_check import check_module, fold_batchnorm

# How a report shows itself, kept with its renderer: ``print(report)`` gives a few lines (what ran,
# the verdict by cause, the peak, the next step), ``rich.print(report)`` the full report.
InspectionReport.__str__ = render.summary  # type: ignore[method-assign]
InspectionReport.__rich_console__ = render.rich_console  # type: ignore[attr-defined]

__all__ = ["FInspect", "InspectionReport", "check_module", "fold_batchnorm", "inspect_onnx", "plot_report",
           "print_report", "run_torch"]
