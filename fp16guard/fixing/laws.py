"""One table of scaling laws for both frontends: how each op carries a power-of-two scale.

Every row (:class:`Law`) names one law, the ONNX op types and the ATen overload packets it
covers, the role it gives the solver (:class:`~fp16guard.fixing.solver_model.Role`), which inputs are
weights, biases, epsilons or constants scaled with the activations in each frontend
(:class:`Operands`), the degree of a power, the op's part in the attention-mask proof, its FP16
saturation bound and where the law comes from. The ONNX pass (:func:`fp16guard.fixing.onnx_roles.op_role`)
and the ATen pass (:func:`fp16guard.fixing.torch_roles.op_role`) decide a role by one lookup here
(:func:`role_of`); a row has a *predicate* only where the role depends on the op's arguments or
attributes (``Mul`` by a constant or of two activations, ``Resize`` mode, ``Cast`` target), and
predicates read a node through :class:`OpView`, which each frontend implements, so one
predicate serves both. Where a frontend cannot express a row (ONNX has no ``SiLU`` op; ATen no
``ReduceSumSquare``), ``skip`` says so and why; ``tests/test_laws.py`` builds every other row both
ways and checks that the two frontends agree.

Saturation (issue 24 item 2). An op ``f`` that is constant to FP16 rounding beyond a bound ``B``
(a *saturating* gate: sigmoid, tanh, erf) satisfies ``f(2^k x_s) = f(2^k clamp(x_s, -B 2^-k, B 2^-k))``:
clamping in FP16 *before* the multiply by ``2^k`` keeps every value in range (``|.| <= B``), and
the gate reads exactly what it would read in FP32 wherever its output is not already constant.
So its input may hold any exponent ``k`` (``Role.SATURATING``: input free, output true; the rewrite
inserts ``Clip(-B 2^-k, B 2^-k)`` then ``Mul 2^k`` when ``k > 0``, one ``Mul 2^k`` when ``k < 0``).
An op ``x * g(x)`` whose gate ``g`` saturates to 1 above ``B`` and whose value rounds to 0 below
``-B`` (SiLU, GELU, HardSwish, Mish: ``Role.GATED``) keeps its output at its input's exponent:
``f(x) = x`` for ``x > B`` and ``f(clamp(x, -B, B))`` otherwise, exactly in FP16 (above ``B``, ``f(x)``
rounds to ``x``; ``f(-B)`` rounds to 0), so the rewrite computes
``where(x_s > B 2^-k, x_s, f(2^k c_s) 2^-k)`` with ``c_s`` the clamped stored value: one rounding,
as the op itself. ``B`` is a power of two at or above the point where FP16 rounding makes the op
constant (each row's ``source`` gives the computation), so ``B 2^-k`` and ``2^k`` are exact FP16
constants. Clip and ReLU6 saturate too, but they are positively homogeneous with their bounds
scaled (``TIED``): no clamp is needed. Softmax stays a barrier (see its row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Mapping, Protocol

from fp16guard.fixing.solver_model import Role
from fp16guard.folding import simple_fraction

ONNX, ATEN = "onnx", "aten"
FRONTENDS = (ONNX, ATEN)


class OpView(Protocol):
    """One node as a predicate reads it, whatever its frontend.

    Attributes:
        frontend: ``"onnx"`` or ``"aten"``.
        reads: how many activation reads the node makes (``x * x`` reads ``x`` twice).
    """

    frontend: str
    reads: int

    def is_act(self, i: int) -> bool:
        """Input (ONNX) or argument (ATen) ``i`` is a float activation."""

    def is_const(self, i: int) -> bool:
        """Input/argument ``i`` is a constant the rewrite can scale: an initializer, a ``get_attr``
        tensor or a Python number."""

    def absent(self, i: int) -> bool:
        """Input/argument ``i`` is left out (missing, ``""`` or ``None``)."""

    def scalar(self, i: int) -> float | None:
        """The value of a one-element constant at ``i``, else None."""

    def attr(self, name: str):
        """An ONNX attribute (bytes decoded) or an ATen argument by its schema name (positional,
        keyword or default); None when the node has none of that name."""

    def is_float_dtype(self, dtype) -> bool:
        """Whether ``dtype`` (an ONNX ``TensorProto`` type, a ``torch.dtype``) is a float type."""

    def writes_float(self) -> bool | None:
        """Whether the node's (first) output is a float tensor; None when the graph does not say."""


