"""The ONNX graph as the scale solver sees it, op by op: each node's role and power degree (one lookup
in the law table, :mod:`fp16guard.fixing.laws`, through :class:`_View`) and the constants it folds
exponents into (:func:`scaled_constants`), with the tables of ops that :mod:`fp16guard.fixing.onnx_pass`
rescales. :func:`fp16guard.fixing.onnx_pass.scale_ops` puts them together for the whole graph."""

from __future__ import annotations

from fractions import Fraction
from typing import Mapping

import onnx
from onnx import TensorProto, numpy_helper

from fp16guard.fixing import laws
from fp16guard.fixing.onnx_edit import FLOAT, node_attr
from fp16guard.fixing.solver_model import Role, ScaledConstant


#: The ONNX side of the law table (:mod:`fp16guard.fixing.laws`): op type -> row.
LAWS = laws.by_op(laws.ONNX)
#: For TIED ops: float constant inputs that scale with the activations (``None``: all of them); a
#: constant read as data at activation-dependent indices or shapes (an embedding table's Gather, a
#: broadcast Expand) scales with the output. From the law table.
TIED_CONSTANTS: dict[str, tuple[int, ...] | None] = {
    op: scaled for op, scaled in laws.constants(laws.ONNX, "scaled").items() if LAWS[op].role is Role.TIED}
_WEIGHTS, _BIASES, _EPS = (laws.constants(laws.ONNX, part) for part in ("weight", "bias", "eps"))
#: Ops with constant weights that absorb any input and output exponent: op -> (weight input,
#: bias input or None). From the law table.
LINEAR_OPS = {op: (w, _BIASES.get(op)) for op, w in _WEIGHTS.items() if op not in _EPS}
#: Norms: op -> (scale input, bias input or None); their ``epsilon`` attribute scales by ``2**(-2 e_in)``.
NORM_OPS = {op: (w, _BIASES.get(op)) for op, w in _WEIGHTS.items() if op in _EPS}


#: Ops whose outputs do not depend on their inputs' values, only on their shapes: they read a
#: scaled tensor as well as the true one.
SCALE_BLIND_OPS = laws.ops_where(laws.ONNX, blind=True)


def scaled_constants(node: onnx.NodeProto, role: Role, acts: tuple[str, ...], values: Mapping[str, onnx.TensorProto],
                      arrays: dict[str, ScaledConstant]) -> tuple[ScaledConstant, ...]:
    """The constants :func:`fp16guard.fixing.onnx_pass.apply_exponents` folds exponents into for
    ``node`` (as :func:`fp16guard.fixing.onnx_exponents.scale_op_constants` picks them), as the solver
    checks them (:class:`~fp16guard.fixing.solver_model.ScaledConstant`); ``arrays`` caches them by
    (initializer, coefficients)."""
    t = node.op_type

    def init(k: int, in_coef: int, out_coef: int, additive: bool = False, summed: bool = False) -> list[ScaledConstant]:
        """Input ``k`` of ``node`` when it is a float initializer."""
        name = node.input[k] if k is not None and k < len(node.input) else ""
        if name not in values or values[name].data_type not in (FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            return []
        key = f"{name}|{in_coef}|{out_coef}|{additive}|{summed}"
        if key not in arrays:
            arrays[key] = ScaledConstant.of(name, numpy_helper.to_array(values[name]), in_coef, out_coef, additive,
                                            summed)
        return [arrays[key]]

    out: list[ScaledConstant] = []
    if role is Role.LINEAR and t in NORM_OPS:
        out += init(NORM_OPS[t][0], 0, -1) + init(NORM_OPS[t][1], 0, -1, True)
        out.append(ScaledConstant.of(f"{node.name}.epsilon", float(node_attr(node, "epsilon", 1e-5)), -2, 0, True))
    elif role is Role.LINEAR and t in LINEAR_OPS:
        w, b = LINEAR_OPS[t]
        out += init(0 if t == "MatMul" and node.input[0] in values else w, 1, -1, summed=True) + init(b, 0, -1, True)
    elif role is Role.LINEAR and t in ("Mul", "Div"):
        k = [i for i, x in enumerate(node.input) if x not in acts][:1]
        out += init(k[0], 1, -1) if t == "Mul" and k else init(k[0], -1, 1) if k else []
    elif role is Role.BOUNDED and t == "HardSigmoid":
        out.append(ScaledConstant.of(f"{node.name}.alpha", float(node_attr(node, "alpha", 0.2)), 1, 0))
    elif role is Role.TIED and t in TIED_CONSTANTS:
        wanted, additive = TIED_CONSTANTS[t], t in ("Add", "Sub", "Sum", "Mean")
        for k, x in enumerate(node.input):
            if x and x not in acts and (wanted is None or k in wanted):
                out += init(k, 0, -1, additive)
        for a in ("min", "max") if t == "Clip" else ():
            if node_attr(node, a) is not None:
                out.append(ScaledConstant.of(f"{node.name}.{a}", float(node_attr(node, a)), 0, -1))
    return tuple(out)


class _View:
    """A node as the law table's predicates read it (:class:`fp16guard.fixing.laws.OpView`)."""

    frontend = laws.ONNX

    def __init__(self, node: onnx.NodeProto, acts: tuple[str, ...], values: Mapping[str, onnx.TensorProto],
                 types: Mapping[str, int]):
        self.node, self.acts, self.values, self.types = node, acts, values, types
        self.reads = len(acts)

    def _input(self, i: int) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def is_act(self, i: int) -> bool:
        """See :meth:`~fp16guard.fixing.laws.OpView.is_act`."""
        return bool(self._input(i)) and self._input(i) in self.acts

    def is_const(self, i: int) -> bool:
        """An initializer (the passes rescale initializers only)."""
        return self._input(i) in self.values

    def absent(self, i: int) -> bool:
        """See :meth:`~fp16guard.fixing.laws.OpView.absent`."""
        return not self._input(i)

    def scalar(self, i: int) -> float | None:
        """See :meth:`~fp16guard.fixing.laws.OpView.scalar`."""
        if not self.is_const(i):
            return None
        c = numpy_helper.to_array(self.values[self._input(i)])
        return float(c.reshape(-1)[0]) if c.size == 1 else None

    def attr(self, name: str):
        """See :meth:`~fp16guard.fixing.laws.OpView.attr`."""
        value = node_attr(self.node, name)
        return value.decode() if isinstance(value, bytes) else value

    def is_float_dtype(self, dtype) -> bool:
        """See :meth:`~fp16guard.fixing.laws.OpView.is_float_dtype`."""
        return dtype in (FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)

    def writes_float(self) -> bool | None:
        """See :meth:`~fp16guard.fixing.laws.OpView.writes_float`."""
        t = self.types.get(self.node.output[0]) if self.node.output else None
        return None if not t else self.is_float_dtype(t)


def op_role(node: onnx.NodeProto, acts: tuple[str, ...], values: Mapping[str, onnx.TensorProto],
          types: Mapping[str, int]) -> tuple[Role, Fraction]:
    """The node's role and power degree: one lookup in the law table (:func:`fp16guard.fixing.laws.role_of`);
    an op of another domain, or one the table lacks, is a barrier."""
    if node.domain not in ("", "ai.onnx"):
        return Role.BARRIER, Fraction(1)
    return laws.role_of(LAWS.get(node.op_type), _View(node, acts, values, types))
