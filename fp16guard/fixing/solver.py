"""Choose power-of-two scale exponents for every activation so a model stays in FP16 range.

Graph-agnostic: the ONNX rewriter (:mod:`fp16guard.fixing.onnx_pass`) and the PyTorch rewriter
(:mod:`fp16guard.fixing.torch_pass`) describe their graphs as a list of
:class:`~fp16guard.fixing.solver_model.ScaleOp` (each op's role and its activation inputs and
outputs, constants left out; the roles and their laws are :mod:`fp16guard.fixing.solver_model`) and
get back a :class:`~fp16guard.fixing.solver_model.ScaleSolution`: :func:`solve` chooses the
exponents, :func:`complete` takes exponents chosen elsewhere (a plan); both end in
:func:`fp16guard.fixing.solver_completion.complete_solution` (shifts, rescales, range check, regions).

Algorithm. Union-find ties the activations of every ``TIED`` op into *classes*. Classes are
visited in execution order. A class that touches a ``BARRIER``, a ``BOUNDED`` output or a graph
input/output is *pinned* to 0; a class produced by a ``PRODUCT`` inherits the sum of its inputs'
exponents; every other class gets the smallest ``k >= 0`` that brings its calibration amax to
``2**target_log2`` or below (:func:`~fp16guard.folding.exponent_for`). A pinned class is scaled
only when its amax exceeds 65504 (then explicit rescale ops are unavoidable); within range it
stays unscaled and its lost margin is reported, because a rescale op costs time and the goal is an
FP16 model as fast as the naive one. Wherever an edge's exponent differs from what its consumer
expects, the solution lists a :class:`~fp16guard.fixing.solver_model.Rescale` (one multiply by a
power of two).

Constants. Every constant an op folds exponents into
(:class:`~fp16guard.fixing.solver_model.ScaledConstant`: a weight, a bias, a norm's weight and
epsilon, a tied op's clamp bound or added value) is stored scaled, and must fit FP16 no worse than
unscaled:

* never beyond 65504 (EfficientNetV2's ``conv2d_109`` weight closing a region at 2^7 would be);
* a value or a multiplier (a clamp bound, ``x * c``, a norm's weight; for a tensor the RMS of its
  elements) never scaled below FP16's normal range (2^-14), nor scaled down at all when it is
  subnormal already: ``clamp(x, min=2^-23)`` in a region at 2^-11 would be 2^-34, which FP16
  flushes to 0, and the ``log`` after it gives -inf where ``x = 0``. The weight of a dot product
  (a conv's, a linear's) may go 2 bits lower (RMS 2^-16): a dot product of subnormal weights is
  off by about ``2**-25 / rms`` relative, FP16's own ``2**-11`` at ``rms = 2**-14``, and a
  coherent one (an STFT filter on its tone) by less;
* an added constant (a bias, an epsilon) may be flushed: its error, below 2^-24 of the stored
  values, is negligible against the values it is added to (``var + 1e-5`` of a variance stored at
  2^-12) except where they reach 0 and the sum reaches a ``Log`` (``log(x + 1e-7)``), where it
  counts as a value. A constant FP16 flushes unscaled too (BERT's ``1e-12``) is left to
  :class:`~fp16guard.plan.PlanUnderflow`.

Where a constant does not fit, the class that may move (a free class, or a pinned one beyond FP16
whose rescales are explicit anyway) takes the nearest exponent that fits it and still fits its own
values in 65504 (less headroom, never inf); where no such exponent exists, the op runs in FP32
(:class:`~fp16guard.fixing.solver_model.Unfixable`), where the scaled constant is exact, and a tied
op whose bound or added value would be flushed takes the readers of that value with it (the ``Log``).

A graph input beyond FP16 is scaled (in FP32, before its cast) at the headroom target's exponent,
or, where that would store more than 0.1% of its nonzero calibration values below FP16's normal
range (``input_floor``), at the smallest exponent that keeps them normal, down to the one that just
fits 65504: the scale is exact, but the values it makes subnormal lose bits before the first layer.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

from fp16guard.fixing.solver_completion import complete_solution
from fp16guard.fixing.solver_model import (
    DERIVED_ROLES,
    Role,
    ScaledConstant,
    ScaleOp,
    ScaleSolution,
    UnionFind,
    Unfixable,
    produced_exponent,
    shift_for,
)
from fp16guard.folding import exponent_for, pow2
from fp16guard.fp16 import FP16_MAX, FP16_MIN_NORMAL
from fp16guard.plan import DEFAULT_TARGET_LOG2


def solve(ops: Sequence[ScaleOp], amax: Mapping[str, float], *, graph_inputs: Iterable[str],
          graph_outputs: Iterable[str], target_log2: int = DEFAULT_TARGET_LOG2,
          input_floor: Mapping[str, float] | None = None) -> ScaleSolution:
    """Assign an exponent to every activation (see the module docstring for the rules).

    Args:
        ops: the graph's ops in execution (topological) order.
        amax: calibration amax (max |x| over every calibration input) of the true values, per
            tensor; a tensor missing here counts as 0.
        graph_inputs, graph_outputs: names of the float graph inputs and outputs (exponent 0:
            callers feed and read true values).
        target_log2: headroom target: stored magnitudes at or below ``2**target_log2``
            (default :data:`~fp16guard.plan.DEFAULT_TARGET_LOG2`, 13: 8192, 3 bits below 65504).
        input_floor: per graph input, the small magnitude its scale should keep a normal FP16
            number (a low quantile of its nonzero calibration values): a graph input beyond FP16
            is then scaled no more than that needs, down to the exponent that just fits 65504.

    Returns:
        A :class:`ScaleSolution`.

    Raises:
        ValueError: two ops write the same tensor, or a calibration amax is inf/NaN (the FP32
            model itself overflows: fix that first).
    """
    graph_inputs, graph_outputs = list(graph_inputs), set(graph_outputs)
    uf = UnionFind()
    order: list[str] = []
    producer: dict[str, ScaleOp] = {}
    for t in graph_inputs:
        uf.find(t)
        order.append(t)
    for op in ops:
        for t in (*op.inputs, *op.outputs):
            uf.find(t)
        for t in op.outputs:
            if t in producer:
                raise ValueError(f"{t!r} is written by both {producer[t].name!r} and {op.name!r}")
            producer[t] = op
            order.append(t)
        if op.role in (Role.TIED, Role.GATED):
            uf.union((*op.inputs, *op.outputs))
    for t, a in amax.items():
        if not math.isfinite(a):
            raise ValueError(f"calibration amax of {t!r} is {a}: the FP32 model itself overflows there")

    pinned: set[str] = {uf.find(t) for t in (*graph_inputs, *graph_outputs)}
    for op in ops:  # saturating and gated ops pin softly: their class is scaled beyond 65504 with no op added
        if op.role in (Role.BARRIER, Role.SATURATING, Role.GATED):
            pinned.update(uf.find(t) for t in (*op.inputs, *op.outputs))
        elif op.role in (Role.BOUNDED, Role.LOG):
            pinned.update(uf.find(t) for t in op.outputs)

    members: dict[str, list[str]] = {}
    for t in order:
        members.setdefault(uf.find(t), []).append(t)
    for t in uf.parent:  # tensors read but never written (e.g. a free graph input) keep order too
        if t not in producer and t not in graph_inputs:
            members.setdefault(uf.find(t), []).insert(0, t)
            order.insert(0, t)

    # Assign classes in execution order; then, where a product or power would need its input
    # shifted (one extra Mul), raise the input's class instead when that class is free (its
    # exponent was chosen for its own range, nothing pins or derives it): its producer's constants
    # absorb the larger factor at no cost. Repeat until nothing moves (each round only raises).
    # Then keep every op's constants in FP16 once scaled ("Constants" in the module docstring):
    # bound the exponent of a class that may move (floors and ceilings), and what no bound can fix
    # runs in FP32 (_constant_islands).
    floors: dict[str, int] = {}
    ceilings = _input_ceilings(graph_inputs, uf, members, amax, input_floor or {}, target_log2)
    log_read = {uf.find(t) for op in ops if op.role is Role.LOG for t in op.inputs}
    for _ in range(16):
        sol = ScaleSolution()
        e, free, movable = _assign(members, producer, pinned, amax, target_log2, floors, sol, ceilings)
        if _raise_free_inputs(ops, e, free, uf, members, amax, floors, ceilings):
            continue
        if not _bound_for_constants(ops, e, movable, uf, members, amax, floors, ceilings, log_read):
            break
    sol = complete_solution(ops, e, graph_outputs, amax, producer, order, members, sol)
    sol.unfixable += _constant_islands(ops, e, uf, log_read, amax)
    return sol


def _fit(class_amax: float) -> float:
    """The smallest exponent at which a class of ``class_amax`` fits FP16 (``-inf`` for an all-zero one)."""
    if class_amax <= 0:
        return -math.inf
    k = math.ceil(math.log2(class_amax / FP16_MAX))
    while class_amax * pow2(-k) > FP16_MAX:
        k += 1
    while class_amax * pow2(-(k - 1)) <= FP16_MAX:
        k -= 1
    return k


def _input_ceilings(graph_inputs, uf, members, amax, input_floor, target_log2) -> dict[str, int]:
    """Ceilings for the classes of graph inputs beyond FP16: the largest exponent that keeps the
    input's small magnitudes (``input_floor``) normal FP16 numbers, no smaller than the one that
    just fits 65504. The scale then costs headroom (inputs up to 8x louder than calibration) only
    where the headroom target would store calibration values subnormal: a power spectrum spanning
    2^37 keeps 3 more bits of its quiet frames at 2^-14 than at 2^-17."""
    out: dict[str, int] = {}
    for t in graph_inputs:
        root = uf.find(t)
        class_amax = max((amax.get(x, 0.0) for x in members.get(root, [t])), default=0.0)
        small = input_floor.get(t, 0.0)
        if class_amax <= FP16_MAX or small <= 0:
            continue
        keep = math.floor(math.log2(small / FP16_MIN_NORMAL))
        while small * pow2(-keep) < FP16_MIN_NORMAL:
            keep -= 1
        if keep < exponent_for(class_amax, target_log2):
            out[root] = min(out.get(root, math.inf), max(int(_fit(class_amax)), keep))
    return out


def _constant_window(c: ScaledConstant, matters: bool) -> tuple[float, float]:
    """``(lo, hi)``: the exponents ``s`` by which ``c`` may be scaled (``c.fault(s)`` is empty), the
    lower bound only where its underflow ``matters``."""
    lo, hi = -math.inf, math.inf
    if c.amax > 0:
        hi = max(0, math.floor(math.log2(FP16_MAX / c.amax)))
        while hi > 0 and c.amax * pow2(hi) > FP16_MAX:
            hi -= 1
    if matters and c.amin > 0:
        lo = min(0, math.ceil(math.log2(FP16_MIN_NORMAL / c.amin)))
        while lo < 0 and c.amin * pow2(lo) < FP16_MIN_NORMAL:
            lo += 1
    return lo, hi


def _matters(c: ScaledConstant, op: ScaleOp, uf, log_read) -> bool:
    """Whether ``c`` must stay a normal FP16 number when scaled down: a value or a multiplier always;
    an added constant (a bias, an epsilon) only where its sum reaches a ``Log`` (``log(x + 1e-7)``
    with ``x = 0``), and elsewhere it is negligible against the values it is added to."""
    return not c.additive or any(uf.find(t) in log_read for t in op.outputs)


def _constant_terms(op: ScaleOp, e: Mapping[str, int], uf) -> list[tuple[str, int, int]]:
    """How the exponent ``s`` of ``op``'s constants depends on each activation class:
    ``[(root, in_weight, out_weight)]`` with ``s = in_coef * e_in + out_coef * e_out`` and
    ``e_in``/``e_out`` the exponents of ``op``'s first input and output."""
    if op.role is Role.TIED:
        t = (op.inputs or op.outputs or ("",))[0]
        return [(uf.find(t), 1, 1)] if t else []
    terms: dict[str, tuple[int, int]] = {}
    if op.inputs:
        terms[uf.find(op.inputs[0])] = (1, 0)
    if op.outputs and op.role is Role.LINEAR:  # a residual may tie the output to the input
        w_in, _ = terms.get(uf.find(op.outputs[0]), (0, 0))
        terms[uf.find(op.outputs[0])] = (w_in, 1)
    return [(root, w_in, w_out) for root, (w_in, w_out) in terms.items()]