@dataclass(frozen=True)
class Operands:
    """Which inputs (ONNX) or arguments (ATen) of an op play which part in its law.

    Attributes:
        data: the activation input a linear op or a norm reads.
        weight: a constant that absorbs ``2**(e_in - e_out)`` (a norm's scale: ``2**-e_out``).
        bias: a constant that absorbs ``2**-e_out``.
        eps: a norm's epsilon, scaled by ``2**(-2 e_in)``: an input/argument index, or an ONNX
            attribute name.
        scaled: for a tied op, the constants scaled by ``2**-e`` with its activations (an added
            constant, clip bounds, a pad value, a table read at integer indices); ``None``: every
            float constant input.
    """

    data: int = 0
    weight: int | None = None
    bias: int | None = None
    eps: int | str | None = None
    scaled: tuple[int, ...] | None = ()

    def describe(self) -> str:
        """One short phrase for the docs (``weight 1, bias 2, eps epsilon``), or ``""``."""
        parts = [f"{k} {v}" for k, v in (("weight", self.weight), ("bias", self.bias), ("eps", self.eps))
                 if v is not None]
        if self.scaled is None:
            parts.append("scaled: every constant")
        elif self.scaled:
            parts.append("scaled " + ", ".join(map(str, self.scaled)))
        return ", ".join(parts)


#: What a predicate returns: a role, or a role and a power degree.
Decision = Role | tuple[Role, Fraction]


@dataclass(frozen=True)
class Law:
    """One row of the table.

    Attributes:
        name: the row's key.
        role: the role the op gets (with a predicate: the role it gets in the case the row is
            named for, e.g. ``Mul`` by a constant).
        onnx: ONNX op types (default domain); ``aten``: ATen overload packet names (``getitem``
            is Python's ``operator.getitem``).
        law: the law, as the rewrite applies it.
        source: where it comes from: a citation (an identity, the ONNX operator spec) or, for a
            saturation bound, the FP16 computation.
        onnx_args, aten_args: :class:`Operands` per frontend.
        degree: for ``POWER``, the exponent ``c`` of ``x**c``.
        mask: ``"sink"`` (gives masked positions weight 0) or ``"move"`` (moves a mask unchanged)
            in the attention-mask proof (``onnx_pass.saturate_masks``, ``torch_masks``); ``""``.
        bound: the saturation bound ``B`` (a power of two) of a ``SATURATING``/``GATED`` op, or of
            a bounded one noted for reference.
        predicate: ``f(law, view) -> Decision`` where the role depends on the node.
        skip: frontend -> why that frontend cannot express this row.
        blind: the op reads only its inputs' shapes (``Shape``): it reads a value at any exponent.
        also: the other roles the predicate gives (besides ``role`` and ``BARRIER``).
    """

    name: str
    role: Role
    onnx: tuple[str, ...] = ()
    aten: tuple[str, ...] = ()
    law: str = ""
    source: str = ""
    onnx_args: Operands = field(default_factory=Operands)
    aten_args: Operands = field(default_factory=Operands)
    degree: Fraction = Fraction(1)
    mask: str = ""
    bound: float | None = None
    predicate: Callable[[Law, OpView], Decision] | None = None
    skip: Mapping[str, str] = field(default_factory=dict)
    blind: bool = False
    also: tuple[Role, ...] = ()

    def operands(self, frontend: str) -> Operands:
        """The :class:`Operands` of ``frontend``."""
        return self.onnx_args if frontend == ONNX else self.aten_args

    def ops(self, frontend: str) -> tuple[str, ...]:
        """The op names of ``frontend``."""
        return self.onnx if frontend == ONNX else self.aten


# ---------------------------------------------------------------- predicates


def _unary(law: Law, v: OpView) -> Decision:
    """The row's role when the op reads one activation, as its first input; else a barrier."""
    return (law.role, law.degree) if v.reads == 1 and v.is_act(0) else Role.BARRIER


def _weighted(law: Law, v: OpView) -> Decision:
    """Conv, Gemm/linear, a norm: linear when it reads one activation at its data input and its
    weight and bias are constants (or left out: a norm without affine weights)."""
    a = law.operands(v.frontend)
    fixed = all(i is None or v.is_const(i) or v.absent(i) for i in (a.weight, a.bias))
    stats = v.attr("use_input_stats")  # instance_norm with running statistics is a BatchNorm
    ok = v.reads == 1 and v.is_act(a.data) and fixed and stats in (None, True)
    return law.role if ok else Role.BARRIER


def _matmul(law: Law, v: OpView) -> Decision:
    """Of two activations a product; by a constant (either side) linear."""
    if v.reads == 2:
        return Role.PRODUCT
    return Role.LINEAR if v.reads == 1 and (v.is_const(0) or v.is_const(1)) else Role.BARRIER


