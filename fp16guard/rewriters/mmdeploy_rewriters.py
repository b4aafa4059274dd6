"""The mmdeploy 1.x FUNCTION_REWRITERs (backend ``tensorrt``); importing this module registers them.

Each rewriter keeps the original signature, takes its context from
``FUNCTION_REWRITER.get_context()``, and decides from the plan in the deploy config
(``ctx.cfg.fp16guard.plan``: a path or a plan document), never from the traced values: the same
export twice gives the same graph, and nothing outlives the ``RewriterContext``.
"""

from __future__ import annotations

from pathlib import Path

from mmdeploy.core import FUNCTION_REWRITER

from ..module_scales import ScaleTable
from ..plan import PlanError, RewritePlan
from .blocks import basic_block_forward, fpem_ffm_forward

#: The deploy-config key that names the plan: ``fp16guard = dict(plan='plan.json')``.
CONFIG_KEY = "fp16guard"


def plan_table(cfg) -> ScaleTable | None:
    """The module scales of the plan the deploy config names, or None without ``fp16guard.plan``.

    Raises:
        PlanError: the plan is missing, malformed, or has no module scales (a plan for an ONNX
            graph: calibrate the PyTorch model).
    """
    section = cfg.get(CONFIG_KEY) if cfg is not None and hasattr(cfg, "get") else None
    plan = section.get("plan") if section else None
    if plan is None:
        return None
    plan = RewritePlan.load(plan) if isinstance(plan, (str, Path)) else RewritePlan.from_json(dict(plan))
    if plan.framework != "torch" or not plan.modules:
        raise PlanError(f"the plan for {plan.source} has no module scales; calibrate the PyTorch model "
                        f"(fp16guard calibrate --deploy-cfg ... or fp16guard.calibrate(model, ...))")
    return ScaleTable.from_plan(plan)


@FUNCTION_REWRITER.register_rewriter(func_name="mmdet.models.backbones.resnet.BasicBlock.forward",
                                     backend="tensorrt")
def basic_block__forward__tensorrt(self, x):
    """``BasicBlock.forward`` with the plan's exponents (:func:`~fp16guard.rewriters.blocks.basic_block_forward`)."""
    ctx = FUNCTION_REWRITER.get_context()
    table = plan_table(ctx.cfg)
    if table is None or (table.find(self) is None and table.find(self.conv1) is None):
        return ctx.origin_func(self, x)
    return basic_block_forward(self, x, table)


@FUNCTION_REWRITER.register_rewriter(func_name="mmocr.models.textdet.necks.fpem_ffm.FPEM_FFM.forward",
                                     backend="tensorrt")
def fpem_ffm__forward__tensorrt(self, x):
    """``FPEM_FFM.forward`` with the plan's exponents (:func:`~fp16guard.rewriters.blocks.fpem_ffm_forward`)."""
    ctx = FUNCTION_REWRITER.get_context()
    table = plan_table(ctx.cfg)
    reduce = (self.reduce_conv_c2, self.reduce_conv_c3, self.reduce_conv_c4, self.reduce_conv_c5)
    if table is None or not any(table.find(r) for r in (self, *reduce)):
        return ctx.origin_func(self, x)
    return fpem_ffm_forward(self, x, table)
