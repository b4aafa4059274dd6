"""Static range check: weights, buffers, ONNX initializers and ``Constant`` nodes, no inference.

Two kinds of findings (:class:`fp16guard.inspect.report.StaticFinding`):

* per tensor: values beyond 65504 (``overflow``), inf/NaN (``nonfinite``), nonzero values that FP16
  flushes to zero (``flush_to_zero``, reported when >= 1% of the tensor or the tensor is a small
  constant such as an epsilon);
* per BatchNorm (``bn_fold``): the folded affine form (seed 000, and PyTorch's
  ``torch.nn.utils.fusion.fuse_conv_bn_weights``)::

      scale = gamma / sqrt(running_var + eps)
      shift = beta - running_mean * scale

  computed in float64. A running variance beyond 65504 is fatal when the model is cast to FP16
  before BN is folded (it becomes inf and the scale 0) and harmless when the fold happens in FP32,
  as long as the folded ``scale`` and ``shift`` fit; the finding says which case applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch

from fp16guard.folding import fold_batchnorm
from fp16guard.fp16 import FP16_MAX
from fp16guard.inspect.report import StaticFinding
from fp16guard.stats import RangeStats, array_stats

#: A flush-to-zero finding needs at least this fraction of a tensor's nonzero values to flush ...
FLUSH_FRACTION = 0.01
#: ... or the tensor to be a small constant (an epsilon, a scale) with at most this many elements.
SMALL_CONSTANT = 16


@dataclass(frozen=True)
class BatchNormParams:
    """The five arrays of one BatchNorm, by name, as float64 numpy arrays of shape ``[C]``."""

    layer: str
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    var_name: str = ""


def check_tensor(name: str, values: np.ndarray, *, layer: str = "", is_bn_stat: bool = False) -> list[StaticFinding]:
    """Findings for one tensor (see the module docstring for the rules).

    Args:
        name: the tensor's name, reported as is.
        values: the tensor's values, any shape and float dtype.
        layer: the module or node that uses it.
        is_bn_stat: the tensor is a BatchNorm running statistic (the reason then mentions folding).
    """
    s = array_stats(values)
    out: list[StaticFinding] = []
    if s.nonfinite:
        out.append(StaticFinding(name, "nonfinite", "error", s.nonfinite, s,
                                 f"{s.nonfinite} of {s.numel} values are already inf/NaN", layer))
    over = int((np.abs(np.asarray(values, dtype=np.float64)) > FP16_MAX).sum())
    if over:
        reason = f"{over} of {s.numel} values exceed 65504 (amax {s.amax:.4g}) and become inf in FP16"
        if is_bn_stat:
            reason += "; fatal if cast before BatchNorm is folded (see bn_fold)"
        out.append(StaticFinding(name, "overflow", "error", over, s, reason, layer))
    if s.flush_to_zero and (s.flush_to_zero_fraction >= FLUSH_FRACTION or s.numel <= SMALL_CONSTANT):
        out.append(StaticFinding(
            name, "flush_to_zero", "warning", s.flush_to_zero, s,
            f"{s.flush_to_zero} of {s.nonzero} nonzero values are below 2^-24: zero in FP16",
            layer))
    return out


def check_batchnorm(bn: BatchNormParams) -> list[StaticFinding]:
    """A ``bn_fold`` finding when a BatchNorm's statistics or its folded form do not fit FP16.

    Severity ``error`` when the folded scale or shift overflows (no FP16 deployment of this BN is
    exact), ``info`` when only the raw statistics overflow (fold in FP32 and it is harmless).
    """
    scale, shift = fold_batchnorm(bn.gamma, bn.beta, bn.mean, bn.var, bn.eps)
    raw = RangeStats.merge(array_stats(a) for a in (bn.gamma, bn.beta, bn.mean, bn.var))
    s_scale, s_shift = array_stats(scale), array_stats(shift)
    var_over = int((np.abs(bn.var) > FP16_MAX).sum())
    folded_over = int((np.abs(scale) > FP16_MAX).sum() + (np.abs(shift) > FP16_MAX).sum())
    if not raw.out_of_range and not folded_over:
        return []
    extra = {
        "channels": int(np.size(bn.var)),
        "var_amax": float(np.abs(bn.var).max()) if np.size(bn.var) else 0.0,
        "channels_var_over_fp16": var_over,
        "scale_amax": s_scale.amax,
        "shift_amax": s_shift.amax,
        "eps": bn.eps,
    }
    if folded_over:
        reason = (f"folded scale/shift exceed 65504 (scale amax {s_scale.amax:.4g}, shift amax "
                  f"{s_shift.amax:.4g}): no FP16 form of this BatchNorm is exact; rescale it")
        severity = "error"
    else:
        reason = (f"running statistics exceed 65504 ({var_over} of {extra['channels']} channels' variance, "
                  f"amax {extra['var_amax']:.4g}) but the folded scale (amax {s_scale.amax:.4g}) and shift "
                  f"(amax {s_shift.amax:.4g}) fit: fold BatchNorm in FP32 before casting to FP16")
        severity = "info"
    return [StaticFinding(bn.var_name or bn.layer, "bn_fold", severity, var_over + folded_over, raw,
                          reason, bn.layer, extra)]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def check_module(model: torch.nn.Module) -> list[StaticFinding]:
    """Static check of a PyTorch model's floating parameters and buffers, and of every BatchNorm.

    Args:
        model: any ``torch.nn.Module`` (not modified).

    Returns:
        Findings in ``named_modules`` order.
    """
    out: list[StaticFinding] = []
    for mname, module in model.named_modules():
        is_bn = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tname, t in tensors:
            if t is None or not t.is_floating_point():
                continue
            full = f"{mname}.{tname}" if mname else tname
            out += check_tensor(full, _np(t), layer=mname,
                                is_bn_stat=is_bn and tname in ("running_var", "running_mean"))
        if is_bn and module.running_var is not None:
            c = module.num_features
            gamma = _np(module.weight) if module.weight is not None else np.ones(c)
            beta = _np(module.bias) if module.bias is not None else np.zeros(c)
            out += check_batchnorm(BatchNormParams(
                mname, gamma, beta, _np(module.running_mean), _np(module.running_var), float(module.eps),
                var_name=f"{mname}.running_var"))
    return out


def check_state_dict(state_dict: Mapping[str, torch.Tensor]) -> list[StaticFinding]:
    """Per-tensor static check of a bare state_dict (no module structure, so no ``bn_fold``)."""
    out: list[StaticFinding] = []
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out += check_tensor(name, _np(t), layer=name.rpartition(".")[0],
                                is_bn_stat=name.endswith(("running_var", "running_mean")))
    return out


def check_onnx(model, constants: Mapping[str, np.ndarray], node_names: Mapping[str, str]) -> list[StaticFinding]:
    """Static check of an ONNX graph's initializers and ``Constant`` values, and its BatchNorms.

    Args:
        model: an ``onnx.ModelProto``.
        constants: every constant tensor of the graph by name (initializers and ``Constant``
            outputs), see :func:`fp16guard.onnx_graph.graph_constants`.
        node_names: display name of the node that consumes each tensor, where known.
    """
    out: list[StaticFinding] = []
    bn_stats: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) >= 5:
            bn_stats.update(node.input[3:5])
    for name, values in constants.items():
        if np.issubdtype(values.dtype, np.floating):
            out += check_tensor(name, values, layer=node_names.get(name, ""), is_bn_stat=name in bn_stats)
    for i, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization" or len(node.input) < 5:
            continue
        if not all(n in constants for n in node.input[1:5]):
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (constants[n] for n in node.input[1:5])
        out += check_batchnorm(BatchNormParams(
            node.name or f"BatchNormalization_{i}", gamma, beta, mean, var, float(eps), var_name=node.input[4]))
    return out


def summarize(findings: Iterable[StaticFinding]) -> dict[str, int]:
    """Count findings by severity: ``{"error": n, "warning": n, "info": n}``."""
    counts = {"error": 0, "warning": 0, "info": 0}
    for f in findings:
        counts[f.severity] += 1
    return counts
