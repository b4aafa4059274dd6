"""The mmdeploy 1.x FUNCTION_REWRITERs (backend ``tensorrt``); importing this module registers them.

Each rewriter keeps the original signature, takes its context from
``FUNCTION_REWRITER.get_context()``, and decides from the plan in the deploy config
(``ctx.cfg.fp16guard.plan``: a path or a plan document), never from the traced values: the same
export twice gives the same graph, and nothing outlives the ``RewriterContext``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from mmdeploy.core import FUNCTION_REWRITER

# mmengine.model registers a torch.fx.wrap at import. If that import first happens inside a
# RewriterContext (the context imports every rewritten function's module), mmdeploy 1.3.1's exit
# pops the new entry by list index from what torch 2.x keeps as a dict: KeyError: -1. Importing it
# here, before any context, keeps the count unchanged across the context.
importlib.import_module("mmengine.model")

from fp16guard.errors import PlanError
from fp16guard.fixing.module_scales import ScaleTable
from fp16guard.plan import RewritePlan
from fp16guard.rewriters.blocks import (
    basic_block_forward,
    batchnorm_forward,
    conv_forward,
    fpem_ffm_forward,
    layernorm_forward,
    linear_forward,
    multihead_attention_forward,
)

#: The deploy-config key that names the plan: ``fp16guard = dict(plan='plan.json')``.
CONFIG_KEY = "fp16guard"


def _table(ctx) -> ScaleTable | None:
    """The plan's table for this rewriter context, read once per context (kept on the context
    object, which ends with the ``RewriterContext``)."""
    if not hasattr(ctx, "_fp16guard_table"):
        ctx._fp16guard_table = plan_table(ctx.cfg)
    return ctx._fp16guard_table


def _exponents(ctx, module) -> tuple[int, int] | None:
    """``(e_in, e_out)`` of ``module`` in the context's plan, or None."""
    entry = _entry(ctx, module)
    return (entry.input_exponent, entry.output_exponent) if entry else None


def _entry(ctx, module):
    """``module``'s :class:`~fp16guard.fixing.module_scales.ModuleScale` in the context's plan, or None."""
    table = _table(ctx)
    return table.find(module) if table is not None else None


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
                        f"(fp16guard.calibrate(model, images))")
    if plan.rescale_ops or plan.unfixable:
        raise PlanError(f"the plan for {plan.source} needs explicit rescales or FP32 nodes, which module "
                        f"rewriters cannot insert; fix the exported ONNX with `fp16guard fix` instead")
    return ScaleTable.from_plan(plan)


@FUNCTION_REWRITER.register_rewriter(func_name="mmdet.models.backbones.resnet.BasicBlock.forward",
                                     backend="tensorrt")
def basic_block__forward__tensorrt(self, x):
    """``BasicBlock.forward`` with the plan's exponents (:func:`~fp16guard.rewriters.blocks.basic_block_forward`)."""
    ctx = FUNCTION_REWRITER.get_context()
    table = _table(ctx)
    if table is None or (table.find(self) is None and table.find(self.conv1) is None):
        return ctx.origin_func(self, x)
    return basic_block_forward(self, x, table)


@FUNCTION_REWRITER.register_rewriter(func_name="mmocr.models.textdet.necks.fpem_ffm.FPEM_FFM.forward",
                                     backend="tensorrt")
def fpem_ffm__forward__tensorrt(self, x):
    """``FPEM_FFM.forward`` with the plan's exponents (:func:`~fp16guard.rewriters.blocks.fpem_ffm_forward`)."""
    ctx = FUNCTION_REWRITER.get_context()
    table = _table(ctx)
    reduce = (self.reduce_conv_c2, self.reduce_conv_c3, self.reduce_conv_c4, self.reduce_conv_c5)
    if table is None or not any(table.find(r) for r in (self, *reduce)):
        return ctx.origin_func(self, x)
    return fpem_ffm_forward(self, x, table)


