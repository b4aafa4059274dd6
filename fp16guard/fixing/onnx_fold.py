"""The folding behind the structural ONNX passes (:func:`fp16guard.fixing.onnx_pass.constants_to_initializers`,
:func:`~fp16guard.fixing.onnx_pass.fold_affine_constants`, :func:`~fp16guard.fixing.onnx_pass.fold_batchnorms`):
nodes computed from constants alone evaluated ahead of time, per-channel constants read as ``[C]``
vectors, a convolution's output channels, and the constant ``Mul``/``Div``/``Add``/``Sub`` after a
convolution that folds into it. The math of a fold is :mod:`fp16guard.folding`."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fp16guard.fixing.onnx_edit import Constants, node_attr


#: Ops never evaluated ahead of time: random, with subgraphs, or (de)quantizing.
_NOT_FOLDED = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan", "SequenceMap",
               # quantized weights stay quantized: a DequantizeLinear of int8 weights stays in the graph (FP32)
               "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
#: Largest constant (elements) a folded node may write.
_FOLD_LIMIT = 1 << 24


def fold_constant_nodes(m: onnx.ModelProto) -> int:
    """Evaluate, in place, the nodes of ``m``'s main graph whose inputs are all initializers
    (``onnx.reference``), turning their outputs into initializers; the number folded.

    Exporters write shared or tied weights as ``Identity(weight)`` (``torch.onnx`` deduplicates
    equal parameters that way) and transposed or cast weights as ``Transpose``/``Cast`` of an
    initializer; the rewrites below expect a weight to be an initializer.
    """
    from onnx.reference import ReferenceEvaluator

    g = m.graph
    values = {i.name: i for i in g.initializer}
    opsets = list(m.opset_import)
    kept, folded = [], 0
    for node in g.node:
        ins = [x for x in node.input if x]
        if (not ins or node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED
                or not all(x in values for x in ins)):
            kept.append(node)
            continue
        sub = helper.make_model(helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, 0, None)
                                                                        for o in node.output if o],
                                                  [values[x] for x in dict.fromkeys(ins)]),
                                opset_imports=opsets, ir_version=m.ir_version)
        try:
            outs = ReferenceEvaluator(sub).run(None, {})
        except Exception:  # an op the reference runtime lacks: leave the node to the runtime
            kept.append(node)
            continue
        if any(np.asarray(o).size > _FOLD_LIMIT for o in outs):
            kept.append(node)
            continue
        for name, value in zip([o for o in node.output if o], outs):
            values[name] = numpy_helper.from_array(np.asarray(value), name)
            g.initializer.append(values[name])
        folded += 1
    del g.node[:]
    g.node.extend(kept)
    return folded


def channel_constant(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a ``[C]`` vector if it broadcasts along axis 1 of a rank-``rank`` tensor only."""
    v = np.asarray(value)
    if v.size == 1:
        return np.full(channels, float(v.reshape(-1)[0]))
    shape = list(v.shape)
    while len(shape) < rank:
        shape.insert(0, 1)
    if len(shape) != rank or shape[1] != channels or any(d != 1 for k, d in enumerate(shape) if k != 1):
        return None
    return v.reshape(-1).astype(np.float64)


def out_channels(node: onnx.NodeProto, weight: np.ndarray) -> tuple[int, int] | None:
    """(output channels, channel axis of the weight) of a Conv/ConvTranspose, or None when a
    per-channel fold is not a plain axis scaling (grouped ConvTranspose)."""
    if node.op_type == "Conv":
        return weight.shape[0], 0
    if node_attr(node, "group", 1) != 1:
        return None
    return weight.shape[1], 1


def next_affine_op(out: str, readers: Mapping[str, list[onnx.NodeProto]], outputs: set[str], consts: Constants,
                    scales: bool) -> tuple[onnx.NodeProto, str] | None:
    """The op that :func:`fold_affine_constants` can fold after the tensor ``out``, and the name of its
    constant operand; None when there is none.

    That op must be the only reader of ``out`` (which is no graph output) and an ``Add``/``Sub`` (or
    ``Mul``/``Div`` when ``scales``) of ``out`` and a constant (the constant first only for
    ``Mul``/``Add``).

    Args:
        readers: :func:`~fp16guard.onnx_graph.consumers` of the graph; outputs: graph output names.
    """
    users = readers.get(out, [])
    kinds = ("Mul", "Div", "Add", "Sub") if scales else ("Add", "Sub")
    if len(users) != 1 or out in outputs or users[0].op_type not in kinds:
        return None
    op = users[0]
    if op.input[0] == out and op.input[1] in consts:
        return op, op.input[1]
    if op.input[1] == out and op.input[0] in consts and op.op_type in ("Mul", "Add"):
        return op, op.input[0]
    return None
