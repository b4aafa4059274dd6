"""Choose power-of-two scale exponents for every activation so a model stays in FP16 range.

Graph-agnostic: the ONNX rewriter (:mod:`fp16guard.fixing.onnx_pass`) and the PyTorch rewriter
(:mod:`fp16guard.fixing.torch_pass`) describe their graphs as a list of :class:`ScaleOp` (each op's
:class:`Role` and its activation inputs and outputs, constants left out) and get back a
:class:`ScaleSolution`.

Convention (:mod:`fp16guard.folding`): a tensor with exponent ``e`` is stored as
``true_value * 2**-e``; ``e = 0`` is the true value.

How exponents propagate, by role:

* ``LINEAR`` (Conv, ConvTranspose, Gemm, MatMul or Mul/Div by a constant, per-channel affine maps,
  LayerNorm/InstanceNorm/GroupNorm with their affine weights): the constants absorb any input and
  any output exponent (``W' = W 2**(e_in - e_out)``, ``b' = b 2**-e_out``; a norm is invariant to
  its input scale once ``eps`` is scaled by ``2**(-2 e_in)``). A region opens and closes here with
  no extra op.
* ``TIED`` (ReLU/LeakyReLU/PReLU, max/avg pooling, Resize, Concat, Add/Sub/Max/Min, Pad with 0,
  Clip, reshapes and slices): positively homogeneous of degree one, ``f(x/F) = f(x)/F`` for
  ``F > 0``, so every activation input and output shares one exponent (constants such as a Clip
  bound or an added constant are scaled with it). A residual Add ties its two branches, so the
  identity path carries the factor exactly once.
* ``PRODUCT`` (Mul/MatMul of two activations; ``QUOTIENT``: Div): the output exponent is the sum
  (difference) of the input exponents; the inputs are free.
* ``POWER`` (``Pow`` by a constant ``c``, ``Sqrt`` (c = 1/2), ``Reciprocal`` (-1), ``rsqrt`` (-1/2),
  ``ReduceSumSquare`` (2)): homogeneous of degree ``c``, ``f(x/F) = f(x)/F**c``, so the output
  exponent is ``c`` times the input's. Decomposed LayerNorm and RMSNorm need nothing else: the
  algebra carries a region through ``Pow -> ReduceMean -> Add eps -> Sqrt -> Div``.
* ``BOUNDED`` (HardSigmoid: ``alpha`` absorbs the input exponent): input free, output at 0.
* ``LOG`` (``Log``): ``log(x/F) = log(x) - log F``, so it reads its input at any exponent ``e``
  and its output is closed exactly by adding ``e ln 2`` (``ScaleSolution.log_offsets``): the
  input is free, the output true. A power spectrum of int16-scale audio (~1e13) reaches its
  ``log`` scaled, with no FP32 island.
* ``SATURATING`` (Sigmoid, Tanh, Erf: constant to FP16 rounding beyond a bound ``B``): its input is
  read at any exponent ``k <= SATURATING_MAX_EXPONENT`` through ``Clip(-B 2^-k, B 2^-k)`` and
  ``Mul 2^k``, exact (:mod:`fp16guard.fixing.laws`); output true. ``GATED`` (SiLU, GELU, HardSwish,
  Mish: ``x * gate(x)``): the same clamp inside, output at the input's exponent (tied). Both pin
  their class softly: it is scaled only when its amax exceeds 65504 (then no rescale op is needed),
  and beyond ``SATURATING_MAX_EXPONENT`` they read true values like a barrier.
* ``BARRIER`` (exp, softmax, anything unknown): not positively homogeneous, so it needs true
  values in and gives true values out.

Algorithm. Union-find ties the activations of every ``TIED`` op into *classes*. Classes are
visited in execution order. A class that touches a ``BARRIER``, a ``BOUNDED`` output or a graph
input/output is *pinned* to 0; a class produced by a ``PRODUCT`` inherits the sum of its inputs'
exponents; every other class gets the smallest ``k >= 0`` that brings its calibration amax to
``2**target_log2`` or below (:func:`~fp16guard.folding.exponent_for`). A pinned class is scaled
only when its amax exceeds 65504 (then explicit rescale ops are unavoidable); within range it
stays unscaled and its lost margin is reported, because a rescale op costs time and the goal is an
FP16 model as fast as the naive one. Wherever an edge's exponent differs from what its consumer
expects, the solution lists a :class:`Rescale` (one multiply by a power of two).

Products and powers overflow *inside* the op (``x * x`` of stored values beyond 256 is inf in
FP16 before any rescale after it could act), so wherever a ``PRODUCT``, ``QUOTIENT`` or ``POWER``
output needs a larger exponent than its inputs give, the solution shifts the op's first input
instead (a :class:`Rescale` on that edge, ``ScaleSolution.shifts``): the op then writes its
output already at the exponent its class needs. A class derived from such an op may take a
negative exponent (stored larger than true: ``1/sqrt(var)`` of a scaled variance), as long as
its stored amax fits FP16.

Constants. Every constant an op folds exponents into (:class:`ScaledConstant`: a weight, a bias,
a norm's weight and epsilon, a tied op's clamp bound or added value) is stored scaled, and must
fit FP16 no worse than unscaled:

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
(:class:`Unfixable`), where the scaled constant is exact, and a tied op whose bound or added value
would be flushed takes the readers of that value with it (the ``Log``).

A graph input beyond FP16 is scaled (in FP32, before its cast) at the headroom target's exponent,
or, where that would store more than 0.1% of its nonzero calibration values below FP16's normal
range (``input_floor``), at the smallest exponent that keeps them normal, down to the one that just
fits 65504: the scale is exact, but the values it makes subnormal lose bits before the first layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

from fp16guard.folding import constant_range, exponent_for, pow2
from fp16guard.fp16 import FP16_MAX, FP16_MIN_NORMAL


class Role(str, Enum):
    """How an op propagates a power-of-two scale (see the module docstring)."""

    LINEAR = "linear"
    TIED = "tied"
    PRODUCT = "product"
    QUOTIENT = "quotient"
    POWER = "power"
    BOUNDED = "bounded"
    LOG = "log"
    SATURATING = "saturating"
    GATED = "gated"
    BARRIER = "barrier"


#: The largest input exponent a ``SATURATING`` or ``GATED`` op reads scaled: its stored input's
#: quantum near 0 (FP16's subnormal step 2^-24) is then 2^(k-24) <= 2^-13 in true values, which
#: moves a gate of slope <= 1.13 (erf's, the steepest) by less than FP16's rounding of its output
#: (2^-12 near 1); ``B 2^-k`` stays a normal FP16 number for every bound ``B >= 4``.
SATURATING_MAX_EXPONENT = 11


def reads_scaled(op: "ScaleOp", e: Mapping[str, int]) -> bool:
    """Whether a ``SATURATING``/``GATED`` op reads its input at its stored exponent (through the
    clamp) rather than as the true value."""
    return bool(op.inputs) and e.get(op.inputs[0], 0) <= SATURATING_MAX_EXPONENT


@dataclass(frozen=True)
class ScaleOp:
    """One op of the graph, as the solver sees it.

    Attributes:
        name: unique op name (ONNX node name, fx node name).
        role: its :class:`Role`.
        inputs: names of its *activation* inputs (constants left out), in order.
        outputs: names of its float outputs.
        scope: where it lives in the model (module path), for the plan; optional.
        degree: for ``POWER``, the exponent ``c`` of ``x**c`` (a fraction: 2, 1/2, -1, -1/2).
        constants: the constants the op folds exponents into (weights, biases, an epsilon, a clamp
            bound, an added value), so the solver keeps them in FP16's range once scaled.
    """

    name: str
    role: Role
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    scope: str = ""
    degree: Fraction = Fraction(1)
    constants: tuple["ScaledConstant", ...] = ()


@dataclass(frozen=True)
class ScaledConstant:
    """A constant of an op, as the solver sees it: stored as ``c * 2**(in_coef * e_in + out_coef * e_out)``
    once the op reads its first input at exponent ``e_in`` and writes ``e_out`` (a weight: ``(1, -1)``;
    a bias, a norm's weight, a tied op's bound or added value: ``(0, -1)``; a norm's epsilon:
    ``(-2, 0)``; the constant of ``x / c``: ``(-1, 1)``).

    Attributes:
        name: the constant (an initializer, or ``<node>#<argument>``), for the plan.
        amax: its largest magnitude.
        amin: the magnitude that must stay a normal FP16 number once scaled down (0: none): the
            RMS of its nonzero elements that FP16 holds (above 2**-25; smaller ones are flushed
            unscaled too, which :class:`~fp16guard.plan.PlanUnderflow` handles). For a scalar,
            the scalar.
        in_coef, out_coef: see above.
        additive: it is added to the values (a bias, an added constant, an epsilon) rather than
            being a value itself or multiplying one (see the module docstring, "Constants").
    """

    name: str
    amax: float
    amin: float
    in_coef: int = 0
    out_coef: int = -1
    additive: bool = False

    @classmethod
    def of(cls, name: str, value, in_coef: int = 0, out_coef: int = -1, additive: bool = False,
           summed: bool = False) -> "ScaledConstant":
        """The :class:`ScaledConstant` of a constant's value (a number or an array); ``summed``: the
        weight of a dot product (a conv's, a linear's), whose typical element may lose 2 of its 11
        bits (``amin`` is 4x its RMS, so the RMS may reach 2^-16): the subnormal rounding then adds at
        most about 4x FP16's own rounding to an incoherent sum, and less to a coherent one (an STFT
        filter matched to its tone, stored at RMS 2^-15.2 by a region at 2^-14)."""
        amax, amin = constant_range(value)
        return cls(name, amax, amin * 4 if summed else amin, in_coef, out_coef, additive)

    def exponent(self, e_in: int, e_out: int) -> int:
        """The power of two the constant is multiplied by."""
        return self.in_coef * e_in + self.out_coef * e_out

    def fault(self, s: int) -> str:
        """Why the constant scaled by ``2**s`` fits FP16 worse than unscaled (``""``: it does not),
        ignoring ``additive``: beyond 65504, or (scaled down) below FP16's normal range."""
        if s > 0 and self.amax * pow2(s) > FP16_MAX:
            return f"{self.name} x 2^{s} reaches {self.amax * pow2(s):.3g}, beyond 65504"
        if s < 0 and self.amin > 0 and self.amin * pow2(s) < FP16_MIN_NORMAL:
            return f"{self.name} x 2^{s} falls below FP16's normal range (2^-14), where it loses bits or is 0"
        return ""