def _op_exponents(op: ScaleOp, e: Mapping[str, int]) -> tuple[int, int]:
    """``(e_in, e_out)`` the frontends fold into ``op``'s constants (a tied op: its class's, twice)."""
    if op.role is Role.TIED:
        x = e.get((op.inputs or op.outputs or ("",))[0], 0)
        return x, x
    e_in = e.get(op.inputs[0], 0) if op.inputs else 0
    return e_in, produced_exponent(op, e)


def _integer_range(a: int, rest: int, lo: float, hi: float) -> tuple[float, float]:
    """The integers ``x`` with ``lo <= a * x + rest <= hi`` (``a != 0``) as ``(x_lo, x_hi)``; bounds may be infinite."""
    def over(v: float) -> float:
        """``(v - rest) / a``, exact where finite."""
        return Fraction(int(v) - rest, a) if math.isfinite(v) else (v if a > 0 else -v)
    first, second = (over(lo), over(hi)) if a > 0 else (over(hi), over(lo))
    return (math.ceil(first) if math.isfinite(first) else first), (math.floor(second) if math.isfinite(second) else second)


def _bound_for_constants(ops, e, movable, uf, members, amax, floors, ceilings, log_read) -> bool:
    """Bound the exponent of a class that may move (free, or pinned beyond FP16) so that a constant
    scaled out of FP16's range at the current exponents fits again; True when a bound moved."""
    moved = False
    for op in ops:
        if not op.constants or op.role not in (Role.LINEAR, Role.TIED, Role.BOUNDED):
            continue
        e_in, e_out = _op_exponents(op, e)
        for c in op.constants:
            matters = _matters(c, op, uf, log_read)
            lo, hi = _constant_window(c, matters)
            s = c.exponent(e_in, e_out)
            if lo <= s <= hi:
                continue
            for root, w_in, w_out in _constant_terms(op, e, uf):
                a = c.in_coef * w_in + c.out_coef * w_out  # s = a * x + rest, x the class's exponent
                if not a or root not in movable:
                    continue
                x = e[members[root][0]]
                x_lo, x_hi = _integer_range(a, s - a * x, lo, hi)
                # a floor is a preference (a product's input raised to spare a shift): a ceiling
                # overrides it in _assign; floors only rise and ceilings only fall, so this ends
                class_amax = max((amax.get(t, 0.0) for t in members[root]), default=0.0)
                x_lo = max(x_lo, _fit(class_amax))
                x_hi = min(x_hi, ceilings.get(root, math.inf))
                if x_lo > x_hi or x_lo <= x <= x_hi:
                    continue
                if x > x_hi:
                    ceilings[root] = int(x_hi)
                else:
                    floors[root] = max(floors.get(root, int(x_lo)), int(x_lo))
                moved = True
                break
    return moved


