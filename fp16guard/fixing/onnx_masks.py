"""The proof behind :func:`fp16guard.fixing.onnx_pass.saturate_masks`: an additive-mask constant
beyond FP16 whose every use ends at an op that gives its positions weight zero (:func:`annihilated`),
where the selections that keep a fully masked row uniform go (:func:`guard_sites`), and the selection
itself (:func:`mask_guard`). :mod:`fp16guard.fixing.torch_masks` is the PyTorch counterpart."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fp16guard.fixing.onnx_edit import FLOAT, node_attr


#: What a saturated mask constant becomes: -2**15. Exact in FP16, far below any score that still
#: counts after a softmax (``exp(-32768 - max)`` is 0 in every precision), and 2**15 away from FP16's
#: limit, so a masked score ``s - 32768`` cannot overflow to -inf for any ``|s| < 32736``.
SATURATED_MASK = -(2.0 ** 15)

#: Element types whose values are whole numbers: a float cast of them is an indicator when it is 0/1.
INDICATOR_TYPES = frozenset({TensorProto.BOOL, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                             TensorProto.INT32, TensorProto.INT64})

#: Ops that annihilate a very negative additive term: its position gets weight (or rank) zero.
MASK_SINKS = frozenset({"Softmax", "LogSoftmax", "ReduceMax", "ArgMax", "TopK"})
#: Ops that move or broadcast a mask without changing its values.
MASK_MOVES = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Expand", "Transpose", "Slice", "Identity", "Flatten",
                        "Tile", "Cast"})


def _is_indicator(value: str, producer: Mapping[str, onnx.NodeProto], consts: Mapping[str, np.ndarray],
                  types: Mapping[str, int]) -> bool:
    """Whether ``value`` is a 0/1 indicator: a bool or integer tensor cast to float (an attention
    mask, whose integers are taken to be 0/1 as tokenizers write them), ``1 - m`` of such an ``m``,
    or either moved or broadcast. ``consts``: the graph's initializer values by name."""
    node = producer.get(value)
    if node is None:
        return False
    if node.op_type == "Cast":  # of an integer or bool tensor (the mask input, a comparison)
        return types.get(node.input[0]) in INDICATOR_TYPES
    if node.op_type in MASK_MOVES:
        return _is_indicator(node.input[0], producer, consts, types)
    if node.op_type == "Sub" and node.input[0] in consts and np.all(consts[node.input[0]] == 1):  # 1 - m
        return _is_indicator(node.input[1], producer, consts, types)
    return False


def annihilated(value: str, readers: Mapping[str, list[onnx.NodeProto]], producer, consts, types,
                 adds: list[tuple[onnx.NodeProto, int]], pure: bool = True, depth: int = 0) -> str | None:
    """How every use of ``value`` (a very negative additive term) ends at an op that gives its
    positions weight zero, or None when one use does not: the proof behind
    :func:`fp16guard.fixing.onnx_pass.saturate_masks`.

    While ``value`` is the pure mask term, a use may scale it by an indicator (``(1 - m) * C``),
    select it (``Where(cond, C, x)``), move or broadcast it, or add it to scores (that ``Add`` and
    the mask side's input index are appended to ``adds``). From then on it may only be moved or
    added to, and must end in Softmax, LogSoftmax, ReduceMax, ArgMax or TopK.
    """
    uses = readers.get(value, [])
    if not uses or depth > 32:
        return None
    sinks = []
    for node in uses:
        t = node.op_type
        if t in MASK_SINKS and node.input[0] == value:  # also the pure term: masked_fill's Where(m, C, scores)
            sinks.append(t)
            continue
        if pure and t == "Mul" and len(node.input) == 2:
            other = node.input[1] if node.input[0] == value else node.input[0]
            if not _is_indicator(other, producer, consts, types):
                return None
        elif pure and t == "Where" and node.input[0] != value:
            pass
        elif t == "Add" and len(node.input) == 2 and node.input[0] != node.input[1]:
            if pure:
                adds.append((node, list(node.input).index(value)))
        elif t not in MASK_MOVES or t == "Cast" and node_attr(node, "to") not in (FLOAT, TensorProto.FLOAT16,
                                                                               TensorProto.DOUBLE):
            return None
        found = annihilated(node.output[0], readers, producer, consts, types, adds, pure and t != "Add", depth + 1)
        if found is None:
            return None
        sinks.append(found)
    return ", ".join(dict.fromkeys(sinks))


def _paths_to_sinks(value: str, readers: Mapping[str, list[onnx.NodeProto]], depth: int = 0
                    ) -> list[tuple[onnx.NodeProto, bool, bool]] | None:
    """Every path from ``value`` (the sum of scores and a mask) to a mask sink, as ``(sink, moved,
    added)``: whether the path moves the value (reshape, slice, ...) and whether it adds further
    terms (T5 adds the masked position bias to the scores of every layer); None if a path
    ends elsewhere (:func:`annihilated` has proved it does not)."""
    out = []
    for node in readers.get(value, []):
        if node.op_type in MASK_SINKS and node.input[0] == value:
            out.append((node, False, False))
            continue
        rest = _paths_to_sinks(node.output[0], readers, depth + 1) if depth < 32 else None
        if rest is None:
            return None
        moved, added = node.op_type != "Add", node.op_type == "Add"
        out += [(sink, m or moved, a or added) for sink, m, a in rest]
    return out


def mask_guard(g: onnx.GraphProto, name: str, value: str, mask: str, out: str) -> list[onnx.NodeProto]:
    """``out = Where(mask < SATURATED_MASK / 2, SATURATED_MASK, value)``: a masked position holds
    the saturated mask value, whatever its score, so a fully masked row is uniform after the
    softmax, as in FP32 where ``score + finfo.min`` absorbs the score; every other position keeps
    ``value``. ``mask`` is the mask term as it was added (0 or a position bias where unmasked, the
    saturated constant where masked)."""
    low, fill, keep = f"{name}__masked_below", f"{name}__masked_value", f"{name}__is_masked"
    g.initializer.append(numpy_helper.from_array(np.array(SATURATED_MASK / 2, np.float32), low))
    g.initializer.append(numpy_helper.from_array(np.array(SATURATED_MASK, np.float32), fill))
    return [helper.make_node("Less", [mask, low], [keep], name=keep),
            helper.make_node("Where", [keep, fill, value], [out], name=name)]


def guard_sites(adds: Sequence[tuple[onnx.NodeProto, int]], readers: Mapping[str, list[onnx.NodeProto]]
                 ) -> tuple[dict[str, int], dict[str, list[str]]] | None:
    """Where the ``mask == 0`` selections go, for each ``Add(scores, mask)`` of ``adds``:
    ``({Add node: mask index}, {sink node: [masks]})``. An ``Add`` whose sum reaches its sinks
    only moved becomes the selection itself; one whose sum reaches them only through further
    ``Add``s (no move, so the mask still broadcasts) gets the selection at each sink's input;
    None for a mix (no proof that the mask lines up with the sink's input)."""
    at_add: dict[str, int] = {}
    at_sink: dict[str, list[str]] = {}
    for add, index in adds:
        paths = _paths_to_sinks(add.output[0], readers)
        if paths is None:
            return None
        if not any(added for _, _, added in paths):
            at_add[add.name] = index
        elif not any(moved for _, moved, _ in paths):
            for sink, _, _ in paths:
                masks = at_sink.setdefault(sink.name, [])
                if add.input[index] not in masks:
                    masks.append(add.input[index])
        else:
            return None
    return at_add, at_sink
