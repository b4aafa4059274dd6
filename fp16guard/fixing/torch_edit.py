"""The ``torch.export`` graph as the PyTorch passes read and edit it: ATen overload packets and the
law table's rows for them (:data:`LAWS`, :data:`LINEAR_OPS`, :data:`NORM_OPS`, ...), an op's packet
(:func:`op_packet`), copy-on-write constants (:class:`Constants`) and graphs (:func:`copy_module`),
and which values are floats and which depend on a graph input. Shared by
:mod:`fp16guard.fixing.torch_pass` and the modules behind it, and by :mod:`fp16guard.fixing.torch_masks`."""

from __future__ import annotations

import operator
from typing import Iterable

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from fp16guard.fixing import laws
from fp16guard.fixing.solver_model import Role
from fp16guard.torch_graph import get_attr

aten = torch.ops.aten


def packets(*names: str) -> frozenset:
    """ATen overload packets by name (names this torch version lacks are skipped)."""
    return frozenset(p for p in (getattr(aten, n, None) for n in names) if p is not None)


def _packet_named(name: str):
    """The ATen overload packet ``name`` (``getitem``: Python's ``operator.getitem``), or None."""
    return operator.getitem if name == "getitem" else getattr(aten, name, None)


#: The ATen side of the law table (:mod:`fp16guard.fixing.laws`): overload packet -> row.
LAWS = {p: law for name, law in laws.by_op(laws.ATEN).items() if (p := _packet_named(name)) is not None}


def _rows(*names: str) -> frozenset:
    """The packets of the law table's rows ``names``."""
    return frozenset(p for p, law in LAWS.items() if law.name in names)


#: Ops with a weight at ``args[1]`` and a bias at ``args[2]`` (output channels on weight axis 0,
#: axis 1 for a transposed convolution).
LINEAR_OPS = _rows("conv", "conv_transpose", "linear")
#: ``addmm(bias, x, W)``: a linear op whose weight is argument 2 and bias argument 0.
ADDMM = getattr(aten, "addmm", None)
#: Normalizations invariant to their input's scale: ``(weight index, bias index, eps index)``.
NORM_OPS = {p: (law.aten_args.weight, law.aten_args.bias, law.aten_args.eps) for p, law in LAWS.items()
            if law.aten_args.eps is not None}
#: Tied ops whose constant arguments are values of the activation (scaled with it): arg indices.
TIED_SCALARS = {p: law.aten_args.scaled for p, law in LAWS.items()
                if law.role is Role.TIED and law.aten_args.scaled and law.name != "embedding"}
MATMUL_OPS = _rows("matmul")


#: ``scaled_dot_product_attention``: its ``q`` and ``k`` exponents fold into its scale.
ATTENTION = getattr(aten, "scaled_dot_product_attention", None)


#: Names a scalar argument as a constant: ``<node>#<argument index>`` (``add_3#1`` for the ``1e-10``
#: of ``add(x, 1e-10)``).
SCALAR_MARK = "#"


def op_packet(node: fx.Node):
    """The ATen overload packet of a ``call_function`` node (None for anything else); an in-place
    op (``aten.add_``, from ``out += identity``) counts as its functional form: its output is
    the node's own value either way."""
    if node.op != "call_function":
        return None
    packet = getattr(node.target, "overloadpacket", node.target)
    name = getattr(packet, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return getattr(aten, name[:-1], packet)
    return packet


class Constants:
    """Copy-on-write constants of a ``GraphModule``: a changed value becomes a new buffer read by a
    new ``get_attr`` node, so tensors shared with the user's module are never written."""

    def __init__(self, gm: fx.GraphModule, fp32: Iterable[str] = ()):
        self.gm = gm
        self.count = 0
        self.fp32 = frozenset(fp32)  # nodes that run in FP32: their rescaled constants may pass 65504

    def get(self, node) -> np.ndarray | None:
        """A constant argument as float64 numpy (a ``get_attr`` node or a Python number), else None."""
        if isinstance(node, fx.Node):
            return get_attr(self.gm, node.target).detach().cpu().double().numpy() if node.op == "get_attr" else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return np.asarray(float(node))
        return None

    def new(self, value: np.ndarray, before: fx.Node, like: torch.Tensor | None = None) -> fx.Node:
        """A ``get_attr`` node for a new buffer holding ``value`` (dtype of ``like``, default FP32)."""
        while hasattr(self.gm, f"_fp16guard_c{self.count}"):  # earlier passes' constants keep their names
            self.count += 1
        name = f"_fp16guard_c{self.count}"
        dtype = like.dtype if like is not None else torch.float32
        self.gm.register_buffer(name, torch.from_numpy(np.require(value, requirements="C")).to(dtype))
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(name)

    def replace(self, user: fx.Node, index: int, value: np.ndarray) -> None:
        """Set ``user.args[index]`` to ``value``: a new buffer for a tensor constant, a float for a scalar."""
        old = user.args[index]
        args = list(user.args)
        if isinstance(old, fx.Node):
            args[index] = self.new(value, user, get_attr(self.gm, old.target))
        else:
            args[index] = float(np.asarray(value).reshape(-1)[0])
        user.args = tuple(args)


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new ``GraphModule`` with a copied graph (node metadata kept); constants are shared until
    replaced (copy-on-write), so a pass may edit the copy's graph freely."""
    new = fx.GraphModule(gm, _copy_graph(gm.graph))
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    g = fx.Graph()
    g._codegen = graph._codegen  # torch.export's pytree input/output structure (never mutated)
    env: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(graph, env)
    g.output(out)
    return g


def is_float_value(node: fx.Node) -> bool:
    """Whether ``node``'s recorded value (``meta["val"]`` or ``meta["tensor_meta"]``) holds a float tensor."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    vals, _ = tree_flatten(val)
    return any(getattr(v, "dtype", None) is not None and v.dtype.is_floating_point for v in vals)


def node_writes_float(node: fx.Node) -> bool:
    """Whether ``node`` writes a float value, read from ``meta["val"]`` or, for nodes a pass added,
    ``meta["tensor_meta"]`` (a ``TensorMetadata`` tuple, whose own ``dtype`` field is the answer)."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    vals, _ = tree_flatten(val, is_leaf=lambda v: isinstance(getattr(v, "dtype", None), torch.dtype))
    return any(isinstance(getattr(v, "dtype", None), torch.dtype) and v.dtype.is_floating_point for v in vals)


def activations(gm: fx.GraphModule) -> set[str]:
    """Names of nodes whose value depends on a graph input (constants and their functions excluded)."""
    acts: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            acts.add(node.name)
        elif node.op in ("call_function", "call_method", "call_module"):
            ins, _ = tree_flatten((node.args, node.kwargs))
            if any(isinstance(a, fx.Node) and a.name in acts for a in ins):
                acts.add(node.name)
    return acts