def _mul(law: Law, v: OpView) -> Decision:
    """Of two activations a product; by a constant linear."""
    if v.reads == 2:
        return Role.PRODUCT
    return Role.LINEAR if v.reads == 1 and (v.is_const(0) or v.is_const(1)) else Role.BARRIER


def _div(law: Law, v: OpView) -> Decision:
    """``a / b`` a quotient; ``x / c`` linear; ``c / x`` a power of degree -1 (``c / (x/F) = F (c/x)``);
    a rounding division (``div(..., rounding_mode=...)``) a barrier."""
    if v.attr("rounding_mode") is not None:
        return Role.BARRIER
    if v.reads == 2:
        return Role.QUOTIENT
    if v.reads == 1 and v.is_act(0) and v.is_const(1):
        return Role.LINEAR
    if v.reads == 1 and v.is_act(1) and v.is_const(0):
        return Role.POWER, Fraction(-1)
    return Role.BARRIER


def _pow(law: Law, v: OpView) -> Decision:
    """``x ** c`` by a constant ``c`` a power of degree ``c`` (when ``c`` is a simple fraction)."""
    c = v.scalar(1) if v.reads == 1 and v.is_act(0) else None
    degree = simple_fraction(c) if c is not None else None
    return (Role.POWER, degree) if degree is not None else Role.BARRIER


def _tied_constants(law: Law, v: OpView) -> Decision:
    """``x + c``, ``c - x``: tied when the other operand is an activation or a constant the rewrite scales."""
    return law.role if all(v.is_act(i) or v.is_const(i) for i in (0, 1)) else Role.BARRIER


def _float_cast(law: Law, v: OpView) -> Decision:
    """A cast of one activation to a float type carries the scale; to an integer or bool type it
    needs true values (the target read from the output's type, else from the ``to``/``dtype`` argument)."""
    if v.reads != 1 or not v.is_act(0):
        return Role.BARRIER  # type_as / to(other) of another activation: not a move of it alone
    out = v.writes_float()
    if out is None:
        to = v.attr("to") if v.frontend == ONNX else v.attr("dtype")
        out = to is None or v.is_float_dtype(to)
    return law.role if out else Role.BARRIER


#: Interpolation and padding modes that are linear in the input values.
LINEAR_MODES = frozenset({"nearest", "linear", "bilinear", "cubic", "constant", "reflect", "edge", "wrap",
                          "replicate", "circular"})


def _linear_mode(law: Law, v: OpView) -> Decision:
    """Resize/Pad: tied for the modes that are linear in the values (every mode ONNX and ATen have)."""
    mode = v.attr("mode")
    return law.role if mode is None or mode in LINEAR_MODES else Role.BARRIER


# ---------------------------------------------------------------- the table

_HOM1 = "positive homogeneity of degree 1: f(x/F) = f(x)/F for F > 0"
_MOVE = "data movement: output elements are input elements"
_LINEAR = "linearity: W' (x 2^-a) + b' = (W x + b) 2^-b with W' = W 2^(a-b), b' = b 2^-b"
_NORM = ("a norm is invariant to its input's scale once eps is scaled: (x/F - mean/F) / sqrt(var/F^2 + eps/F^2); "
         "its affine weights absorb the output exponent")
_NOT_HOM = "not positively homogeneous: needs true values in and out"
_HALF_ULP = "FP16 rounds a value to 1 once it is within 2^-12 of it (half an ulp below 1; ties go to the even 1.0)"
_ZERO = "and to 0 below 2^-25 (half the smallest subnormal 2^-24)"

