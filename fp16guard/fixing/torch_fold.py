"""The BatchNorm folding behind :func:`fp16guard.fixing.torch_pass.fold_batchnorms`: an inference
BatchNorm as a per-channel affine map computed in float64 (:func:`batchnorm_affine`), folded into the
convolution before it (:func:`fold_into_conv`) or written as ``x * scale + shift``
(:func:`batchnorm_to_mul_add`). The math is :mod:`fp16guard.folding`."""

from __future__ import annotations

import operator

import numpy as np
from torch import fx

from fp16guard.errors import RewriteError
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.torch_edit import LINEAR_OPS, Constants, aten, op_packet
from fp16guard.folding import fold_affine_into_weights, fold_batchnorm, keeps_fp16_precision
from fp16guard.torch_graph import get_attr


def batchnorm_affine(bn: fx.Node, consts: Constants) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The inference BatchNorm ``bn`` as a per-channel affine map, computed in float64.

    Returns:
        ``(channels, scale, shift, running variance)``.

    Raises:
        RewriteError: ``bn`` is in training mode, or its statistics are not constants.
    """
    w, b, mean, var = bn.args[1:5]
    if op_packet(bn) is aten.batch_norm:
        training, eps = bn.args[5], bn.args[7]
    else:
        training, eps = False, bn.args[6]
    if training:
        raise RewriteError(f"{bn.name}: BatchNorm in training mode cannot be folded; put the model in eval mode")
    stats = [consts.get(a) for a in (mean, var)]
    if any(s is None for s in stats):
        raise RewriteError(f"{bn.name}: BatchNorm statistics are not constants")
    c = stats[0].size
    gamma = consts.get(w) if w is not None else np.ones(c)
    beta = consts.get(b) if b is not None else np.zeros(c)
    scale, shift = fold_batchnorm(gamma, beta, stats[0], stats[1], float(eps))
    return c, scale, shift, stats[1]


def batchnorm_outputs(bn: fx.Node) -> list[fx.Node]:
    """The nodes that carry ``bn``'s normalized output: ``bn`` itself for ``aten.batch_norm``, its
    ``getitem 0`` readers for the ``(out, mean, invstd)`` variant.

    Raises:
        RewriteError: the variant's mean/invstd outputs are read.
    """
    if op_packet(bn) is aten.batch_norm:
        return [bn]
    users = list(bn.users)
    if any(op_packet(u) is not operator.getitem or u.args[1] != 0 for u in users):
        raise RewriteError(f"{bn.name}: BatchNorm statistics outputs are read")
    return users


def fold_into_conv(gm: fx.GraphModule, consts: Constants, conv: fx.Node, c: int, scale: np.ndarray,
                    shift: np.ndarray) -> bool:
    """Fold ``x * scale + shift`` into the weights and bias of ``conv`` (the BatchNorm's input) if it
    can: a convolution (not linear, not a grouped transposed one) read only by the BatchNorm, with
    constant weights of ``c`` output channels, whose folded FP16 weights lose no precision.

    Returns:
        Whether ``conv`` was rewritten (with new weight and bias buffers); if not, nothing changed.
    """
    if op_packet(conv) not in LINEAR_OPS or len(conv.users) != 1 or "linear" in str(conv.target):
        return False
    transposed = "transpose" in str(conv.target) or (op_packet(conv) is aten.convolution and conv.args[6])
    groups = conv.args[8] if op_packet(conv) is aten.convolution else (
        conv.args[6] if "transpose" in str(conv.target) and len(conv.args) > 6 else 1)
    weight = consts.get(conv.args[1])
    bias = consts.get(conv.args[2]) if len(conv.args) > 2 and conv.args[2] is not None else None
    axis = 1 if transposed else 0
    if weight is None or (transposed and groups != 1) or weight.shape[axis] != c:
        return False
    w2, b2 = fold_affine_into_weights(weight, bias, scale, shift, channel_axis=axis)
    if not keeps_fp16_precision(weight, w2):
        return False
    args = list(conv.args)
    args[1] = consts.new(w2, conv, get_attr(gm, conv.args[1].target))
    while len(args) < 3:
        args.append(None)
    args[2] = consts.new(b2, conv, get_attr(gm, conv.args[1].target))
    conv.args = tuple(args)
    return True


def batchnorm_to_mul_add(gm: fx.GraphModule, consts: Constants, bn: fx.Node, out_nodes: list[fx.Node], c: int,
                          scale: np.ndarray, shift: np.ndarray, conv: fx.Node | None) -> RewriteNote:
    """Replace ``bn`` (and its ``out_nodes``) with ``x * scale + shift`` nodes named ``<bn>_scale`` and ``<bn>``.

    Args:
        c: the number of channels (``scale`` and ``shift`` become ``[c, 1, ...]`` buffers).
        conv: ``bn``'s input node, if any (only for the note's reason).

    Returns:
        The note saying why the BatchNorm was not folded into a convolution.
    """
    g = gm.graph
    x, mean = bn.args[0], bn.args[3]
    shape = [c] + [1] * (len(bn.meta["val"].shape) - 2 if "val" in bn.meta else 2)
    like = get_attr(gm, mean.target)
    s_node = consts.new(scale.reshape(shape), bn, like)
    t_node = consts.new(shift.reshape(shape), bn, like)
    with g.inserting_before(bn):
        mul = g.call_function(aten.mul.Tensor, (x, s_node))
        add = g.call_function(aten.add.Tensor, (mul, t_node))
    mul.meta.update(bn.meta)
    add.meta.update(bn.meta)
    for o in out_nodes:
        o.replace_all_uses_with(add)
    why = ("folding would make the conv's FP16 weights subnormal" if conv is not None
           and op_packet(conv) in LINEAR_OPS else "no conv to fold into")
    note = RewriteNote("batchnorm_to_affine", bn.name, f"{why}: per-channel mul + add with scale "
                       f"and shift computed in float64")
    name = bn.name
    erase_batchnorm(g, bn, out_nodes)
    mul.name, add.name = f"{name}_scale", name  # keep the BatchNorm's output name for the plan
    return note


def erase_batchnorm(g: fx.Graph, bn: fx.Node, out_nodes: list[fx.Node]) -> None:
    """Erase ``bn`` and its ``getitem`` output nodes (all already without users)."""
    for o in out_nodes:
        if o is not bn:
            g.erase_node(o)
    g.erase_node(bn)
