"""The model the scale solver works on: how each op propagates a power-of-two scale (its
:class:`Role`), the graph as :class:`ScaleOp` s with the :class:`ScaledConstant` s they fold exponents
into, and the parts of a :class:`ScaleSolution` (:class:`Rescale`, :class:`Region`,
:class:`Unfixable`), with the algebra of what an op writes (:func:`produced_exponent`,
:func:`shift_for`). The solve itself is :mod:`fp16guard.fixing.solver`.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction
from typing import Iterable, Mapping

from fp16guard.folding import constant_range, pow2
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
        return produced_exponent(op, self.exponents, self.shifts.get(op.name, 0))


def produced_exponent(op: ScaleOp, e: Mapping[str, int], shift: int = 0) -> int:
    """The exponent ``op`` writes when its first input is read at ``e + shift``; for ``POWER`` the
    floor of ``degree * e_in`` (exact when :func:`shift_for` chose the shift)."""
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


def shift_for(op: ScaleOp, e: Mapping[str, int], want: int) -> int:
    """The input shift ``s`` after which ``op`` writes exactly exponent ``want``; for a ``POWER``
    whose degree cannot reach ``want`` exactly (``Sqrt`` of an odd exponent), the ``s`` that writes
    the nearest exponent at or above it (stored values at most as large as its class expects)."""
    base = produced_exponent(op, e)
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


#: Roles whose output exponent follows from their inputs' (and whose first input can be shifted).
DERIVED_ROLES = (Role.PRODUCT, Role.QUOTIENT, Role.POWER)


class UnionFind:
    """Classes of names (the activations tied by scale-equivariant ops), with path halving."""

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