LAWS: tuple[Law, ...] = (
    # ---- linear: constants absorb any input and output exponent
    Law("conv", Role.LINEAR, ("Conv",), ("conv1d", "conv2d", "conv3d", "convolution"),
        "W' = W 2^(k_in - k_out), b' = b 2^-k_out", _LINEAR,
        Operands(0, 1, 2), Operands(0, 1, 2), predicate=_weighted),
    Law("conv_transpose", Role.LINEAR, ("ConvTranspose",), ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
        "W' = W 2^(k_in - k_out), b' = b 2^-k_out", _LINEAR,
        Operands(0, 1, 2), Operands(0, 1, 2), predicate=_weighted),
    Law("linear", Role.LINEAR, ("Gemm",), ("linear",),
        "W' = W 2^(k_in - k_out), b' = b 2^-k_out (Gemm's alpha, beta, transposes: linear too)",
        _LINEAR + "; ONNX operator spec (Gemm: alpha A' B' + beta C)",
        Operands(0, 1, 2), Operands(0, 1, 2), predicate=_weighted),
    Law("addmm", Role.LINEAR, (), ("addmm",), "addmm(b, x, W) = x W + b (GPT-2's Conv1D): W, b as linear", _LINEAR,
        aten_args=Operands(1, 2, 0), predicate=_weighted,
        skip={ONNX: "no ONNX op of this argument order: exported as Gemm (row linear)"}),
    Law("matmul", Role.LINEAR, ("MatMul",), ("matmul", "mm", "bmm"),
        "by a constant: linear; of two activations: k_out = k_a + k_b (a product)",
        _LINEAR + "; bilinearity for two activations", Operands(0, 1), Operands(0, 1), predicate=_matmul,
        also=(Role.PRODUCT,)),
    Law("mul", Role.LINEAR, ("Mul",), ("mul",),
        "by a constant c: c' = c 2^(k_in - k_out); of two activations: k_out = k_a + k_b (a product)",
        "linearity; bilinearity for two activations", predicate=_mul, also=(Role.PRODUCT,)),
    Law("div", Role.LINEAR, ("Div",), ("div",),
        "x / c: c' = c 2^(k_out - k_in); a / b: k_out = k_a - k_b (a quotient); c / x: a power of degree -1",
        "linearity; (a/F)/(b/G) = (a/b) G/F; c/(x/F) = F (c/x)", predicate=_div, also=(Role.QUOTIENT, Role.POWER)),
    Law("layer_norm", Role.LINEAR, ("LayerNormalization",), ("layer_norm",),
        "scale, B *= 2^-k_out, eps *= 2^(-2 k_in) (a missing ATen weight is made: ones 2^-k_out)", _NORM,
        Operands(0, 1, 2, "epsilon"), Operands(0, 2, 3, 4), predicate=_weighted),
    Law("group_norm", Role.LINEAR, ("GroupNormalization",), ("group_norm",),
        "scale, B *= 2^-k_out, eps *= 2^(-2 k_in)", _NORM,
        Operands(0, 1, 2, "epsilon"), Operands(0, 2, 3, 4), predicate=_weighted),
    Law("instance_norm", Role.LINEAR, ("InstanceNormalization",), ("instance_norm",),
        "scale, B *= 2^-k_out, eps *= 2^(-2 k_in); with running statistics (use_input_stats=False) a barrier", _NORM,
        Operands(0, 1, 2, "epsilon"), Operands(0, 1, 2, 7), predicate=_weighted),
    Law("rms_norm", Role.LINEAR, ("RMSNormalization",), ("rms_norm",),
        "scale *= 2^-k_out, eps *= 2^(-2 k_in)", _NORM + " (x / sqrt(mean(x^2) + eps))",
        Operands(0, 1, None, "epsilon"), Operands(0, 2, None, 3), predicate=_weighted),
    # ---- tied: positively homogeneous of degree 1, one exponent for every activation
    Law("relu", Role.TIED, ("Relu",), ("relu",), "one k in and out", _HOM1),
    Law("leaky_relu", Role.TIED, ("LeakyRelu",), ("leaky_relu",), "one k in and out (the slope is not a value)", _HOM1),
    Law("prelu", Role.TIED, ("PRelu",), ("prelu", "_prelu_kernel"), "one k in and out (the slope is not a value)", _HOM1),
    Law("clip", Role.TIED, ("Clip",), ("clamp", "clip", "hardtanh", "relu6", "clamp_min", "clamp_max"),
        "one k; bounds *= 2^-k (relu6 becomes hardtanh(x, 0, 6 2^-k)). Saturating too, but tied needs no clamp",
        _HOM1 + " with the bounds scaled: clip(x/F, a/F, b/F) = clip(x, a, b)/F",
        Operands(scaled=(1, 2)), Operands(scaled=(1, 2))),
    Law("max_pool", Role.TIED, ("MaxPool", "GlobalMaxPool"),
        ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d"),
        "one k in and out", _HOM1),
    Law("avg_pool", Role.TIED, ("AveragePool", "GlobalAveragePool"),
        ("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"),
        "one k in and out", "linearity (a mean)"),
    Law("resize", Role.TIED, ("Resize", "Upsample"),
        ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d",
         "upsample_trilinear3d", "upsample_bicubic2d"),
        "one k in and out for nearest, linear and cubic modes", "linearity of interpolation; ONNX operator spec (Resize modes)",
        Operands(scaled=(0,)), predicate=_linear_mode),
    Law("concat", Role.TIED, ("Concat",), ("cat", "concat", "stack"), "one k; constant parts *= 2^-k", _MOVE,
        Operands(scaled=None)),
    Law("add", Role.TIED, ("Add", "Sub"), ("add", "sub", "rsub"),
        "one k; an added constant *= 2^-k (a residual Add ties its branches)", "additivity: x/F + c/F = (x + c)/F",
        Operands(scaled=None), Operands(scaled=(0, 1)), predicate=_tied_constants),
    Law("max_min", Role.TIED, ("Max", "Min"), ("maximum", "minimum"), "one k; a constant operand *= 2^-k", _HOM1,
        Operands(scaled=None), Operands(scaled=(0, 1))),
    Law("sum_mean", Role.TIED, ("Sum", "Mean"), (), "one k; constant operands *= 2^-k", "linearity",
        Operands(scaled=None), skip={ATEN: "no ATen op: a sum of tensors is captured as add (row add)"}),
    Law("neg_abs", Role.TIED, ("Neg", "Abs"), ("neg", "abs"), "one k in and out", _HOM1),
    Law("identity", Role.TIED, ("Identity", "Dropout"),
        ("alias", "detach", "clone", "contiguous", "dropout", "feature_dropout"), "one k in and out", _MOVE,
        Operands(scaled=(0,)), mask="move"),
    Law("reshape", Role.TIED, ("Reshape", "Flatten"), ("view", "reshape", "_unsafe_view", "flatten", "unflatten"),
        "one k in and out", _MOVE, Operands(scaled=(0,)), mask="move"),
    Law("transpose", Role.TIED, ("Transpose",), ("permute", "transpose", "t", "movedim"), "one k in and out", _MOVE,
        Operands(scaled=(0,)), mask="move"),
    Law("squeeze", Role.TIED, ("Squeeze", "Unsqueeze"), ("squeeze", "unsqueeze"), "one k in and out", _MOVE,
        Operands(scaled=(0,)), mask="move"),
    Law("slice", Role.TIED, ("Slice", "Split"),
        ("slice", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind", "flip", "roll"),
        "one k in and out", _MOVE, Operands(scaled=(0,)), mask="move"),
    Law("pad", Role.TIED, ("Pad",), ("pad", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
                                     "replication_pad1d", "replication_pad2d", "replication_pad3d"),
        "one k; the pad value *= 2^-k", _MOVE + "; a constant pad value scales with the values",
        Operands(scaled=(2,)), Operands(scaled=(3,)), predicate=_linear_mode),
    Law("constant_pad_nd", Role.TIED, (), ("constant_pad_nd",), "one k; the pad value *= 2^-k", _MOVE,
        aten_args=Operands(scaled=(2,)), skip={ONNX: "exported as Pad (row pad)"}),
    Law("expand_tile", Role.TIED, ("Expand", "Tile"), ("expand", "repeat", "tile"), "one k in and out", _MOVE,
        Operands(scaled=(0,)), Operands(scaled=(0,)), mask="move"),
    Law("depth_space", Role.TIED, ("DepthToSpace", "SpaceToDepth"), ("pixel_shuffle", "pixel_unshuffle"),
        "one k in and out", _MOVE, Operands(scaled=(0,))),
    Law("gather", Role.TIED, ("Gather", "GatherElements", "GatherND"), ("gather", "index_select", "index"),
        "one k; a constant table read at integer indices *= 2^-k", _MOVE,
        Operands(scaled=(0,)), Operands(scaled=(0,))),
    Law("embedding", Role.TIED, (), ("embedding",), "the table *= 2^-k_out (read at integer indices)", _MOVE,
        aten_args=Operands(scaled=(0,)), skip={ONNX: "exported as Gather of the table (row gather)"}),
    Law("reduce_max", Role.TIED, ("ReduceMax",), ("amax", "max"), "one k in and out", _HOM1, mask="sink"),
    Law("reduce_min", Role.TIED, ("ReduceMin",), ("amin", "min"), "one k in and out", _HOM1),
    Law("reduce_mean_sum", Role.TIED, ("ReduceMean", "ReduceSum"), ("mean", "sum"), "one k in and out", "linearity"),
    Law("vector_norm", Role.TIED, ("ReduceL1", "ReduceL2"), ("linalg_vector_norm", "norm"), "one k in and out",
        "absolute homogeneity of a norm: ||x/F|| = ||x||/F"),
    Law("where", Role.TIED, ("Where",), ("where",), "one k; constant branches *= 2^-k (the condition is not a value)",
        _MOVE, Operands(scaled=(1, 2)), Operands(scaled=(1, 2))),
    Law("cast", Role.TIED, ("Cast",), ("_to_copy", "to"), "one k for a float target; to an integer type a barrier",
        "a float cast is a move; ONNX operator spec (Cast)", mask="move", predicate=_float_cast),
    Law("max_unpool", Role.TIED, ("MaxUnpool",), ("max_unpool2d", "max_unpool3d"), "one k in and out", _MOVE),
    Law("getitem", Role.TIED, (), ("getitem",), "one k (an element of a multi-output op)", _MOVE,
        skip={ONNX: "no op: ONNX nodes have several outputs"}),
    Law("attention", Role.TIED, (), ("scaled_dot_product_attention",),
        "q, k at any a, b with scale' = scale 2^(a+b); output tied to v; an additive mask true",
        "linear in v; q k^T bilinear", skip={ONNX: "exporters write MatMul, Softmax, MatMul (rows matmul, softmax)"}),
    # ---- powers: homogeneous of degree c
    Law("sqrt", Role.POWER, ("Sqrt",), ("sqrt",), "k_out = k_in / 2 (the solver keeps k_in even)",
        "homogeneity of degree 1/2", degree=Fraction(1, 2), predicate=_unary),
    Law("reciprocal", Role.POWER, ("Reciprocal",), ("reciprocal",), "k_out = -k_in", "homogeneity of degree -1",
        degree=Fraction(-1), predicate=_unary),
    Law("rsqrt", Role.POWER, (), ("rsqrt",), "k_out = -k_in / 2", "homogeneity of degree -1/2", degree=Fraction(-1, 2),
        predicate=_unary, skip={ONNX: "no ONNX op: exported as Sqrt then Reciprocal (rows sqrt, reciprocal)"}),
    Law("square", Role.POWER, (), ("square",), "k_out = 2 k_in", "homogeneity of degree 2", degree=Fraction(2),
        predicate=_unary, skip={ONNX: "exported as Pow(x, 2) (row pow)"}),
    Law("pow", Role.POWER, ("Pow",), ("pow",), "x ** c by a constant c: k_out = c k_in", "homogeneity of degree c",
        predicate=_pow),
    Law("reduce_sum_square", Role.POWER, ("ReduceSumSquare",), (), "k_out = 2 k_in", "homogeneity of degree 2",
        degree=Fraction(2), predicate=_unary, skip={ATEN: "no ATen op: captured as pow/mul then sum"}),
    # ---- bounded: input free, output true, a constant absorbs the input exponent
    Law("hardsigmoid", Role.BOUNDED, ("HardSigmoid",), ("hardsigmoid",),
        "any k_in: alpha' = alpha 2^k_in (ATen: clamp(x 2^k/6 + 1/2, 0, 1)); output true; no clamp needed",
        "clip(alpha x + beta, 0, 1) of x = x_s 2^k; constant beyond |x| >= 3 (PyTorch) or 2.5 (ONNX defaults): "
        "B = 4 for reference", bound=4.0),
    Law("lp_normalization", Role.BOUNDED, ("LpNormalization",), (), "any k_in, output true", "x / ||x|| is scale invariant",
        predicate=_unary, skip={ATEN: "no ATen op: F.normalize is captured as linalg_vector_norm, clamp_min, div"}),
    # ---- log: input free, output closed by an added constant
    Law("log", Role.LOG, ("Log",), ("log",), "any k_in: log(x 2^-k) + k ln 2 (one Add after it)",
        "log(x/F) = log x - log F", predicate=_unary),
    # ---- saturating: input free, output true, Clip then Mul 2^k before the op
    Law("sigmoid", Role.SATURATING, ("Sigmoid",), ("sigmoid",),
        "any k_in <= 11: sigmoid(clip(x_s, -B 2^-k, B 2^-k) 2^k); output true",
        f"FP16 rounding: {_HALF_ULP}: sigmoid(x) = 1 for x >= ln(2^12 - 1) = 8.318, {_ZERO}: sigmoid(x) = 0 for "
        "x <= -ln(2^25 - 1) = -17.33; B = 32", bound=32.0, predicate=_unary),
    Law("tanh", Role.SATURATING, ("Tanh",), ("tanh",),
        "any k_in <= 11: tanh(clip(x_s, -B 2^-k, B 2^-k) 2^k); output true",
        f"FP16 rounding: {_HALF_ULP}: tanh(x) = +-1 for |x| >= artanh(1 - 2^-12) = ln(2^13 - 1)/2 = 4.505; B = 8",
        bound=8.0, predicate=_unary),
    Law("erf", Role.SATURATING, ("Erf",), ("erf",),
        "any k_in <= 11: erf(clip(x_s, -B 2^-k, B 2^-k) 2^k); output true",
        f"FP16 rounding: {_HALF_ULP}: erf(x) = +-1 for |x| >= erfc^-1(2^-12) = 2.594; B = 4",
        bound=4.0, predicate=_unary),
    # ---- gated: x * g(x), output at the input's exponent
    Law("silu", Role.GATED, (), ("silu",),
        "any k <= 11, output at k: where(x_s > B 2^-k, x_s, silu(c 2^k) 2^-k), c = clip(x_s, -B 2^-k, B 2^-k)",
        "x sigmoid(x): FP16 rounds it to x once 1 - sigmoid(x) < 2^-12 (x >= 8.318) and to 0 once "
        "|x sigmoid(x)| < 2^-25 (x <= -20.34); B = 32", bound=32.0, predicate=_unary,
        skip={ONNX: "no ONNX op: exported as Sigmoid (saturating) and Mul (a product): the same law, decomposed"}),
    Law("gelu", Role.GATED, ("Gelu",), ("gelu",),
        "any k <= 11, output at k: where(x_s > B 2^-k, x_s, gelu(c 2^k) 2^-k), c = clip(x_s, -B 2^-k, B 2^-k)",
        "x Phi(x) (erf) or its tanh form: FP16 rounds it to x once 1 - Phi(x) < 2^-12 (x >= 3.35; tanh form 3.19) "
        "and to 0 once |x Phi(x)| < 2^-25 (x <= -5.72; tanh form -5.29); B = 8", bound=8.0, predicate=_unary),
    Law("hardswish", Role.GATED, ("HardSwish",), ("hardswish",),
        "any k <= 11, output at k: where(x_s > B 2^-k, x_s, hardswish(c 2^k) 2^-k), c = clip(x_s, -B 2^-k, B 2^-k)",
        "x relu6(x + 3)/6 is exactly x for x >= 3 and 0 for x <= -3; B = 4", bound=4.0, predicate=_unary),
    Law("mish", Role.GATED, ("Mish",), ("mish",),
        "any k <= 11, output at k: where(x_s > B 2^-k, x_s, mish(c 2^k) 2^-k), c = clip(x_s, -B 2^-k, B 2^-k)",
        "x tanh(softplus(x)): FP16 rounds it to x once softplus(x) >= 4.505 (x >= 4.49) and to 0 once "
        "|x tanh(softplus(x))| < 2^-25 (x <= -20.34); B = 32", bound=32.0, predicate=_unary),
    # ---- scale-blind: reads shapes only
    Law("shape", Role.BARRIER, ("Shape", "Size", "EyeLike"),
        ("sym_size", "size", "sym_numel", "sym_stride", "_assert_tensor_metadata"),
        "reads a value at any k (its shape only)", "the output is a shape or a dtype check", blind=True),
    # ---- barriers: true values in and out (listed for the docs and the mask proof)
    Law("softmax", Role.BARRIER, ("Softmax",), ("softmax", "_softmax"), "true values in and out",
        "softmax(x) = softmax(max(x - max x, -32)) exactly in FP16 (exp(-17.33) is half FP16's smallest subnormal), "
        "but the output depends on x - max x at an absolute precision of ~2^-11, and FP16 stores a logit of "
        "magnitude M at any power-of-two scale to M 2^-11: beyond 65504 (the only case a scale is for) logits "
        "within 32 of the max merge, so the FP32 island stays", mask="sink"),
    Law("log_softmax", Role.BARRIER, ("LogSoftmax",), ("log_softmax", "_log_softmax"), "true values in and out",
        _NOT_HOM + " (x - max x - log sum exp: unbounded, and the softmax's precision argument)", mask="sink"),
    Law("argmax", Role.BARRIER, ("ArgMax",), ("argmax",), "true values in (an index out)", _NOT_HOM, mask="sink"),
    Law("topk", Role.BARRIER, ("TopK",), ("topk",), "true values in and out", _NOT_HOM, mask="sink"),
    Law("exp", Role.BARRIER, ("Exp",), ("exp",), "true values in and out", _NOT_HOM + ": exp(x/F) != exp(x)/F"),
    Law("softplus", Role.BARRIER, ("Softplus",), ("softplus",), "true values in and out", _NOT_HOM),
    Law("elu", Role.BARRIER, ("Elu",), ("elu",), "true values in and out", _NOT_HOM),
    Law("type_as", Role.TIED, (), ("type_as",), "one k for a float target (the second argument's dtype is read, "
        "not its values); to an integer type a barrier", "a float cast is a move", mask="move", predicate=_float_cast,
        skip={ONNX: "exported as Identity or Cast (rows identity, cast)"}),
)