@dataclass(frozen=True)
class Rescale:
    """An explicit ``x * 2**exponent`` the solver could not fold into a constant.

    Attributes:
        tensor: the value rescaled.
        exponent: multiply by ``2**exponent``.
        consumer: the op that reads the rescaled value, or ``""`` for "every reader of the op's
            output" (a ``PRODUCT`` whose exponent differs from its class) / a graph output.
        reason: why it is needed.
    """

    tensor: str
    exponent: int
    consumer: str
    reason: str


@dataclass(frozen=True)
class Region:
    """A class of tied activations stored with one exponent ``!= 0``.

    Attributes:
        exponent: stored value = true value * 2**-exponent.
        tensors: the activations, in execution order.
        ops: the ops whose outputs are among ``tensors``.
        scopes: their module scopes (deduplicated, in order).
        amax: calibration amax of the true values.
        opened_by: ops that write the region (their constants absorb the factor).
        closed_by: ops that read it and return to another exponent.
    """

    exponent: int
    tensors: tuple[str, ...]
    ops: tuple[str, ...]
    scopes: tuple[str, ...]
    amax: float
    opened_by: tuple[str, ...]
    closed_by: tuple[str, ...]

    @property
    def factor(self) -> float:
        """``2**exponent``: the true values are this many times the stored ones."""
        return pow2(self.exponent)

    @property
    def amax_after(self) -> float:
        """amax of the stored values."""
        return self.amax * pow2(-self.exponent)


