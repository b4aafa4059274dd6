"""Saturating attention-mask constants in a ``torch.export`` graph: the PyTorch counterpart of
:func:`fp16guard.fixing.onnx_pass.saturate_masks` (the proof and the guard are the same).

An additive mask ``finfo(float32).min`` (``(1 - m) * finfo.min``, ``where(m, bias, finfo.min)``,
``scores.masked_fill(m, -1e9)``) is ``-inf`` in FP16, and ``0 * -inf`` or a fully masked row of
``-inf`` is NaN. A scalar beyond -65504 in such an op becomes ``-2**15`` when every use of the
op's value is annihilated: scaled by a 0/1 indicator, selected, moved, or added to scores, and
then read only by a softmax (or max, argmax, top-k). A sum of scores and mask is read through
``where(mask < -2**14, -2**15, sum)`` (at the ``add`` when the sum only moves on to the softmax,
at the softmax input when further terms are added), so a fully masked row stays uniform as in
FP32, where ``score + finfo.min`` absorbs the score. A mask read by ``scaled_dot_product_attention``
keeps the fused op: a row whose every key is masked is given ``mean(v)`` after it, the uniform
attention FP32 computes there.
"""

from __future__ import annotations

import torch
from torch import fx

from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.onnx_masks import SATURATED_MASK
from fp16guard.fixing.torch_edit import ATTENTION, copy_module
from fp16guard.fp16 import FP16_MAX

aten = torch.ops.aten


def _packets(*names: str) -> frozenset:
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


#: Ops that give masked positions weight zero (their first argument is the masked value).
SINKS = _packets("_softmax", "softmax", "_log_softmax", "log_softmax", "amax", "max", "argmax", "topk")
#: Ops that move or broadcast a value without changing it.
MOVES = _packets("view", "reshape", "_unsafe_view", "expand", "contiguous", "clone", "permute", "transpose",
                 "unsqueeze", "squeeze", "slice", "alias", "detach", "repeat", "to", "_to_copy", "type_as")
#: Ops whose float scalar argument may be a mask constant, and the value they write is the mask term.
SOURCES = _packets("where", "masked_fill", "mul", "full", "full_like", "scalar_tensor", "fill", "new_full")


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val", node.meta.get("tensor_meta")) if isinstance(node, fx.Node) else None
    return getattr(val, "dtype", None)


def _is_indicator(node, depth: int = 0) -> bool:
    """A bool/integer tensor (an attention mask, a comparison), its float cast, ``1 - m`` of one,
    or one moved."""
    if not isinstance(node, fx.Node) or depth > 16:
        return False
    dtype = _dtype(node)
    if dtype is not None and not dtype.is_floating_point:
        return True
    p = _packet(node)
    if p in MOVES:
        return _is_indicator(node.args[0], depth + 1)
    if p is getattr(aten, "rsub", None) and node.args[1:2] == (1,):  # 1 - m
        return _is_indicator(node.args[0], depth + 1)
    if p is aten.sub and node.args[0] == 1:
        return _is_indicator(node.args[1], depth + 1)
    return False


def _annihilated(node: fx.Node, pure: bool, adds: list, paths: list, attention: list, added: bool = False,
                 moved: bool = False, depth: int = 0) -> bool:
    """Whether every use of ``node``'s value ends at a sink (see the module docstring); ``adds``
    collects ``(add node, mask term)`` where a pure mask term meets the scores, ``paths``
    ``(sink, first add, moved, added)`` for each path after such an add, ``attention`` the
    ``scaled_dot_product_attention`` nodes that read a pure mask term as ``attn_mask``."""
    if not node.users or depth > 32:
        return False
    for user in node.users:
        p = _packet(user)
        if p in SINKS and user.args[0] is node:
            if adds and not pure:
                paths.append((user, adds[-1][0], moved, added))
            continue
        if p is ATTENTION and _attn_mask(user) is node:
            if not pure:
                return False  # a sum reaching the attention's mask: no place for a guard inside it
            attention.append(user)
            continue
        if p is getattr(aten, "_assert_tensor_metadata", None):
            continue
        next_pure, next_added, next_moved = pure, added, moved
        if pure and p is aten.mul and len(user.args) == 2:
            other = user.args[1] if user.args[0] is node else user.args[0]
            if not _is_indicator(other):
                return False
        elif pure and p is aten.where and user.args[0] is not node:
            pass
        elif p in (aten.add, getattr(aten, "add_", None)) and len(user.args) == 2 and user.args[0] is not user.args[1]:
            if pure:
                adds.append((user, node))
            else:
                next_added = True
            next_pure = False
        elif p in MOVES and (_dtype(user) is None or _dtype(user).is_floating_point):
            next_moved = moved or not pure
        else:
            return False
        if not _annihilated(user, next_pure, adds, paths, attention, next_added, next_moved, depth + 1):
            return False
    return True