#: Saturating and gated ops read their input at exponents up to this (see :mod:`fp16guard.fixing.solver`).
SATURATING_ROLES = (Role.SATURATING, Role.GATED)

#: Per role: the law, for the docs' summary table.
ROLE_LAWS: Mapping[Role, str] = {
    Role.LINEAR: "any `k_in`, any `k_out`: the op's constants absorb both (weights, bias, a norm's eps)",
    Role.TIED: "one `k` for every activation input and output; added constants, bounds, pad values scale with it",
    Role.PRODUCT: "`k_out = k_a + k_b`",
    Role.QUOTIENT: "`k_out = k_a - k_b`",
    Role.POWER: "`k_out = c k_in` (the solver keeps `c k_in` an integer)",
    Role.BOUNDED: "any `k_in` (a constant absorbs it), output true",
    Role.LOG: "any `k_in`, output true: `log(x 2^-k) + k ln 2`",
    Role.SATURATING: "any `k_in` up to 11, output true: `Clip(-B 2^-k, B 2^-k)`, `Mul 2^k` before the op",
    Role.GATED: "any `k` up to 11, output at `k`: `where(x_s > B 2^-k, x_s, f(c 2^k) 2^-k)`, `c` the clamped input",
    Role.BARRIER: "true values in and out (scale-blind ops read any `k`)",
}