@dataclass(frozen=True)
class Unfixable:
    """A value no power-of-two scale can keep in FP16 range: it needs the FP32 fallback.

    Attributes:
        tensor: the value.
        ops: the ops that must run in FP32 for it (its producer and the consumer that needs it
            unscaled).
        amax: its true amax.
        reason: one sentence.
    """

    tensor: str
    ops: tuple[str, ...]
    amax: float
    reason: str


@dataclass
class ScaleSolution:
    """What :func:`solve` returns.

    Attributes:
        exponents: tensor -> exponent, every activation (0 for most).
        regions: the classes with a nonzero exponent, in execution order.
        rescales: explicit multiplies that could not be folded.
        unfixable: values beyond reach of any scale.
        tight: ``(tensor, amax)`` of pinned classes left unscaled above the headroom target
            but within FP16 (they keep less margin than asked).
        shifts: ``op name -> s``: a ``PRODUCT``/``QUOTIENT``/``POWER`` op reads its first input at
            exponent ``e + s`` (one :class:`Rescale` by ``2**-s`` on that edge).
        log_offsets: ``op name -> e``: a ``LOG`` op reads its input at exponent ``e``; its output
            is closed by adding ``e * ln 2``.
    """

    exponents: dict[str, int] = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)
    rescales: list[Rescale] = field(default_factory=list)
    unfixable: list[Unfixable] = field(default_factory=list)
    tight: list[tuple[str, float]] = field(default_factory=list)
    shifts: dict[str, int] = field(default_factory=dict)
    log_offsets: dict[str, int] = field(default_factory=dict)

    def produced(self, op: ScaleOp) -> int:
        """Exponent at which ``op`` writes its outputs before any :class:`Rescale` (for a
        ``LINEAR`` or ``TIED`` op: the exponent of its first output)."""
        return _produced(op, self.exponents, self.shifts.get(op.name, 0))