def _constant_islands(ops, e, uf, log_read, amax) -> list[Unfixable]:
    """The ops whose constants no exponent their classes allow keeps in FP16 (:func:`_bound_for_constants`
    found none): they run in FP32, where the scaled constant is exact. A tied op whose bound or
    added value would be flushed writes that value into its output (``clamp(x, 2^-23)`` at 2^-11
    is 0 in FP16, and the ``Log`` after it -inf), so its readers join it, through tied ops, up
    to the first op that does not carry the value (the ``Log``)."""
    readers: dict[str, list[ScaleOp]] = {}
    for op in ops:
        for t in dict.fromkeys(op.inputs):
            readers.setdefault(t, []).append(op)
    out = []
    for op in ops:
        if not op.constants or op.role not in (Role.LINEAR, Role.TIED, Role.BOUNDED):
            continue
        e_in, e_out = _op_exponents(op, e)
        for c in op.constants:
            s = c.exponent(e_in, e_out)
            lo, hi = _constant_window(c, _matters(c, op, uf, log_read))
            if lo <= s <= hi:
                continue
            island = [op.name]
            if s < lo and op.role is Role.TIED:
                todo = [r for t in op.outputs for r in readers.get(t, [])]
                while todo:
                    r = todo.pop(0)
                    if r.name not in island:
                        island.append(r.name)
                        todo += [x for t in r.outputs for x in readers.get(t, [])] if r.role is Role.TIED else []
            t = (op.outputs or (c.name,))[0]
            out.append(Unfixable(t, tuple(island), amax.get(t, c.amax),
                                 f"{op.name}: {c.fault(s)} at exponents {e_in}/{e_out}, and no exponent its "
                                 f"region allows keeps it in FP16: it runs in FP32, where the scaled constant is exact"))
            break
    return out