def by_op(frontend: str) -> dict[str, Law]:
    """``{op type or ATen packet name: row}`` of ``frontend``.

    Raises:
        ValueError: two rows claim one op (the table would be ambiguous).
    """
    out: dict[str, Law] = {}
    for law in LAWS:
        for op in law.ops(frontend):
            if op in out:
                raise ValueError(f"{frontend} op {op} is in rows {out[op].name} and {law.name}")
            out[op] = law
    return out


def role_of(law: Law | None, view: OpView) -> tuple[Role, Fraction]:
    """The role (and power degree) of a node of ``law``'s row; a barrier for an op the table lacks."""
    if law is None:
        return Role.BARRIER, Fraction(1)
    decided = law.predicate(law, view) if law.predicate is not None else law.role
    if isinstance(decided, tuple):
        return decided
    return decided, law.degree if decided is Role.POWER else Fraction(1)


def constants(frontend: str, part: str) -> dict[str, object]:
    """``{op: index}`` of one :class:`Operands` field (``"weight"``, ``"bias"``, ``"eps"``,
    ``"scaled"``) over the rows of ``frontend`` that set it (``scaled``: the rows that scale any
    constant, ``None`` meaning every one)."""
    out = {}
    for law in LAWS:
        value = getattr(law.operands(frontend), part)
        if part == "scaled" and value == () or part != "scaled" and value is None:
            continue
        for op in law.ops(frontend):
            out[op] = value
    return out


