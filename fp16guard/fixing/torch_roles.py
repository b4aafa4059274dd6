"""The ``torch.export`` graph as the scale solver sees it, op by op: each node's role and power
degree (one lookup in the law table, :mod:`fp16guard.fixing.laws`, through :class:`_View`), the
constants it folds exponents into (:func:`scaled_constants`), and ``scaled_dot_product_attention``
as the solver's ops (:func:`attention_ops`). :func:`fp16guard.fixing.torch_pass.scale_ops` puts them
together for the whole graph."""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from fp16guard.fixing import laws
from fp16guard.fixing.solver_model import Role, ScaledConstant, ScaleOp
from fp16guard.fixing.torch_edit import (
    ADDMM,
    LAWS,
    LINEAR_OPS,
    MATMUL_OPS,
    NORM_OPS,
    SCALAR_MARK,
    TIED_SCALARS,
    Constants,
    aten,
    is_float_value,
    node_writes_float,
    op_packet,
)
from fp16guard.torch_graph import get_attr, module_scope


class _View:
    """A node as the law table's predicates read it (:class:`fp16guard.fixing.laws.OpView`)."""

    frontend = laws.ATEN

    def __init__(self, node: fx.Node, acts: set[str]):
        self.node, self.acts = node, acts
        self.reads = sum(isinstance(a, fx.Node) and a.name in acts for a in tree_flatten((node.args, node.kwargs))[0])

    def _arg(self, i: int):
        return self.node.args[i] if i < len(self.node.args) else None

    def is_act(self, i: int) -> bool:
        """A float activation (as ONNX counts them: an integer or bool tensor read from the input,
        a mask or indices, is no value the scale applies to)."""
        a = self._arg(i)
        known = isinstance(a, fx.Node) and ("val" in a.meta or "tensor_meta" in a.meta)
        return isinstance(a, fx.Node) and a.name in self.acts and (not known or node_writes_float(a))

    def is_const(self, i: int) -> bool:
        """A ``get_attr`` tensor or a Python number (what :class:`Constants` rescales)."""
        a = self._arg(i)
        return (isinstance(a, fx.Node) and a.op == "get_attr" or isinstance(a, (int, float))
                and not isinstance(a, bool))

    def absent(self, i: int) -> bool:
        """See :meth:`~fp16guard.fixing.laws.OpView.absent`."""
        return self._arg(i) is None

    def scalar(self, i: int) -> float | None:
        """See :meth:`~fp16guard.fixing.laws.OpView.scalar`."""
        a = self._arg(i)
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return float(a)
        if isinstance(a, fx.Node) and a.op == "get_attr":
            t = get_attr(self.node.graph.owning_module, a.target)
            return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) and t.numel() == 1 else None
        return None

    def attr(self, name: str):
        """The argument ``name`` of the op's schema: keyword, positional or its default."""
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        schema = getattr(self.node.target, "_schema", None)
        for k, arg in enumerate(schema.arguments if schema is not None else ()):
            if arg.name == name:
                if k < len(self.node.args) and not arg.kwarg_only:
                    return self.node.args[k]
                return arg.default_value if arg.has_default_value() else None
        return None

    def is_float_dtype(self, dtype) -> bool:
        """See :meth:`~fp16guard.fixing.laws.OpView.is_float_dtype`."""
        return isinstance(dtype, torch.dtype) and dtype.is_floating_point

    def writes_float(self) -> bool | None:
        """See :meth:`~fp16guard.fixing.laws.OpView.writes_float`."""
        return node_writes_float(self.node) if "val" in self.node.meta or "tensor_meta" in self.node.meta else None


def op_role(node: fx.Node, acts: set[str]) -> tuple[Role, Fraction]:
    """The node's role and power degree: one lookup in the law table (:func:`fp16guard.fixing.laws.role_of`);
    an op the table lacks is a barrier."""
    return laws.role_of(LAWS.get(op_packet(node)), _View(node, acts))