def _raise_free_inputs(ops, e, free, uf, members, amax, floors, ceilings=None) -> bool:
    """Raise the floor of each free class whose value a product or power would otherwise read
    through a shift (or, for ``Sqrt``, at an odd exponent); True when a floor moved."""
    raised = False
    for op in ops:
        if op.role not in DERIVED_ROLES or not op.inputs or not op.outputs:
            continue
        shift = shift_for(op, e, e[op.outputs[0]])
        if op.role is Role.POWER and (op.degree * e[op.inputs[0]]).denominator != 1:
            shift = 1  # Sqrt of an odd exponent: raise the input to the next even one
            while (op.degree * (e[op.inputs[0]] + shift)).denominator != 1:
                shift += 1
        root = uf.find(op.inputs[0])
        raised_to = e[op.inputs[0]] + shift
        # not into FP16's tiny range, for any member: a residual stream ties the embeddings (~1) to
        # the layers that grew (~1e5), and raising it for the latter would store the former subnormal
        smallest = min((a for a in (amax.get(t, 0.0) for t in members[root]) if a > 0), default=0.0)
        if raised_to > (ceilings or {}).get(root, raised_to):
            continue  # a constant of the class caps its exponent (_bound_for_constants)
        if shift > 0 and root in free and smallest * pow2(-raised_to) >= pow2(-FP16_SPAN // 2):
            floors[root] = raised_to
            raised = True
    return raised


def _assign(members, producer, pinned, amax, target_log2, floors, sol,
            ceilings=None) -> tuple[dict[str, int], set[str], set[str]]:
    """One pass of class exponents in execution order (see :func:`solve`): ``(exponents, free
    classes, movable classes)``; ``floors`` and ``ceilings`` bound the classes that may move (free
    ones, and pinned ones beyond FP16, whose rescales are explicit anyway)."""
    e: dict[str, int] = {}
    free: set[str] = set()
    movable: set[str] = set()
    ceilings = ceilings or {}
    for root, tensors in members.items():
        class_amax = max((amax.get(t, 0.0) for t in tensors), default=0.0)
        need = exponent_for(class_amax, target_log2)
        derived, power = None, None
        for t in tensors:
            op = producer.get(t)
            if op is not None and op.role in DERIVED_ROLES and all(x in e for x in op.inputs):
                derived, power = produced_exponent(op, e), op
                break
        if root in pinned:
            exp = need if class_amax > FP16_MAX else 0
            if class_amax > FP16_MAX:
                exp = min(max(need, floors.get(root, need)), ceilings.get(root, need))
                movable.add(root)
            if exp == 0 and need > 0:
                sol.tight.append((max(tensors, key=lambda t: amax.get(t, 0.0)), class_amax))
        elif derived is not None and _fits(class_amax, derived, need, target_log2):
            exp = derived
        elif derived is not None and power.role is Role.POWER and power.degree.denominator == 1 and power.degree > 0:
            d = int(power.degree)
            exp = -(-need // d) * d  # a multiple of the degree: reachable by shifting the input alone
        else:
            exp = min(max(need, floors.get(root, need)), ceilings.get(root, math.inf))
            free.add(root)
            movable.add(root)
        for t in tensors:
            e[t] = exp
    return e, free, movable


#: A derived class keeps its stored amax at or above ``2**(target_log2 - FP16_SPAN)``: FP16 holds
#: about 30 binades (2**-24 .. 2**15), and a class stored far below its headroom target loses its
#: small values to subnormals (T5's RMSNorm variance in early layers, ~1, read at the exponent the
#: last layers' ~1e8 needs).
FP16_SPAN = 14


def _fits(class_amax: float, exp: int, need: int, target_log2: int) -> bool:
    """Whether a class of ``class_amax`` may be stored at exponent ``exp`` that its producer
    derives: within FP16, and no lower than ``2**(target_log2 - FP16_SPAN)`` unless ``exp`` is at
    most the class's own exponent ``need`` (stored no smaller than unscaled would be)."""
    stored = class_amax * pow2(-exp)
    return stored <= FP16_MAX and (exp <= need or stored >= pow2(target_log2 - FP16_SPAN))


def complete(ops: Sequence[ScaleOp], exponents: Mapping[str, int], *, graph_outputs: Iterable[str],
             amax: Mapping[str, float] | None = None, shifts: Mapping[str, int] | None = None) -> ScaleSolution:
    """The :class:`ScaleSolution` for exponents chosen elsewhere (a plan): rescales, regions and,
    given ``amax``, the range check.

    Args:
        ops: the graph's ops in execution order.
        exponents: tensor -> exponent; tensors not listed get 0.
        graph_outputs: float graph outputs.
        amax: calibration amax per tensor (optional; without it nothing is range-checked).
        shifts: ``op name -> s`` for the products and powers whose input shift is given (a plan's
            rescale ops); the others get the shift that writes their class's exponent.

    Raises:
        ValueError: two values tied by a scale-equivariant op have different exponents.
    """
    amax = amax or {}
    producer = {t: op for op in ops for t in op.outputs}
    order = list(dict.fromkeys(t for op in ops for t in (*op.inputs, *op.outputs)))
    e = {t: int(exponents.get(t, 0)) for t in order}
    for op in ops:
        if op.role in (Role.TIED, Role.GATED):
            tied = {t: e[t] for t in (*op.inputs, *op.outputs)}
            if len(set(tied.values())) > 1:
                raise ValueError(f"{op.name} is scale-equivariant, so its activations need one exponent, "
                                 f"but the plan gives {tied}")
    uf = UnionFind()
    for op in ops:
        if op.role in (Role.TIED, Role.GATED):
            uf.union((*op.inputs, *op.outputs))
    members: dict[str, list[str]] = {}
    for t in order:
        members.setdefault(uf.find(t), []).append(t)
    sol = ScaleSolution(tight=[], shifts=dict(shifts or {}))
    return complete_solution(ops, e, set(graph_outputs), amax, producer, order, members, sol)
