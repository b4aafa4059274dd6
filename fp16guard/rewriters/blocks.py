"""Scaled forwards of the two modules seed 002 patched, decided by a plan, in plain PyTorch.

mmdet's ``BasicBlock`` and mmocr's ``FPEM_FFM`` as functions of the module and its
:class:`~fp16guard.fixing.module_scales.ModuleScale` entries: the BatchNorms are folded into their convs
in float64 and the power-of-two exponents folded into the weights, so the traced graph computes every activation stored as
``true * 2**-e`` with no extra op where the factor can be absorbed. Exact in real arithmetic;
the mmdeploy function rewriters (:mod:`fp16guard.rewriters.mmdeploy_rewriters`) call these.

Unlike seed 002 nothing here looks at the traced values (``torch.abs(self.norm2(out)).max()``),
keeps a global flag, or uses a channel-count threshold: the exponents come from the plan.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fp16guard.fixing.module_scales import ScaleTable, norm_input_shift
from fp16guard.folding import fold_affine_into_weights, fold_batchnorm, keeps_fp16_precision, pow2


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A parameter or buffer as float64 numpy. Under ``torch.jit.trace`` the values become
    constants of the exported graph, which is the point here, so the tracer's warning about it
    is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return t.detach().cpu().double().numpy()


def _constant(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``a`` as a tensor of ``like``'s dtype, a constant of the traced graph (no tracer warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.from_numpy(a).to(like.dtype)


def folded_weights(conv: nn.Conv2d, bn: nn.Module | None) -> tuple[np.ndarray, np.ndarray]:
    """``(weight, bias)`` of ``conv`` with the inference BatchNorm ``bn`` folded in, float64 numpy
    (seed 000's formula, :func:`fp16guard.folding.fold_batchnorm`); ``conv``'s own when ``bn`` is
    None (a missing bias as zeros).

    Raises:
        ValueError: ``bn`` is in training mode.
    """
    w = _numpy(conv.weight)
    b = _numpy(conv.bias) if conv.bias is not None else np.zeros(w.shape[0])
    if bn is None:
        return w, b
    if bn.training:
        raise ValueError(f"{type(bn).__name__} is in training mode; export the model in eval mode")
    scale, shift = fold_batchnorm(*(_numpy(t) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)),
                                  bn.eps)
    return fold_affine_into_weights(w, b, scale, shift, channel_axis=0)


def _conv(conv: nn.Conv2d, x: torch.Tensor, w: np.ndarray, b: np.ndarray, in_exponent: int,
          out_exponent: int) -> torch.Tensor:
    """``conv``'s convolution of ``x`` (stored with ``in_exponent``) with weights ``w``, ``b``
    rescaled so the result is stored with ``out_exponent`` (:mod:`fp16guard.folding`'s rule:
    ``W 2**(in - out)``, ``b 2**-out``). The weights enter the graph as constants: a tracer sees
    no op on parameters."""
    weight = _constant(w * pow2(in_exponent - out_exponent), x)
    bias = _constant(b * pow2(-out_exponent), x)
    return conv._conv_forward(x, weight, bias)


def _conv_norm(block: nn.Module) -> tuple[nn.Conv2d, nn.Module | None, nn.Module | None]:
    """``(conv, norm, activation)`` of an ``nn.Sequential(conv, norm[, act])`` or an mmcv
    ``ConvModule`` (order conv, norm, act)."""
    if isinstance(block, nn.Sequential):
        parts = list(block)
        conv = parts[0]
        norm = next((p for p in parts[1:] if isinstance(p, nn.modules.batchnorm._BatchNorm)), None)
        act = next((p for p in parts[1:] if not isinstance(p, nn.modules.batchnorm._BatchNorm)), None)
        return conv, norm, act
    return block.conv, getattr(block, "norm", None) if getattr(block, "with_norm", False) else None, \
        getattr(block, "activate", None) if getattr(block, "with_activation", False) else None


def conv_norm_act(block: nn.Module, x: torch.Tensor, table: ScaleTable) -> torch.Tensor:
    """``act(norm(conv(x)))`` of a conv+BN(+ReLU) block with the plan's exponents: ``x`` arrives
    with the block's input exponent, the result leaves with its output exponent.

    The BatchNorm is folded into the conv (float64) and the factors into the folded weights, as
    :func:`fp16guard.fixing.torch_pass.fold_batchnorms` does; where folding would make the conv's
    FP16 weights subnormal (a running variance of 1e10 scales them by 1e-5), the conv keeps its
    weights (scaled to the exponent the plan gives its output) and the BatchNorm becomes a
    per-channel ``x * scale + shift`` computed in float64 that absorbs the rest of the factor.
    """
    conv, norm, act = _conv_norm(block)
    e_in, e_out = table.exponents(block)
    w, b = folded_weights(conv, norm)
    if norm is None or keeps_fp16_precision(_numpy(conv.weight), w):
        y = _conv(conv, x, w, b, e_in, e_out)
    else:
        e_mid = table.exponents(conv)[1] if table.find(conv) is not None else e_in
        y = _conv(conv, x, *folded_weights(conv, None), e_in, e_mid)
        scale, shift = fold_batchnorm(*(_numpy(t) for t in (norm.weight, norm.bias, norm.running_mean,
                                                            norm.running_var)), norm.eps)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        y = y * _constant(scale * pow2(e_mid - e_out), y).view(shape) + _constant(shift * pow2(-e_out), y).view(shape)
    return act(y) if act is not None else y


def basic_block_forward(block: nn.Module, x: torch.Tensor, table: ScaleTable) -> torch.Tensor:
    """mmdet ``BasicBlock.forward`` with the plan's exponents.

    ``x`` arrives with the block's input exponent; ``conv1+norm1`` maps it to the exponent the
    plan gives ``conv1``'s output, ``conv2+norm2`` (and the downsample path) to the block's output
    exponent; the identity is added there and ReLU applied (scale-equivariant).

    Args:
        block: an eval-mode ``mmdet.models.backbones.resnet.BasicBlock`` (not modified).
        x: ``[N, C, H, W]``.
        table: the plan's module scales.
    """
    e_in, e_out = table.exponents(block)
    e_mid = table.exponents(block.conv1)[1]
    out = block.relu(_conv(block.conv1, x, *folded_weights(block.conv1, block.norm1), e_in, e_mid))
    out = _conv(block.conv2, out, *folded_weights(block.conv2, block.norm2), e_mid, e_out)
    if block.downsample is not None:
        conv, norm, _ = _conv_norm(block.downsample)
        identity = _conv(conv, x, *folded_weights(conv, norm), e_in, e_out)
    else:
        identity = x if e_in == e_out else x * pow2(e_in - e_out)
    return block.relu(out + identity)


def fpem_ffm_forward(neck: nn.Module, x: Sequence[torch.Tensor], table: ScaleTable) -> tuple[torch.Tensor, ...]:
    """mmocr 1.x ``FPEM_FFM.forward`` with the plan's exponents: each ``reduce_conv_c*`` takes its
    input with the exponent the plan gives it and returns true values (seed 002 undid the scale
    of ``c5`` after ``reduce_conv_c5``'s conv+BN; here the factor is folded into that conv's
    weights). The FPEM/FFM part is mmocr 1.0.1's code.

    Raises:
        NotImplementedError: the plan scales the neck's outputs (its readers are not rewritten).
    """
    reduce = [neck.reduce_conv_c2, neck.reduce_conv_c3, neck.reduce_conv_c4, neck.reduce_conv_c5]
    if table.exponents(neck)[1]:
        raise NotImplementedError("the plan scales FPEM_FFM's outputs; only its inputs can carry a factor")
    if any(table.exponents(r)[1] for r in reduce):
        raise NotImplementedError("the plan keeps a reduce_conv output of FPEM_FFM scaled; the FPEMs are not "
                                  "rewritten, so they need true values")
    c2, c3, c4, c5 = (conv_norm_act(r, t, table) for r, t in zip(reduce, x))
    for i, fpem in enumerate(neck.fpems):
        c2, c3, c4, c5 = fpem(c2, c3, c4, c5)
        if i == 0:
            c2_ffm, c3_ffm, c4_ffm, c5_ffm = c2, c3, c4, c5
        else:
            c2_ffm, c3_ffm, c4_ffm, c5_ffm = c2_ffm + c2, c3_ffm + c3, c4_ffm + c4, c5_ffm + c5
    size = c2_ffm.size()[-2:]
    outs = [c2_ffm] + [F.interpolate(c, size, mode="bilinear", align_corners=neck.align_corners)
                       for c in (c3_ffm, c4_ffm, c5_ffm)]
    return tuple(outs)


# ---------------------------------------------------------------- any module, by the plan's module scales

def conv_forward(conv: nn.Module, x: torch.Tensor, e_in: int, e_out: int) -> torch.Tensor:
    """``conv(x)`` (Conv1d/2d/3d) for ``x`` stored with ``e_in``, returning ``e_out``: the factor
    folded into the weights (``W 2**(e_in - e_out)``, ``b 2**-e_out``), which enter as constants."""
    return _conv(conv, x, *folded_weights(conv, None), e_in, e_out)


def linear_forward(linear: nn.Linear, x: torch.Tensor, e_in: int, e_out: int) -> torch.Tensor:
    """``linear(x)`` for ``x`` stored with ``e_in``, returning ``e_out`` (the factor in the weights)."""
    b = None if linear.bias is None else _constant(_numpy(linear.bias) * pow2(-e_out), x)
    return F.linear(x, _constant(_numpy(linear.weight) * pow2(e_in - e_out), x), b)


def batchnorm_forward(bn: nn.Module, x: torch.Tensor, e_in: int, e_out: int) -> torch.Tensor:
    """An inference BatchNorm for ``x`` stored with ``e_in``, returning ``e_out``:
    ``mean 2**-e_in``, ``gamma 2**(e_in - e_out)``, ``beta 2**-e_out``, the variance unchanged
    (``(x 2**-e - m 2**-e) / sqrt(v + eps) = (x - m) / sqrt(v + eps) 2**-e``).

    Raises:
        ValueError: ``bn`` is in training mode or has no running statistics.
    """
    if bn.training or bn.running_mean is None:
        raise ValueError(f"{type(bn).__name__} must be in eval mode with running statistics to be rescaled")

    def const(t, e):
        """``t * 2**e`` as a constant of ``x``'s dtype (None stays None)."""
        return None if t is None else _constant(_numpy(t) * pow2(e), x)

    return F.batch_norm(x, const(bn.running_mean, -e_in), const(bn.running_var, 0), const(bn.weight, e_in - e_out),
                        const(bn.bias, -e_out), False, 0.0, bn.eps)


def layernorm_forward(norm: nn.LayerNorm, x: torch.Tensor, e_in: int, e_out: int,
                      input_amax: float = 0.0) -> torch.Tensor:
    """``norm(x)`` for ``x`` stored with ``e_in``, returning ``e_out``.

    A LayerNorm is invariant to its input's scale once ``eps`` is scaled by ``2**(-2 e)``
    (``var(x 2**-e) = var(x) 2**-2e``); ``weight`` and ``bias`` take ``2**-e_out`` (without an
    affine part the output is multiplied). mmdeploy exports LayerNorm for TensorRT decomposed, as
    ``Pow(x - mean, 2)``, which overflows FP16 once ``|x - mean|`` passes 256: where the stored
    input's amax (``input_amax * 2**-e_in``, from calibration) exceeds ``2**7``, ``x`` is first
    multiplied by the power of two that brings it to ``2**7``, and ``eps`` follows.
    """
    shift = norm_input_shift(input_amax, e_in)
    if shift:
        x = x * pow2(-shift)
    eps = norm.eps * pow2(-2 * (e_in + shift))
    if norm.weight is None:
        y = F.layer_norm(x, norm.normalized_shape, None, None, eps)
        return y * pow2(-e_out) if e_out else y
    b = None if norm.bias is None else _constant(_numpy(norm.bias) * pow2(-e_out), x)
    return F.layer_norm(x, norm.normalized_shape, _constant(_numpy(norm.weight) * pow2(-e_out), x), b, eps)


def multihead_attention_forward(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, e_in: int, e_out: int, key_padding_mask=None,
                                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                                is_causal: bool = False, inner_exponent: int = 0) -> tuple[torch.Tensor, None]:
    """``mha(query, key, value, ...)`` (inference) for inputs stored with ``e_in``, returning the
    attention output with ``e_out``, and None for the weights (DETR-style callers read ``[0]``).

    ``q``, ``k`` and ``v`` are stored with ``inner_exponent`` (the plan's, ``e_q``): the input
    projections take ``2**(e_in - e_q)`` and their biases ``2**-e_q``; the attention scale becomes
    ``2**(2 e_q) / sqrt(head dim)``, so the scores and the softmax are true; the output, linear in
    ``v``, carries ``e_q`` into the output projection, whose weight takes ``2**(e_q - e_out)``
    and bias ``2**-e_out``. Exact in real arithmetic. ``query``, ``key`` and ``value`` share
    ``e_in`` (self-attention, or a memory stored like the queries).

    Raises:
        ValueError: ``bias_k``/``bias_v``, ``add_zero_attn`` or separate key/value widths (not
            in DETR's layers), or attention weights asked for.
    """
    if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
        raise ValueError("the scaled MultiheadAttention supports neither bias_k/bias_v, add_zero_attn nor "
                         "kdim/vdim different from embed_dim")
    if mha.batch_first:
        query, key, value = (t.transpose(1, 0) for t in (query, key, value))
    tgt, batch = query.shape[:2]
    width, heads = mha.embed_dim, mha.num_heads
    e_q = inner_exponent
    w = _numpy(mha.in_proj_weight) * pow2(e_in - e_q)
    b = _numpy(mha.in_proj_bias) * pow2(-e_q) if mha.in_proj_bias is not None else np.zeros(3 * width)
    q, k, v = (F.linear(x, _constant(w[i * width:(i + 1) * width], x), _constant(b[i * width:(i + 1) * width], x))
               for i, x in enumerate((query, key, value)))

    def heads_first(t):
        """[length, batch, width] -> [batch, heads, length, head dim]."""
        return t.reshape(t.shape[0], batch, heads, width // heads).permute(1, 2, 0, 3)

    # written out, not F.scaled_dot_product_attention: mmdeploy 1.3.1 rewrites that function inside
    # its RewriterContext and divides by ``scale`` where PyTorch multiplies
    mask = _attention_mask(attn_mask, key_padding_mask, batch, heads, query)
    if is_causal and mask is None:
        mask = torch.ones(tgt, key.shape[0], dtype=torch.bool, device=query.device).tril()
    scores = heads_first(q) @ heads_first(k).transpose(-2, -1) * (pow2(2 * e_q) / math.sqrt(width // heads))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.softmax(scores, dim=-1) @ heads_first(v)
    out = out.permute(2, 0, 1, 3).reshape(tgt, batch, width)
    ob = None if mha.out_proj.bias is None else _constant(_numpy(mha.out_proj.bias) * pow2(-e_out), out)
    out = F.linear(out, _constant(_numpy(mha.out_proj.weight) * pow2(e_q - e_out), out), ob)
    return (out.transpose(1, 0) if mha.batch_first else out), None


def _attention_mask(attn_mask, key_padding_mask, batch: int, heads: int, like: torch.Tensor):
    """``nn.MultiheadAttention``'s masks (bool True = masked, or float added) as one
    ``scaled_dot_product_attention`` mask (bool True = attend, or float added), or None."""
    masks = []
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(batch, heads, *attn_mask.shape[-2:])
        masks.append(~m if m.dtype == torch.bool else m.to(like.dtype))
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        masks.append(~kp if kp.dtype == torch.bool else kp.to(like.dtype))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        return masks[0] if len(masks) == 1 else masks[0] & masks[1]
    total = 0.0
    for m in masks:
        total = total + (torch.zeros((), dtype=like.dtype).masked_fill(~m, float("-inf"))
                         if m.dtype == torch.bool else m)
    return total
