"""A scale solution completed from its exponents: the input shifts of products and powers, the
explicit :class:`~fp16guard.fixing.solver_model.Rescale` s wherever an edge cannot absorb an exponent,
the range check (:class:`~fp16guard.fixing.solver_model.Unfixable` values) and the regions of the plan.
Both :func:`fp16guard.fixing.solver.solve` and :func:`fp16guard.fixing.solver.complete` (exponents
chosen elsewhere, a plan's) end here.

Products and powers overflow *inside* the op (``x * x`` of stored values beyond 256 is inf in
FP16 before any rescale after it could act), so wherever a ``PRODUCT``, ``QUOTIENT`` or ``POWER``
output needs a larger exponent than its inputs give, the solution shifts the op's first input
instead (a :class:`Rescale` on that edge, ``ScaleSolution.shifts``): the op then writes its
output already at the exponent its class needs. A class derived from such an op may take a
negative exponent (stored larger than true: ``1/sqrt(var)`` of a scaled variance), as long as
its stored amax fits FP16.
"""

from __future__ import annotations

from typing import Mapping

from fp16guard.fixing.solver_model import (
    DERIVED_ROLES,
    SATURATING_MAX_EXPONENT,
    Region,
    Rescale,
    Role,
    ScaleOp,
    ScaleSolution,
    Unfixable,
    produced_exponent,
    reads_scaled,
    shift_for,
)
from fp16guard.folding import pow2
from fp16guard.fp16 import FP16_MAX


def _read_in_range(op: ScaleOp, e: Mapping[str, int], amax: Mapping[str, float], shift: int) -> int:
    """``shift``, or a larger one when reading ``op``'s first input at ``e + shift`` would overflow
    FP16 (``sqrt`` of a sum of squares whose result is a graph output): the op then reads its input
    in range, writes a smaller exponent, and one rescale after it restores its class's (a
    ``POWER`` of degree below 1 shrinks the value, so the rescale after it fits where the read
    before it did not)."""
    x = op.inputs[0]
    read = amax.get(x, 0.0) * pow2(-(e.get(x, 0) + shift))
    if read <= FP16_MAX or op.role is not Role.POWER or not 0 < op.degree < 1:
        return shift
    s = shift
    while amax.get(x, 0.0) * pow2(-(e.get(x, 0) + s)) > FP16_MAX or (op.degree * (e.get(x, 0) + s)).denominator != 1:
        s += 1
    out = op.outputs[0]
    return s if amax.get(out, 0.0) * pow2(-produced_exponent(op, e, s)) <= FP16_MAX else shift


def _needs_true(op: ScaleOp) -> str:
    """Why ``op`` reads its input's true value (a :class:`Rescale`'s reason)."""
    if op.role is Role.BARRIER:
        return f"{op.name} is not scale-equivariant: it needs the true value"
    return (f"{op.name} ({op.role.value}) reads at most exponent {SATURATING_MAX_EXPONENT} through its clamp: "
            f"it needs the true value")


def _output_reason(t: str, exponent: int, true_amax: float) -> str:
    """Why a graph output gets an explicit rescale; said plainly when its true values exceed FP16."""
    if true_amax <= FP16_MAX:
        return "graph outputs hold true values"
    return (f"graph outputs hold true values; {t} reaches {true_amax:.4g}, beyond FP16: it is computed at "
            f"2^-{exponent} in FP16 and restored after the cast to the FP32 graph output (an engine whose outputs "
            f"are FP16 cannot hold it)")


