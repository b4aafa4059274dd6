"""Stage 3, fix: rewrite a model so it runs entirely in FP16, exact in real arithmetic.

* :mod:`~fp16guard.fixing.pipeline`: the one pipeline, calibrate -> plan -> apply -> convert ->
  verify (:func:`fix`, :func:`fix_model`, :func:`calibrate`, :class:`FixResult`); its steps are
  :mod:`~fp16guard.fixing.calibration`, :mod:`~fp16guard.fixing.apply` (apply and verify) and
  :mod:`~fp16guard.fixing.delivery` (what is written), its result :mod:`~fp16guard.fixing.result`.
* :mod:`~fp16guard.fixing.targets`: the :class:`FixTarget` protocol and its ONNX and PyTorch adapters.
* :mod:`~fp16guard.fixing.solver`: the power-of-two scale solver both adapters feed (what it works
  on: :mod:`~fp16guard.fixing.solver_model`; a solution completed: :mod:`~fp16guard.fixing.solver_completion`).
* :mod:`~fp16guard.fixing.onnx_pass`, :mod:`~fp16guard.fixing.torch_pass`: the graph passes (BatchNorm
  folding, exponents folded into weights, typed FP16 programs), each driving modules of one job
  (``onnx_edit``/``torch_edit``, ``*_fold``, ``*_roles``, ``*_exponents``, ``onnx_masks``, ``torch_typed``);
  :class:`~fp16guard.fixing.notes.RewriteNote` is what either writes in the report.
* :mod:`~fp16guard.fixing.module_scales`: a PyTorch plan per module, for the mmdeploy rewriters.
* :mod:`~fp16guard.fixing.warp`: the seed's functional forms (``warp_conv``, ``warp_bn``).
* :func:`print_plan`, :func:`print_fix`, :func:`print_verification`: terminal rendering.
"""

from fp16guard.fixing.pipeline import (
                                    FixResult,
                                    apply_plan,
                                    calibrate,
                                    calibrate_target,
                                    fix,
                                    fix_model,
                                    fix_target,
                                    make_target,
                                    verify,
)
from fp16guard.fixing.render import print_fix, print_plan, print_verification
from fp16guard.fixing.targets import FixTarget, OnnxFixTarget, TorchFixTarget
from fp16guard.fixing.warp import warp_bn, warp_conv, warp_linear

__all__ = ["FixResult", "FixTarget", "OnnxFixTarget", "TorchFixTarget", "apply_plan", "calibrate", "calibrate_target",
           "fix", "fix_model", "fix_target", "make_target", "print_fix", "print_plan", "print_verification", "verify",
           "warp_bn", "warp_conv", "warp_linear"]