def _attn_mask(node: fx.Node):
    """The ``attn_mask`` argument of a ``scaled_dot_product_attention`` node (or None)."""
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _guard_attention(g: fx.Graph, attention: fx.Node, mask: fx.Node) -> None:
    """After ``attention`` (``softmax(q k^T s + mask) v``, ``v`` [..., keys, dim]): a query row whose
    every key is masked gets ``mean(v)`` over the keys, the uniform attention FP32 gives it (where
    ``score + finfo.min`` absorbs every score); other rows are unchanged."""
    users = list(attention.users)
    v = attention.args[2]
    with g.inserting_after(attention):
        masked = g.call_function(aten.lt.Scalar, (mask, SATURATED_MASK / 2))
    with g.inserting_after(masked):
        full = g.call_function(aten.all.dim, (masked, -1, True))
    with g.inserting_after(full):
        uniform = g.call_function(aten.mean.dim, (v, [-2], True))
    with g.inserting_after(uniform):
        out = g.call_function(aten.where.self, (full, uniform, attention))
    for u in users:
        u.replace_input_with(attention, out)


def _guard_bool_attention(g: fx.Graph, attention: fx.Node, mask: fx.Node) -> None:
    """After ``attention`` with a bool ``mask`` (True: attend): a query row with no key to attend
    gets 0, as PyTorch's math and CPU kernels give it (their safe softmax); FP16 CUDA kernels
    (cuDNN, memory-efficient) leave such a row undefined, while FP32 gives 0 there too."""
    users = list(attention.users)
    with g.inserting_after(attention):
        attended = g.call_function(aten.any.dim, (mask, -1, True))
    with g.inserting_after(attended):
        out = g.call_function(aten.where.ScalarOther, (attended, attention, 0.0))
    for u in users:
        u.replace_input_with(attention, out)


def guard_bool_masks(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[RewriteNote]]:
    """Every ``scaled_dot_product_attention`` with a bool ``attn_mask`` followed by the guard of
    :func:`_guard_bool_attention` (``transformers``' SDPA path passes padding masks as bool).

    Returns:
        ``(gm', notes)``: one ``mask_guard`` note per attention op (the input is not modified).
    """
    new = copy_module(gm)
    g = new.graph
    notes = []
    for node in list(g.nodes):
        mask = _attn_mask(node) if _packet(node) is ATTENTION else None
        if isinstance(mask, fx.Node) and _dtype(mask) is torch.bool:
            _guard_bool_attention(g, node, mask)
            notes.append(RewriteNote("mask_guard", node.name, "query rows with no key to attend set to 0 after the "
                                     "attention, as FP32 gives (FP16 CUDA kernels leave them undefined)"))
    g.lint()
    new.recompile()
    return new, notes


def _guard(g: fx.Graph, before: fx.Node, value: fx.Node, mask: fx.Node) -> fx.Node:
    """``where(mask < -2**14, -2**15, value)``, inserted before ``before``."""
    with g.inserting_before(before):
        masked = g.call_function(aten.lt.Scalar, (mask, SATURATED_MASK / 2))
        return g.call_function(aten.where.ScalarSelf, (masked, SATURATED_MASK, value))


def saturate_masks(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[RewriteNote]]:
    """Saturate additive-mask scalars beyond FP16 to ``-2**15`` where provably exact (module docstring).

    Args:
        gm: a captured graph (not modified).

    Returns:
        ``(gm', notes)``: one ``saturate_constant`` note per rewritten op, with its reason.
    """
    new = copy_module(gm)
    g = new.graph
    notes = []
    for node in list(g.nodes):
        if _packet(node) not in SOURCES:
            continue
        where = [i for i, a in enumerate(node.args) if isinstance(a, float) and a < -FP16_MAX]
        adds, paths, attention = [], [], []
        if not where or not _annihilated(node, True, adds, paths, attention):
            continue
        sites = {}
        for sink, add, moved, added in paths:
            sites.setdefault(add, []).append((sink, moved, added))
        if any(any(m for _, m, _ in v) and any(a for _, _, a in v) for v in sites.values()):
            continue  # a sum both moved and added to: no proof the mask lines up with the sink
        low = min(node.args[i] for i in where)
        node.args = tuple(SATURATED_MASK if i in where else a for i, a in enumerate(node.args))
        for add, mask in adds:
            ends = sites.get(add, [])
            if any(a for _, _, a in ends):
                for sink in dict.fromkeys(s for s, _, _ in ends):
                    sink.args = (_guard(g, sink, sink.args[0], mask), *sink.args[1:])
            else:
                users = list(add.users)
                guarded = _guard(g, add.next, add, mask)
                for u in users:
                    u.replace_input_with(add, guarded)
        for att in dict.fromkeys(attention):
            _guard_attention(g, att, _attn_mask(att))
        notes.append(RewriteNote("saturate_constant", node.name,
                                 f"{low:.3g} set to -2^15; {len(adds)} sum(s) of scores and mask read through "
                                 f"where(mask < -2^14, -2^15, sum), {len(set(attention))} attention op(s) give "
                                 f"mean(v) to fully masked rows: an additive mask whose every use ends in a "
                                 f"softmax/max, where its positions get weight 0 either way and a fully masked "
                                 f"row stays uniform"))
    g.lint()
    new.recompile()
    return new, notes