def complete_solution(ops, e, graph_outputs, amax, producer, order, members, sol: ScaleSolution) -> ScaleSolution:
    """Fill ``sol`` for the exponents ``e`` (tensor -> exponent; ``order``: tensors in execution
    order; ``members``: class root -> its tensors; ``producer``: tensor -> op): the shifts not
    given yet, the rescales, the values beyond FP16 and the regions. Returns ``sol``."""
    sol.exponents = e
    for op in ops:  # a product or power writes its output at the exponent its class holds
        if op.role in DERIVED_ROLES and op.inputs and op.outputs and op.name not in sol.shifts:
            shift = _read_in_range(op, e, amax, shift_for(op, e, e[op.outputs[0]]))
            if shift:
                sol.shifts[op.name] = shift
    # explicit rescales where an edge cannot absorb the exponent
    seen: set[tuple[str, int, str]] = set()

    def add(tensor: str, exponent: int, consumer: str, reason: str) -> None:
        """Record a :class:`Rescale` once (none for exponent 0)."""
        key = (tensor, exponent, consumer)
        if exponent and key not in seen:
            seen.add(key)
            sol.rescales.append(Rescale(tensor, exponent, consumer, reason))

    for op in ops:
        shift = sol.shifts.get(op.name, 0)
        if shift:
            add(op.inputs[0], -shift, op.name, f"{op.name} ({op.role.value}) reads it at exponent "
                                               f"{e[op.inputs[0]] + shift}, so it writes the exponent of its output")
        produced = produced_exponent(op, e, shift)
        if op.role is Role.LOG and op.inputs and e.get(op.inputs[0], 0):
            sol.log_offsets[op.name] = e[op.inputs[0]]
        if op.role in (*DERIVED_ROLES, Role.BOUNDED, Role.LOG, Role.SATURATING, Role.GATED, Role.BARRIER):
            for t in op.outputs:
                add(t, produced - e[t], "", f"{op.name} ({op.role.value}) writes exponent {produced}, "
                                            f"its readers expect {e[t]}")
                written = amax.get(t, 0.0) * pow2(-produced)
                if produced != e[t] and written > FP16_MAX:  # beyond FP16 before the rescale after it
                    sol.unfixable.append(Unfixable(t, (op.name,), amax[t], f"{op.name} writes it at exponent "
                                                   f"{produced} (amax {written:.4g}), beyond FP16, before "
                                                   f"it is rescaled"))
        if op.role is Role.BARRIER or op.role in (Role.SATURATING, Role.GATED) and not reads_scaled(op, e):
            for t in op.inputs:
                add(t, e[t], op.name, _needs_true(op))
    for t in graph_outputs:
        if e.get(t, 0):
            add(t, e[t], "", _output_reason(t, e[t], amax.get(t, 0.0)))
    for t in order:  # a graph input beyond FP16: scaled once, in FP32, before the input cast
        if t not in producer and e.get(t, 0):
            add(t, -e[t], "", "graph inputs hold true values: scaled in FP32 before the cast to FP16")

    # range check: stored values, and true values wherever a consumer needs them unscaled
    for t in order:
        a = amax.get(t, 0.0)
        if a * pow2(-e.get(t, 0)) > FP16_MAX:
            op = producer.get(t)
            sol.unfixable.append(Unfixable(t, (op.name,) if op else (), a,
                                           f"stored amax {a * pow2(-e[t]):.4g} still exceeds 65504"))
    for r in sol.rescales:  # the value as the consumer reads it: stored * 2**exponent
        read = amax.get(r.tensor, 0.0) * pow2(r.exponent - e.get(r.tensor, 0))
        if r.consumer and read > FP16_MAX:
            op = producer.get(r.tensor)
            what = "the true value" if r.exponent == e.get(r.tensor, 0) else "it at a smaller scale"
            sol.unfixable.append(Unfixable(r.tensor, tuple(x for x in (op.name if op else "", r.consumer) if x),
                                           amax[r.tensor], f"{r.consumer} needs {what} (amax {read:.4g}), "
                                           f"beyond FP16"))
    sol.regions.extend(_regions(ops, e, amax, producer, members))
    return sol


def _regions(ops, e, amax, producer, members) -> list[Region]:
    """The classes with a nonzero exponent, for the plan: their ops, scopes, amax, and the ops that
    open and close them."""
    consumers: dict[str, list[ScaleOp]] = {}
    for op in ops:
        for t in op.inputs:
            consumers.setdefault(t, []).append(op)
    regions = []
    for root, tensors in members.items():
        exp = e[tensors[0]]
        if not exp:
            continue
        ops_in = [producer[t] for t in tensors if t in producer]
        opened = [op.name for op in ops_in if op.role not in (Role.TIED, Role.GATED)]
        closed = []
        for t in tensors:
            for op in consumers.get(t, []):
                if op.role not in (Role.TIED, Role.GATED) and op.name not in closed:
                    closed.append(op.name)
        scopes = list(dict.fromkeys(op.scope for op in ops_in if op.scope))
        regions.append(Region(exp, tuple(tensors), tuple(op.name for op in ops_in), tuple(scopes),
                              max(amax.get(t, 0.0) for t in tensors), tuple(opened), tuple(closed)))
    return regions
