"""Split an ONNX graph, in topological order, into a prefix and a suffix.

Candidate cuts sit after every node that computes a floating-point activation (``Constant``
nodes and integer shape arithmetic are not candidates: a ``Constant`` travels with the nodes that
use it, on either side). A cut after candidate ``k`` gives the **prefix** (graph inputs -> every
tensor computed before the cut that a later node or a graph output still needs) and the **suffix**
(those tensors and the graph inputs -> the graph outputs). Both are cut out with
``onnx.utils.Extractor``, which keeps exactly the nodes and initializers each side needs.

Control flow: a node with subgraphs (``If``, ``Loop``, ``Scan``) is one unit, cut before or after,
never inside; the outer values its subgraphs read by name count as its inputs (they cross a cut
like any input, and the extraction keeps their producers and initializers).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

from fp16guard.errors import OnnxSplitError
from fp16guard.onnx_graph import fed_inputs, node_name, node_reads, node_scope

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclass(frozen=True)
class Candidate:
    """A node after which the graph can be cut.

    Attributes:
        position: index of the node in ``graph.node`` (topological order).
        name: the node's name (``"p2o.BatchNormalization.0"``), or ``"<op>_<position>"``.
        op_type: the ONNX op (``"BatchNormalization"``).
        scope: the module scope carried by the name (``"/backbone/layer4/0"``), or ``""``.
    """

    position: int
    name: str
    op_type: str
    scope: str


class _Extractor(onnx.utils.Extractor):
    """``onnx.utils.Extractor`` that follows the outer values a node's subgraphs read by name
    (:func:`~fp16guard.onnx_graph.node_reads`), as inputs of the node."""

    def _dfs_search_reachable_nodes(self, node_output_name: str, graph_input_names: set[str],
                                    reachable: set[int]) -> None:
        stack = [node_output_name]
        while stack:
            name = stack.pop()
            if name in graph_input_names or name not in self.outmap:
                continue
            index = self.outmap[name]
            if index not in reachable:
                reachable.add(index)
                stack += node_reads(self.graph.node[index])

    def _collect_reachable_tensors(self, nodes):
        names = {t for node in nodes for t in (*node_reads(node), *node.output)}
        initializer = [self.initializers[t] for t in self.initializers if t in names]
        value_info = [self.value_infos[t] for t in self.value_infos if t in names]
        return initializer, value_info


class OnnxSplitter:
    """Cuts of an FP32 ONNX model.

    Args:
        model: the FP32 ``onnx.ModelProto`` (not modified).

    Raises:
        OnnxSplitError: shape inference cannot type a tensor that would cross a cut.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception as e:  # noqa: BLE001
            raise OnnxSplitError(f"ONNX shape inference failed ({e}); fp16guard needs the type of every "
                                 "tensor that may cross a cut") from None
        self.extractor = _Extractor(inferred)
        g = inferred.graph
        self.types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
        self.types.update({i.name: i.data_type for i in g.initializer})
        self.nodes = list(model.graph.node)
        self.graph_inputs = fed_inputs(model)
        # every declared input that is not a weight, optional ones too: the extractor needs them all as
        # inputs of the prefix, and ONNX Runtime runs a model with an optional input left unfed
        weights = {i.name for i in model.graph.initializer}
        self.declared_inputs = [i.name for i in model.graph.input if i.name not in weights]
        self.graph_outputs = [o.name for o in model.graph.output]
        self.candidates = [
            Candidate(i, node_name(n, i), n.op_type, node_scope(n))
            for i, n in enumerate(self.nodes)
            if n.op_type != "Constant" and any(self.types.get(o) in FLOAT_TYPES for o in n.output if o)
        ]

    def boundary(self, position: int) -> list[str]:
        """Tensors computed by nodes ``0..position`` (not ``Constant``) that later nodes or the
        graph outputs read: the values that cross the cut, in production order."""
        produced: dict[str, int] = {}
        for i, n in enumerate(self.nodes[: position + 1]):
            if n.op_type != "Constant":
                for o in n.output:
                    if o:
                        produced[o] = i
        needed = set(self.graph_outputs)
        for n in self.nodes[position + 1:]:
            needed.update(node_reads(n))
        return [t for t in produced if t in needed]

    def split(self, position: int) -> tuple[onnx.ModelProto, onnx.ModelProto | None, list[str]]:
        """Prefix and suffix for a cut after node ``position``.

        Returns:
            ``(prefix, suffix, boundary)``: ``prefix`` maps the graph inputs to the boundary
            tensors; ``suffix`` maps boundary tensors and graph inputs to the graph outputs that
            the prefix does not already produce (None if it produces all of them).

        Raises:
            OnnxSplitError: a boundary tensor has no inferred type.
        """
        live = self.boundary(position)
        untyped = [t for t in live if t not in self.types]
        if untyped:
            raise OnnxSplitError(f"cannot type tensor(s) {untyped[:3]} crossing the cut after node "
                                 f"{self.nodes[position].name!r}; run onnx shape inference on the model first")
        prefix = self.extractor.extract_model(self.declared_inputs, live)
        rest = [o for o in self.graph_outputs if o not in live]
        suffix = None
        if rest:
            suffix = self.extractor.extract_model(live + self.declared_inputs, rest)
        for m in (prefix, suffix):
            if m is not None:
                m.ir_version = self.model.ir_version
        return prefix, suffix, live

    def step(self, start: int, position: int) -> tuple[onnx.ModelProto | None, list[str], list[str]]:
        """The nodes that take the cut after node ``start`` forward to the cut after ``position``
        (``start <= position``): the part of the prefix of ``position`` that the prefix of
        ``start`` does not already compute.

        Returns:
            ``(model, inputs, outputs)``: ``model`` maps the values crossing cut ``start`` that it
            reads, and the graph inputs, to ``outputs``, the values crossing cut ``position`` that
            do not cross cut ``start`` (None, with ``outputs`` empty, when there are none); every
            other value crossing cut ``position`` crosses cut ``start`` too. ``inputs``: the values
            crossing cut ``start`` that the model reads.
        """
        before = self.boundary(start)
        known = set(before)
        outputs = [t for t in self.boundary(position) if t not in known]
        if not outputs:
            return None, [], []
        model = self.extractor.extract_model(before + self.declared_inputs, outputs)
        read = {t for n in model.graph.node for t in node_reads(n)}
        inputs = [t for t in before if t in read]
        keep = set(inputs) | set(self.declared_inputs)
        kept = [i for i in model.graph.input if i.name in keep]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = self.model.ir_version
        return model, inputs, outputs