#: Ops whose result does not depend on their inputs' values (shapes, dtype checks): they read a
#: scaled tensor as well as the true one.
SCALE_BLIND_OPS = frozenset(p for p, law in LAWS.items() if law.blind)


def scaled_constants(node: fx.Node, role: Role, ins: tuple[str, ...], consts: Constants) -> tuple[ScaledConstant, ...]:
    """The constants :func:`apply_exponents` folds exponents into for ``node`` (the arguments
    :func:`scale_linear`, :func:`scale_tied`, :func:`scale_eps` and the embedding table rescale),
    as the solver checks them (:class:`~fp16guard.fixing.solver_model.ScaledConstant`)."""
    p = op_packet(node)

    def arg(k, in_coef: int, out_coef: int, additive: bool = False, summed: bool = False) -> list[ScaledConstant]:
        """Argument ``k`` when it is a float constant (a ``get_attr`` tensor or a number)."""
        a = node.args[k] if k is not None and k < len(node.args) else None
        if isinstance(a, fx.Node) and a.name in ins:
            return []
        value = consts.get(a)
        if value is None or isinstance(a, fx.Node) and not get_attr(consts.gm, a.target).is_floating_point():
            return []
        name = a.target if isinstance(a, fx.Node) else f"{node.name}{SCALAR_MARK}{k}"
        return [ScaledConstant.of(name, value, in_coef, out_coef, additive, summed)]

    def eps(k: int) -> ScaledConstant:
        """A norm's epsilon (ATen's defaults when absent)."""
        value = node.args[k] if k < len(node.args) else 1e-5
        value = torch.finfo(torch.float32).eps if value is None else value
        return ScaledConstant.of(f"{node.name}{SCALAR_MARK}{k}", float(value), -2, 0, True)

    out: list[ScaledConstant] = []
    if role is Role.LINEAR and p is ADDMM:
        out += arg(2, 1, -1, summed=True) + arg(0, 0, -1, True)
    elif role is Role.LINEAR and p in LINEAR_OPS:
        out += arg(1, 1, -1, summed=True) + arg(2, 0, -1, True)
    elif role is Role.LINEAR and p in NORM_OPS:
        w, b, e = NORM_OPS[p]
        out += arg(w, 0, -1) + arg(b, 0, -1, True) + [eps(e)]
    elif role is Role.LINEAR and (p in MATMUL_OPS or p is aten.mul):
        out += arg(0, 1, -1, summed=p in MATMUL_OPS) + arg(1, 1, -1, summed=p in MATMUL_OPS)
    elif role is Role.LINEAR and p is aten.div:
        out += arg(1, -1, 1)
    elif role is Role.BOUNDED and p in NORM_OPS:
        out.append(eps(NORM_OPS[p][2]))
    elif role is Role.TIED and p in TIED_SCALARS:
        for k in TIED_SCALARS[p]:
            out += arg(k, 0, -1, p in (aten.add, aten.sub))
    elif role is Role.TIED and p is aten.embedding and not ins:
        out += arg(0, 0, -1)
    return tuple(out)


def attention_ops(node: fx.Node, acts: set[str]) -> list[ScaleOp]:
    """``scaled_dot_product_attention(q, k, v, mask, scale=c)`` as the solver sees it:
    ``softmax(q k^T c + mask) v`` is linear in ``v`` (the output shares its exponent: tied), and
    ``q`` and ``k`` may hold any exponents ``a``, ``b`` once ``c`` becomes ``c 2**(a + b)``
    (:func:`apply_exponents`), so they are read by no op here (free). An activation mask is added
    to true scores: a barrier op of the same name pins it."""
    q, k, v = node.args[:3]
    ops = []
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and mask.name in acts and is_float_value(mask):
        ops.append(ScaleOp(node.name, Role.BARRIER, (mask.name,), (), module_scope(node)))
    reads = tuple(a.name for a in (v,) if isinstance(a, fx.Node) and a.name in acts)
    ops.append(ScaleOp(node.name, Role.TIED if reads else Role.BARRIER, reads, (node.name,), module_scope(node)))
    return ops