def _produced(op: ScaleOp, e: Mapping[str, int], shift: int = 0) -> int:
    """The exponent ``op`` writes when its first input is read at ``e + shift``; for ``POWER`` the
    floor of ``degree * e_in`` (exact when :func:`_shift_for` chose the shift)."""
    if op.role is Role.GATED:  # x * gate(x) writes its input's exponent, or true values past the limit
        return e.get(op.inputs[0], 0) if reads_scaled(op, e) else 0
    if op.role in (Role.BARRIER, Role.BOUNDED, Role.LOG, Role.SATURATING):
        return 0
    # the shift applies to every read of the first input (Mul(x, x) reads it twice)
    read = [e.get(t, 0) + (shift if t == op.inputs[0] else 0) for t in op.inputs]
    if not read and op.role in DERIVED_ROLES:  # integer arithmetic (shape math): no float input
        return 0
    if op.role is Role.PRODUCT:
        return sum(read)
    if op.role is Role.QUOTIENT:
        return read[0] - sum(read[1:])
    if op.role is Role.POWER:
        return math.floor(op.degree * read[0])
    return e.get(op.outputs[0], 0) if op.outputs else 0


def _shift_for(op: ScaleOp, e: Mapping[str, int], want: int) -> int:
    """The input shift ``s`` after which ``op`` writes exactly exponent ``want``; for a ``POWER``
    whose degree cannot reach ``want`` exactly (``Sqrt`` of an odd exponent), the ``s`` that writes
    the nearest exponent at or above it (stored values at most as large as its class expects)."""
    base = _produced(op, e)
    if op.role is not Role.POWER:
        reads = op.inputs.count(op.inputs[0])
        per = reads if op.role is Role.PRODUCT else (1 if reads == 1 else 0)  # x / x is always 0
        return -((base - want) // per) if per else 0  # ceil: written at or above ``want``
    e_in = e.get(op.inputs[0], 0) if op.inputs else 0
    d = op.degree
    if d == 0:
        return 0
    exact = Fraction(want) / d - e_in
    if exact.denominator == 1:
        return int(exact)
    step = 1 if d > 0 else -1  # d > 0: a larger input exponent raises the output's; d < 0: lowers it
    s = math.ceil(exact) if d > 0 else math.floor(exact)
    while (d * (e_in + s)).denominator != 1:
        s += step
    return s


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
    return s if amax.get(out, 0.0) * pow2(-_produced(op, e, s)) <= FP16_MAX else shift


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        """The class representative of ``x`` (path halving)."""
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, items: Iterable[str]) -> None:
        """Put all ``items`` in one class."""
        items = list(items)
        for other in items[1:]:
            a, b = self.find(items[0]), self.find(other)
            if a != b:
                self.parent[b] = a


