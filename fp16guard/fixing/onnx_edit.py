"""Copy-on-write editing of ONNX graphs, shared by the ONNX passes (:mod:`fp16guard.fixing.onnx_pass`
and the modules behind it): a model copied before a pass edits it, node attributes read and set,
nodes named, unused initializers dropped, and :class:`Constants`, the initializers by name, each
replaced by a new one rather than written in place."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fp16guard.onnx_graph import node_reads, unique_name

FLOAT = TensorProto.FLOAT


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for a pass to edit (the argument of a pass is never modified)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_node_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (or replace) ``node``'s attribute ``name`` to ``value``."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a unique name (passes and plans refer to nodes by name)."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = unique_name(f"{node.op_type}_{i}", used)
            used.add(node.name)


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop, in place, the initializers no node (subgraphs included) and no graph output reads."""
    used = {t for n in graph.node for t in node_reads(n)} | {o.name for o in graph.output}  # subgraphs' reads too
    for k in reversed([k for k, i in enumerate(graph.initializer) if i.name not in used]):
        del graph.initializer[k]  # in place: the kept weights are not copied


class _Decoded(dict):
    """Initializer values by name, each decoded to numpy the first time it is read (a pass reads a
    few of a model's weights; decoding all of BERT-base's took a second per pass)."""

    def __init__(self, protos: dict[str, onnx.TensorProto]):
        super().__init__()
        self._protos = protos

    def __missing__(self, name: str) -> np.ndarray:
        if name not in self._protos:
            raise KeyError(name)
        value = self[name] = numpy_helper.to_array(self._protos[name])
        return value

    def __contains__(self, name: object) -> bool:
        return name in self._protos or dict.__contains__(self, name)

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        dict.__setitem__(self, name, value)
        self._protos.setdefault(name, None)  # known from now on (its value is set)


class Constants:
    """Initializers by name, with copy-on-write replacement (a constant shared by two nodes is
    duplicated before one of them changes it)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.values = _Decoded({i.name: i for i in graph.initializer})
        self.made: dict[tuple[str, str], str] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str) -> np.ndarray:
        """The value of initializer ``name`` (as stored: usually float32)."""
        return self.values[name]

    def replace(self, node: onnx.NodeProto, index: int, value: np.ndarray, suffix: str) -> None:
        """Set ``node.input[index]`` to a constant holding ``value`` (same dtype as before)."""
        old = node.input[index] if index < len(node.input) else ""
        dtype = self.values[old].dtype if old in self.values else np.float32
        key = (old, suffix)
        new = self.made.get(key) if old else None
        cached = new is not None and np.array_equal(self.values[new], np.asarray(value).astype(dtype))
        if not cached:
            new = f"{old}__{suffix}" if old else f"{node.name}__{suffix}"
            while new in self.values:
                new = f"{new}_"
            self.values[new] = np.asarray(value).astype(dtype)
            self.graph.initializer.append(numpy_helper.from_array(self.values[new], new))
            if old:
                self.made[key] = new
        if index < len(node.input):
            node.input[index] = new
        else:
            while len(node.input) < index:
                node.input.append("")
            node.input.append(new)