# The generic plan rewriter: every Conv, Linear and BatchNorm the plan lists, in any codebase. A
# region whose boundaries are such modules (and whose inside is scale-equivariant: ReLU, pooling,
# resize, concatenation, residual sums) is reproduced exactly; the modules keep their identity
# (no wrapper), so fingerprints and the block rewriters above are unaffected.

@FUNCTION_REWRITER.register_rewriter(func_name="torch.nn.Conv1d.forward", backend="tensorrt")
@FUNCTION_REWRITER.register_rewriter(func_name="torch.nn.Conv2d.forward", backend="tensorrt")
@FUNCTION_REWRITER.register_rewriter(func_name="torch.nn.Conv3d.forward", backend="tensorrt")
def conv__forward__tensorrt(self, input):
    """``ConvNd.forward`` with the plan's exponents (:func:`~fp16guard.rewriters.blocks.conv_forward`)."""
    ctx = FUNCTION_REWRITER.get_context()
    e = _exponents(ctx, self)
    return ctx.origin_func(self, input) if e is None else conv_forward(self, input, *e)


@FUNCTION_REWRITER.register_rewriter(func_name="torch.nn.Linear.forward", backend="tensorrt")
def linear__forward__tensorrt(self, input):
    """``Linear.forward`` with the plan's exponents (:func:`~fp16guard.rewriters.blocks.linear_forward`)."""
    ctx = FUNCTION_REWRITER.get_context()
    e = _exponents(ctx, self)
    return ctx.origin_func(self, input) if e is None else linear_forward(self, input, *e)


@FUNCTION_REWRITER.register_rewriter(func_name="torch.nn.modules.batchnorm._BatchNorm.forward", backend="tensorrt")
def batchnorm__forward__tensorrt(self, input):
    """``_BatchNorm.forward`` with the plan's exponents (:func:`~fp16guard.rewriters.blocks.batchnorm_forward`)."""
    ctx = FUNCTION_REWRITER.get_context()
    e = _exponents(ctx, self)
    return ctx.origin_func(self, input) if e is None else batchnorm_forward(self, input, *e)


@FUNCTION_REWRITER.register_rewriter(func_name="torch.nn.LayerNorm.forward", backend="tensorrt")
def layernorm__forward__tensorrt(self, input):
    """``LayerNorm.forward`` with the plan's exponents (:func:`~fp16guard.rewriters.blocks.layernorm_forward`)."""
    ctx = FUNCTION_REWRITER.get_context()
    entry = _entry(ctx, self)
    if entry is None:
        return ctx.origin_func(self, input)
    return layernorm_forward(self, input, entry.input_exponent, entry.output_exponent, entry.input_amax)


@FUNCTION_REWRITER.register_rewriter(func_name="torch.nn.MultiheadAttention.forward", backend="tensorrt")
def multihead_attention__forward__tensorrt(self, query, key, value, *args, **kwargs):
    """``MultiheadAttention.forward`` with the plan's exponents
    (:func:`~fp16guard.rewriters.blocks.multihead_attention_forward`): the transformer layers of
    mmdet's DETR family (``mmcv.cnn.bricks.transformer.MultiheadAttention`` wraps this module)."""
    ctx = FUNCTION_REWRITER.get_context()
    entry = _entry(ctx, self)
    if entry is None:
        return ctx.origin_func(self, query, key, value, *args, **kwargs)
    return multihead_attention_forward(self, query, key, value, entry.input_exponent, entry.output_exponent,
                                       *args, inner_exponent=entry.inner_exponent, **kwargs)


@FUNCTION_REWRITER.register_rewriter(func_name="torch.onnx.export", backend="tensorrt")
def onnx_export__tensorrt(*args, **kwargs):
    """``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``) unless the caller
    chose: mmdeploy 1.3.1's ``apis.onnx.export`` calls it without ``dynamo``, torch >= 2.9
    defaults to the dynamo exporter, and that one breaks mmdeploy's context exit."""
    ctx = FUNCTION_REWRITER.get_context()
    kwargs.setdefault("dynamo", False)
    return ctx.origin_func(*args, **kwargs)
