"""One calibration run for both graphs a fix measures: the model as given (``base``: what the FP32
fallback rule reads) and the prepared graph (masks saturated, biases and BatchNorms folded: what
the scale solver reads).

The prepared graph's values are, name for name, the base graph's values in real arithmetic, with
two exceptions, and :func:`joint_model` measures both graphs in one ONNX Runtime run per input by
adding only those to the base graph:

* *new* values, written by nodes the structural passes added (a BatchNorm that cannot fold becomes
  ``Mul`` + ``Add``, whose ``X__scaled`` the base never computes): their nodes are added as they are;
* *changed* values, downstream of an initializer whose content the passes changed under the same
  name (:func:`~fp16guard.fixing.onnx_pass.saturate_masks`, the one pass that does): their nodes
  are added as copies writing ``<name>@prepared``. The change stops at the mask's sinks
  (:data:`~fp16guard.fixing.onnx_masks.MASK_SINKS`): the saturation's proof is that their outputs are
  unchanged.

Folds keep the output name of the op they fold (the conv writes the BatchNorm's output), so a
folded value is measured once, in the base graph. The added nodes are cheap (elementwise ops in
practice), each placed right after the last writer of what it reads, so it holds nothing longer.
Where an added node would read a value neither graph holds, :func:`joint_model` returns None and
the caller measures the two graphs apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from fp16guard.fixing.onnx_masks import MASK_SINKS
from fp16guard.onnx_graph import activation_values, constant_names, node_reads, value_types

#: The suffix of a changed value's copy in the joint graph.
PREPARED_SUFFIX = "@prepared"


@dataclass(frozen=True)
class JointModel:
    """The base graph with the prepared graph's own values added.

    Attributes:
        model: the joint graph (base nodes first where they come, the added ones beside them).
        base_values: the base graph's measured values (:func:`~fp16guard.onnx_graph.activation_values`).
        prepared_values: ``{prepared value: its name in the joint graph}``, for every measured value
            of the prepared graph.
    """

    model: onnx.ModelProto
    base_values: list[str]
    prepared_values: dict[str, str]

    @property
    def measured(self) -> list[str]:
        """Every value the joint run measures, once each, in a stable order."""
        return list(dict.fromkeys([*self.base_values, *self.prepared_values.values()]))


def _changed_initializers(base: onnx.ModelProto, prepared: onnx.ModelProto) -> set[str]:
    """Initializers of ``prepared`` whose content differs from ``base``'s of the same name."""
    old = {i.name: i for i in base.graph.initializer}
    out = set()
    for init in prepared.graph.initializer:
        was = old.get(init.name)
        if was is None or (was.raw_data and was.raw_data == init.raw_data and was.dims == init.dims
                           and was.data_type == init.data_type):
            continue  # the usual case, told apart without serializing the weights
        if was.SerializeToString() != init.SerializeToString():
            a, b = numpy_helper.to_array(was), numpy_helper.to_array(init)
            if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
                out.add(init.name)
    return out


def joint_model(base: onnx.ModelProto, prepared: onnx.ModelProto) -> JointModel | None:
    """The joint graph of ``base`` and ``prepared`` (module docstring), or None where the prepared
    graph cannot be measured beside the base one (a subgraph-holding node would need a copy, or an
    added node reads a value the base graph does not hold).

    Args:
        base: the FP32 model as the fallback rule reads it (constants as initializers).
        prepared: ``base`` after the structural passes
            (:data:`~fp16guard.fixing.targets.STRUCTURAL_PASSES`).
    """
    btypes = value_types(base)
    ptypes = value_types(prepared)
    base_measured, _ = activation_values(base, btypes)
    prep_measured, _ = activation_values(prepared, ptypes)
    held = {i.name for i in base.graph.input} | {o for n in base.graph.node for o in n.output if o}
    held |= constant_names(base)
    changed_inits = _changed_initializers(base, prepared)
    changed: set[str] = set(changed_inits)  # prepared names whose values differ from base's
    rename: dict[str, str] = {c: c + PREPARED_SUFFIX for c in changed_inits}
    added: list[onnx.NodeProto] = []
    new_inits = {}
    base_inits = {i.name for i in base.graph.initializer}
    prep_inits = {i.name: i for i in prepared.graph.initializer}
    for node in prepared.graph.node:
        reads = node_reads(node)
        outs = [o for o in node.output if o]
        tainted = any(r in changed for r in reads) and node.op_type not in MASK_SINKS
        fresh = [o for o in outs if o not in held]
        if not tainted and not fresh:
            continue  # the base graph computes the same values under the same names
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = (node.name or outs[0]) + PREPARED_SUFFIX
        for k, r in enumerate(copy.input):
            if not r:
                continue
            if r in rename:
                copy.input[k] = rename[r]
            elif r not in held:
                if r in prep_inits and r not in base_inits:
                    new_inits[r] = prep_inits[r]
                else:
                    return None
        for k, o in enumerate(copy.output):
            if not o:
                continue
            if tainted:
                changed.add(o)
                if o in held:  # the base graph's value of that name differs: a copy
                    rename[o] = o + PREPARED_SUFFIX
                    copy.output[k] = rename[o]
            held.add(copy.output[k])
        added.append(copy)
    for c in changed_inits:
        init = onnx.TensorProto()
        init.CopyFrom(prep_inits[c])
        init.name = rename[c]
        new_inits[init.name] = init
    joint = onnx.ModelProto()
    joint.CopyFrom(base)
    g = joint.graph
    g.initializer.extend(new_inits.values())
    _place(g, added)
    for o in added:  # value types of the added outputs, from the prepared graph
        for out in o.output:
            original = out[: -len(PREPARED_SUFFIX)] if out.endswith(PREPARED_SUFFIX) else out
            if out and original in ptypes:
                g.value_info.append(onnx.helper.make_tensor_value_info(out, ptypes[original], None))
    mapping = {v: rename.get(v, v) for v in prep_measured}
    return JointModel(joint, base_measured, mapping)


def _place(graph: onnx.GraphProto, added: list[onnx.NodeProto]) -> None:
    """Insert each of ``added`` (in their order) right after the last node writing what it reads."""
    nodes = list(graph.node)
    where: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for o in n.output:
            where[o] = k
    after: dict[int, list[onnx.NodeProto]] = {}
    for node in added:
        k = max((where[r] for r in node_reads(node) if r in where), default=-1)
        after.setdefault(k, []).append(node)
        for o in node.output:
            where[o] = k
    out = list(after.get(-1, []))
    for k, n in enumerate(nodes):
        out.append(n)
        out += after.get(k, [])
    del graph.node[:]
    graph.node.extend(out)