def solve(ops: Sequence[ScaleOp], amax: Mapping[str, float], *, graph_inputs: Iterable[str],
          graph_outputs: Iterable[str], target_log2: int = 13,
          input_floor: Mapping[str, float] | None = None) -> ScaleSolution:
    """Assign an exponent to every activation (see the module docstring for the rules).

    Args:
        ops: the graph's ops in execution (topological) order.
        amax: calibration amax (max |x| over every calibration input) of the true values, per
            tensor; a tensor missing here counts as 0.
        graph_inputs, graph_outputs: names of the float graph inputs and outputs (exponent 0:
            callers feed and read true values).
        target_log2: headroom target: stored magnitudes at or below ``2**target_log2``
            (default 13: 8192, 3 bits below 65504).
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
    uf = _UnionFind()
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
    sol = _complete(ops, e, graph_outputs, amax, producer, order, members, sol)
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
    return e_in, _produced(op, e)


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
        shift = _shift_for(op, e, e[op.outputs[0]])
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
                derived, power = _produced(op, e), op
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
    uf = _UnionFind()
    for op in ops:
        if op.role in (Role.TIED, Role.GATED):
            uf.union((*op.inputs, *op.outputs))
    members: dict[str, list[str]] = {}
    for t in order:
        members.setdefault(uf.find(t), []).append(t)
    sol = ScaleSolution(tight=[], shifts=dict(shifts or {}))
    return _complete(ops, e, set(graph_outputs), amax, producer, order, members, sol)


#: Roles whose output exponent follows from their inputs' (and whose first input can be shifted).
DERIVED_ROLES = (Role.PRODUCT, Role.QUOTIENT, Role.POWER)


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


def _complete(ops, e, graph_outputs, amax, producer, order, members, sol: ScaleSolution) -> ScaleSolution:
    sol.exponents = e
    for op in ops:  # a product or power writes its output at the exponent its class holds
        if op.role in DERIVED_ROLES and op.inputs and op.outputs and op.name not in sol.shifts:
            shift = _read_in_range(op, e, amax, _shift_for(op, e, e[op.outputs[0]]))
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
        produced = _produced(op, e, shift)
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

    # regions, for the plan
    consumers: dict[str, list[ScaleOp]] = {}
    for op in ops:
        for t in op.inputs:
            consumers.setdefault(t, []).append(op)
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
        sol.regions.append(Region(exp, tuple(tensors), tuple(op.name for op in ops_in), tuple(scopes),
                                  max(amax.get(t, 0.0) for t in tensors), tuple(opened), tuple(closed)))
    return sol