def ops_where(frontend: str, **match) -> frozenset[str]:
    """The ops of ``frontend`` whose rows match every ``field=value`` (``role=Role.LINEAR``, ``mask="sink"``,
    ``blind=True``)."""
    return frozenset(op for law in LAWS if all(getattr(law, k) == v for k, v in match.items())
                     for op in law.ops(frontend))


# ---------------------------------------------------------------- docs


def _ops_cell(ops: tuple[str, ...], skip: str) -> str:
    return ", ".join(ops) if ops else f"- ({skip})" if skip else "-"


def _row(*cells: str) -> str:
    """One markdown table row (a ``|`` inside a cell, ``|x|``, escaped)."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown(indent: str = "") -> str:
    """The docs' two tables (roles, then one row per law), as docs/fix.md holds them between its
    ``laws-table`` markers (``indent``: the list item's); ``tests/test_laws.py`` checks the two agree.
    Regenerate: ``python -c "from fp16guard.fixing import laws; print(laws.markdown('   '), end='')"``."""
    lines = ["| role | ONNX ops | ATen ops | law |", "|---|---|---|---|"]
    for role, text in ROLE_LAWS.items():
        rows = [law for law in LAWS if role is law.role or role in law.also]
        onnx = ", ".join(op for law in rows for op in law.onnx) or "-"
        aten = ", ".join(op for law in rows for op in law.aten) or "-"
        lines.append(_row(role.value, onnx, aten, text))
    lines += ["", "| row | role | ONNX | ATen | constants (ONNX / ATen) | B | law | source |",
              "|---|---|---|---|---|---|---|---|"]
    for law in LAWS:
        consts = " / ".join(x or "-" for x in (law.onnx_args.describe(), law.aten_args.describe()))
        role = law.role.value + (f" ({law.degree})" if law.role is Role.POWER and law.degree != 1 else "")
        role += ", predicate" if law.predicate not in (None, _unary) else ""
        role += f", mask {law.mask}" if law.mask else ""
        role += ", scale-blind" if law.blind else ""
        bound = f"{law.bound:g}" if law.bound else ""
        lines.append(_row(law.name, role, _ops_cell(law.onnx, law.skip.get(ONNX, "")),
                          _ops_cell(law.aten, law.skip.get(ATEN, "")), consts, bound, law.law, law.source))
    return "\n".join(indent + line if line else "" for line in lines) + "\n"
