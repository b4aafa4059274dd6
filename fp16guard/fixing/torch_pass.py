"""The PyTorch rewriter: the ONNX path's plan and solver, applied to a ``torch.export`` graph.

A PyTorch module is captured once with ``torch.export`` (:func:`capture`): a flat ``GraphModule``
of ATen ops whose parameters are ``get_attr`` nodes. Every pass below is a pure function from
``GraphModule`` to a new ``GraphModule``: the captured graph and the user's module are never
modified (changed constants are registered as new buffers; nothing is written in place).

1. :func:`fold_batchnorms`: an inference ``aten.batch_norm`` right after a convolution is folded
   into its weights in float64 (seed 000's formula, :func:`fp16guard.folding.fold_batchnorm`);
   any other one, or one whose fold would make the conv's FP16 weights subnormal, becomes
   ``x * scale + shift`` with ``scale``/``shift`` computed in float64. No FP16 tensor then holds a
   running variance.
2. :func:`scale_ops`: the graph as :func:`fp16guard.fixing.solver.solve` sees it (each op's
   :class:`~fp16guard.fixing.solver.Role`), so the PyTorch and ONNX paths share one solver.
3. :func:`activation_amax`: calibration amax of every activation (node), kept on the device and
   read back once per forward.
4. :func:`apply_exponents`: the solution's power-of-two exponents folded into weights, biases,
   norm epsilons, constant multipliers, clamp bounds and pad values; an explicit
   ``aten.mul`` by a power of two only where :class:`~fp16guard.fixing.solver.Rescale` asks for one.
5. :func:`to_fp16_program`: the typed FP16 program (FP16 constants and activations, FP32 graph
   inputs and outputs, named nodes optionally kept in FP32 with casts around them), what
   ``fp16guard fix ... -o OUT.pt2`` saves with ``torch.export.save``.
6. :func:`run_emulated`: strict FP16 emulation of such a program on the CPU (every op computed in
   FP32 from FP16-stored inputs and rounded to FP16), the counterpart of the ``emulate`` ONNX
   backend; PyTorch's own CPU FP16 kernels are 40x slower than FP32 on the crepe example.

Names: the plan's tensors are fx node names of the graph after step 1 (each ATen op writes one
value named like the node, e.g. ``conv2d_1``); ``capture`` and ``fold_batchnorms`` are
deterministic, so calibration and application see the same names.
"""

from __future__ import annotations

import copy
import math
import operator
from fractions import Fraction
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map

from fp16guard import progress
from fp16guard.errors import ExportError, RewriteError, first_line
from fp16guard.fixing import laws
from fp16guard.fixing.onnx_pass import RewriteNote
from fp16guard.fixing.solver import Role, ScaledConstant, ScaleOp, ScaleSolution, reads_scaled
from fp16guard.folding import (
    fold_affine_into_weights,
    fold_batchnorm,
    keeps_fp16_precision,
    pow2,
    raise_small,
)
from fp16guard.fp16 import BF16_MAX, BF16_MIN_SUBNORMAL, FP16_MAX
from fp16guard.torch_graph import dynamic_dims, get_attr, module_scope

aten = torch.ops.aten


def _packets(*names: str) -> frozenset:
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


def _packet(node: fx.Node):
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


class _Constants:
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


def _is_float_value(node: fx.Node) -> bool:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    vals, _ = tree_flatten(val)
    return any(getattr(v, "dtype", None) is not None and v.dtype.is_floating_point for v in vals)


def _writes_float(node: fx.Node) -> bool:
    """Whether ``node`` writes a float value, read from ``meta["val"]`` or, for nodes a pass added,
    ``meta["tensor_meta"]`` (a ``TensorMetadata`` tuple, whose own ``dtype`` field is the answer)."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    vals, _ = tree_flatten(val, is_leaf=lambda v: isinstance(getattr(v, "dtype", None), torch.dtype))
    return any(isinstance(getattr(v, "dtype", None), torch.dtype) and v.dtype.is_floating_point for v in vals)


def _activations(gm: fx.GraphModule) -> set[str]:
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


def annotate(gm: fx.GraphModule, example: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Record every node's value type (``meta["tensor_meta"]``) by running ``example`` once, for
    nodes the passes added (``torch.export`` already records ``meta["val"]`` on its own)."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example)
    return gm


def fold_batchnorms(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[RewriteNote]]:
    """Fold every inference ``aten.batch_norm`` away (see the module docstring).

    Args:
        gm: a captured graph (not modified).

    Returns:
        ``(gm', notes)``: ``batch_norm`` nodes folded into their convolution keep no node; the
        others become ``mul`` + ``add`` nodes named ``<bn>_scale`` and ``<bn>`` (so the plan's name
        for the BatchNorm's output does not change).

    Raises:
        RewriteError: a BatchNorm in training mode, or whose statistics are not constants.
    """
    gm = copy_module(gm)
    g = gm.graph
    consts = _Constants(gm)
    notes: list[RewriteNote] = []
    bn_ops = _packets("batch_norm", "_native_batch_norm_legit_no_training")
    for bn in list(g.nodes):
        if _packet(bn) not in bn_ops:
            continue
        c, scale, shift, var = _batchnorm_affine(bn, consts)
        out_nodes = _batchnorm_outputs(bn)
        conv = bn.args[0] if isinstance(bn.args[0], fx.Node) else None
        if conv is not None and _fold_into_conv(gm, consts, conv, c, scale, shift):
            for o in out_nodes:
                o.replace_all_uses_with(conv)
            notes.append(RewriteNote("fold_batchnorm", bn.name, f"folded into {conv.name} in float64 "
                                     f"(running variance amax {float(np.max(var)):.4g})"))
            _erase_batchnorm(g, bn, out_nodes)
        else:
            notes.append(_batchnorm_to_mul_add(gm, consts, bn, out_nodes, c, scale, shift, conv))
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm, notes


def _batchnorm_affine(bn: fx.Node, consts: _Constants) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The inference BatchNorm ``bn`` as a per-channel affine map, computed in float64.

    Returns:
        ``(channels, scale, shift, running variance)``.

    Raises:
        RewriteError: ``bn`` is in training mode, or its statistics are not constants.
    """
    w, b, mean, var = bn.args[1:5]
    if _packet(bn) is aten.batch_norm:
        training, eps = bn.args[5], bn.args[7]
    else:
        training, eps = False, bn.args[6]
    if training:
        raise RewriteError(f"{bn.name}: BatchNorm in training mode cannot be folded; put the model in eval mode")
    stats = [consts.get(a) for a in (mean, var)]
    if any(s is None for s in stats):
        raise RewriteError(f"{bn.name}: BatchNorm statistics are not constants")
    c = stats[0].size
    gamma = consts.get(w) if w is not None else np.ones(c)
    beta = consts.get(b) if b is not None else np.zeros(c)
    scale, shift = fold_batchnorm(gamma, beta, stats[0], stats[1], float(eps))
    return c, scale, shift, stats[1]


def _batchnorm_outputs(bn: fx.Node) -> list[fx.Node]:
    """The nodes that carry ``bn``'s normalized output: ``bn`` itself for ``aten.batch_norm``, its
    ``getitem 0`` readers for the ``(out, mean, invstd)`` variant.

    Raises:
        RewriteError: the variant's mean/invstd outputs are read.
    """
    if _packet(bn) is aten.batch_norm:
        return [bn]
    users = list(bn.users)
    if any(_packet(u) is not operator.getitem or u.args[1] != 0 for u in users):
        raise RewriteError(f"{bn.name}: BatchNorm statistics outputs are read")
    return users


def _fold_into_conv(gm: fx.GraphModule, consts: _Constants, conv: fx.Node, c: int, scale: np.ndarray,
                    shift: np.ndarray) -> bool:
    """Fold ``x * scale + shift`` into the weights and bias of ``conv`` (the BatchNorm's input) if it
    can: a convolution (not linear, not a grouped transposed one) read only by the BatchNorm, with
    constant weights of ``c`` output channels, whose folded FP16 weights lose no precision.

    Returns:
        Whether ``conv`` was rewritten (with new weight and bias buffers); if not, nothing changed.
    """
    if _packet(conv) not in LINEAR_OPS or len(conv.users) != 1 or "linear" in str(conv.target):
        return False
    transposed = "transpose" in str(conv.target) or (_packet(conv) is aten.convolution and conv.args[6])
    groups = conv.args[8] if _packet(conv) is aten.convolution else (
        conv.args[6] if "transpose" in str(conv.target) and len(conv.args) > 6 else 1)
    weight = consts.get(conv.args[1])
    bias = consts.get(conv.args[2]) if len(conv.args) > 2 and conv.args[2] is not None else None
    axis = 1 if transposed else 0
    if weight is None or (transposed and groups != 1) or weight.shape[axis] != c:
        return False
    w2, b2 = fold_affine_into_weights(weight, bias, scale, shift, channel_axis=axis)
    if not keeps_fp16_precision(weight, w2):
        return False
    args = list(conv.args)
    args[1] = consts.new(w2, conv, get_attr(gm, conv.args[1].target))
    while len(args) < 3:
        args.append(None)
    args[2] = consts.new(b2, conv, get_attr(gm, conv.args[1].target))
    conv.args = tuple(args)
    return True


def _batchnorm_to_mul_add(gm: fx.GraphModule, consts: _Constants, bn: fx.Node, out_nodes: list[fx.Node], c: int,
                          scale: np.ndarray, shift: np.ndarray, conv: fx.Node | None) -> RewriteNote:
    """Replace ``bn`` (and its ``out_nodes``) with ``x * scale + shift`` nodes named ``<bn>_scale`` and ``<bn>``.

    Args:
        c: the number of channels (``scale`` and ``shift`` become ``[c, 1, ...]`` buffers).
        conv: ``bn``'s input node, if any (only for the note's reason).

    Returns:
        The note saying why the BatchNorm was not folded into a convolution.
    """
    g = gm.graph
    x, mean = bn.args[0], bn.args[3]
    shape = [c] + [1] * (len(bn.meta["val"].shape) - 2 if "val" in bn.meta else 2)
    like = get_attr(gm, mean.target)
    s_node = consts.new(scale.reshape(shape), bn, like)
    t_node = consts.new(shift.reshape(shape), bn, like)
    with g.inserting_before(bn):
        mul = g.call_function(aten.mul.Tensor, (x, s_node))
        add = g.call_function(aten.add.Tensor, (mul, t_node))
    mul.meta.update(bn.meta)
    add.meta.update(bn.meta)
    for o in out_nodes:
        o.replace_all_uses_with(add)
    why = ("folding would make the conv's FP16 weights subnormal" if conv is not None
           and _packet(conv) in LINEAR_OPS else "no conv to fold into")
    note = RewriteNote("batchnorm_to_affine", bn.name, f"{why}: per-channel mul + add with scale "
                       f"and shift computed in float64")
    name = bn.name
    _erase_batchnorm(g, bn, out_nodes)
    mul.name, add.name = f"{name}_scale", name  # keep the BatchNorm's output name for the plan
    return note


def _erase_batchnorm(g: fx.Graph, bn: fx.Node, out_nodes: list[fx.Node]) -> None:
    """Erase ``bn`` and its ``getitem`` output nodes (all already without users)."""
    for o in out_nodes:
        if o is not bn:
            g.erase_node(o)
    g.erase_node(bn)


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
        return isinstance(a, fx.Node) and a.name in self.acts and (not known or _writes_float(a))

    def is_const(self, i: int) -> bool:
        """A ``get_attr`` tensor or a Python number (what :class:`_Constants` rescales)."""
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
        return _writes_float(self.node) if "val" in self.node.meta or "tensor_meta" in self.node.meta else None


def _role(node: fx.Node, acts: set[str]) -> tuple[Role, Fraction]:
    """The node's role and power degree: one lookup in the law table (:func:`fp16guard.fixing.laws.role_of`);
    an op the table lacks is a barrier."""
    return laws.role_of(LAWS.get(_packet(node)), _View(node, acts))


#: Ops whose result does not depend on their inputs' values (shapes, dtype checks): they read a
#: scaled tensor as well as the true one.
SCALE_BLIND_OPS = frozenset(p for p, law in LAWS.items() if law.blind)


def scale_ops(gm: fx.GraphModule) -> list[ScaleOp]:
    """The graph as :func:`fp16guard.fixing.solver.solve` sees it.

    Each ``call_function`` node whose value depends on a graph input is one
    :class:`~fp16guard.fixing.solver.ScaleOp` named like the node, writing the value of the same name;
    its inputs are the activation nodes it reads (constants left out). Roles: the law table
    (:mod:`fp16guard.fixing.laws`, :func:`_role`), the one the ONNX pass reads too; an op it lacks is a
    barrier.

    Args:
        gm: a captured graph after :func:`fold_batchnorms`.
    """
    acts = _activations(gm)
    consts = _Constants(gm)
    ops = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node.name not in acts:
            continue
        reads = [a.name for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node) and a.name in acts]
        if _packet(node) in SCALE_BLIND_OPS:
            reads = []  # reads a shape or dtype, not values
        if _packet(node) is aten.embedding:
            reads = []  # the table is a constant, the indices integers
        outs = (node.name,) if _is_float_value(node) or "val" not in node.meta and "tensor_meta" not in node.meta else ()
        if _packet(node) is ATTENTION and len(node.args) >= 3 and node.kwargs.get("dropout_p", 0.0) == 0.0:
            ops += _attention_ops(node, acts)
            continue
        role, degree = _role(node, acts) if node.op == "call_function" else (Role.BARRIER, Fraction(1))
        # a product reads x twice in x * x (exponent 2e); elsewhere each activation counts once
        ins = tuple(reads) if role in (Role.PRODUCT, Role.QUOTIENT) else tuple(dict.fromkeys(reads))
        ops.append(ScaleOp(node.name, role, ins, outs, module_scope(node), degree,
                           _scaled_constants(node, role, ins, consts) if node.op == "call_function" else ()))
    return ops


def _scaled_constants(node: fx.Node, role: Role, ins: tuple[str, ...], consts: _Constants) -> tuple[ScaledConstant, ...]:
    """The constants :func:`apply_exponents` folds exponents into for ``node`` (the arguments
    :func:`_scale_linear`, :func:`_scale_tied`, :func:`_scale_eps` and the embedding table rescale),
    as the solver checks them (:class:`~fp16guard.fixing.solver.ScaledConstant`)."""
    p = _packet(node)

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


ATTENTION = getattr(aten, "scaled_dot_product_attention", None)


def _attention_ops(node: fx.Node, acts: set[str]) -> list[ScaleOp]:
    """``scaled_dot_product_attention(q, k, v, mask, scale=c)`` as the solver sees it:
    ``softmax(q k^T c + mask) v`` is linear in ``v`` (the output shares its exponent: tied), and
    ``q`` and ``k`` may hold any exponents ``a``, ``b`` once ``c`` becomes ``c 2**(a + b)``
    (:func:`apply_exponents`), so they are read by no op here (free). An activation mask is added
    to true scores: a barrier op of the same name pins it."""
    q, k, v = node.args[:3]
    ops = []
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and mask.name in acts and _is_float_value(mask):
        ops.append(ScaleOp(node.name, Role.BARRIER, (mask.name,), (), module_scope(node)))
    reads = tuple(a.name for a in (v,) if isinstance(a, fx.Node) and a.name in acts)
    ops.append(ScaleOp(node.name, Role.TIED if reads else Role.BARRIER, reads, (node.name,), module_scope(node)))
    return ops


def _scale_attention(node: fx.Node, e: dict) -> RewriteNote | None:
    """``scale *= 2**(a + b)`` for the exponents ``a``, ``b`` of an attention's ``q`` and ``k``
    (the default scale is ``1/sqrt(head dim)``, PyTorch's)."""
    q, k = node.args[:2]
    shift = sum(e.get(t.name, 0) for t in (q, k) if isinstance(t, fx.Node))
    if not shift:
        return None
    args = list(node.args)
    scale = args[6] if len(args) > 6 else node.kwargs.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(q.meta.get("val", q.meta.get("tensor_meta")).shape[-1])
    if len(args) > 6:
        args[6] = scale * pow2(shift)
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "scale": scale * pow2(shift)}
    return RewriteNote("scale", node.name, f"attention scale x 2^{shift} (q and k stored scaled)")


def graph_io(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """``(input names, output names)`` of the float activations at the graph boundary."""
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = [a.name for a in tree_flatten(out.args)[0] if isinstance(a, fx.Node)]
    return inputs, outputs


def activation_amax(gm: fx.GraphModule, examples: Iterable[Sequence[torch.Tensor]],
                    flushed: set[str] | None = None) -> dict[str, float]:
    """Max |x| of every node's value over ``examples`` (``inf`` where a value is ever non-finite).

    The per-node maxima stay on the device as 0-d tensors and are read back once per forward.

    Args:
        gm: the graph; run as is (FP32).
        examples: argument tuples.
        flushed: if given, the names of nodes with a nonzero value FP16 flushes to zero
            (``|x| < 2**-24``, unscaled) are added to it.
    """
    amax: dict[str, float] = {}

    class Recorder(fx.Interpreter):
        """Runs the graph and keeps every value's max |x| on its device."""

        def run_node(self, n):
            """Run ``n`` and keep its value's max |x| (``inf`` if any element is inf/NaN)."""
            out = super().run_node(n)
            tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if tensors and n.op != "get_attr":
                m = torch.stack([t.detach().abs().amax().double() if t.numel() else t.new_zeros((), dtype=torch.float64)
                                 for t in tensors]).amax()
                finite = torch.stack([t.isfinite().all() for t in tensors]).all()
                tiny = (torch.stack([((t != 0) & (t.abs() < FP16_FLUSH)).any() for t in tensors]).any()
                        if flushed is not None else torch.zeros((), dtype=torch.bool, device=m.device))
                found[n.name] = torch.stack([torch.where(finite, m, torch.full_like(m, math.inf)), tiny.double()])
            return out

    with torch.no_grad():
        for example in examples:
            found: dict[str, torch.Tensor] = {}
            Recorder(gm).run(*example)
            if found:
                values = torch.stack(list(found.values())).cpu().tolist()  # one host sync per forward
                for name, (v, tiny) in zip(found, values):
                    amax[name] = max(amax.get(name, 0.0), v)
                    if tiny and flushed is not None:
                        flushed.add(name)
            progress.advance()  # the enclosing calibration step counts forwards
    return amax


#: Magnitudes below FP16's smallest subnormal (2**-24; below 2**-25 they round to zero): the
#: threshold of :attr:`fp16guard.stats.RangeStats.flush_to_zero`.
FP16_FLUSH = 2.0 ** -24


def apply_exponents(gm: fx.GraphModule, solution: ScaleSolution) -> tuple[fx.GraphModule, list[RewriteNote]]:
    """Rescale constants (and insert ``aten.mul`` by a power of two only where unavoidable) so
    every activation ``t`` is stored as ``true * 2**-solution.exponents[t]``.

    Per op (``e_in``/``e_out``: exponents of its activation input and output), as
    :func:`fp16guard.fixing.onnx_pass.apply_exponents`:

    * conv/linear/matmul by a constant: ``W *= 2**(e_in - e_out)``, ``b *= 2**-e_out``.
    * ``mul`` by a constant: ``c *= 2**(e_in - e_out)``; ``div`` by one: ``c *= 2**(e_out - e_in)``.
    * ``layer_norm``/``group_norm``: ``weight, bias *= 2**-e_out``, ``eps *= 2**(-2 e_in)``.
    * ``hardsigmoid`` (``clamp(x/6 + 1/2, 0, 1)``) with ``e_in != 0``: written as
      ``clamp(x * 2**e_in/6 + 1/2, 0, 1)`` (three elementwise ops TensorRT fuses into one).
    * tied ops: added constants, clamp/hardtanh bounds and pad values ``*= 2**-e``.
    * each :class:`~fp16guard.fixing.solver.Rescale`: ``aten.mul`` by ``2**exponent`` on that edge.
    * saturating ops (sigmoid, tanh, erf) reading exponent ``k``: ``clamp(-B 2^-k, B 2^-k)``, ``mul 2^k``
      before them; gated ones (silu, gelu, hardswish, mish) also ``where(x > B 2^-k, x, f * 2^-k)``
      after (:func:`_saturate`, :mod:`fp16guard.fixing.laws`); ``relu6`` with ``e != 0`` becomes
      ``hardtanh(x, 0, 6 2^-e)``; a norm without weight writing ``e_out != 0`` gets one.

    Args:
        gm: the graph the solution was computed for (after :func:`fold_batchnorms`; not modified).
        solution: from :func:`fp16guard.fixing.solver.solve` or :func:`~fp16guard.fixing.solver.complete`.

    Returns:
        ``(gm', notes)``.

    Raises:
        RewriteError: a rescaled constant exceeds 65504 where the op runs in FP16 (not one of
            ``solution.unfixable``'s ops).
    """
    gm = copy_module(gm)
    g = gm.graph
    consts = _Constants(gm, (n for u in solution.unfixable for n in u.ops))
    e = solution.exponents
    ops = {op.name: op for op in scale_ops(gm)}
    acts = _activations(gm)
    notes: list[RewriteNote] = []
    for node in list(g.nodes):
        op = ops.get(node.name)
        if op is None:
            continue
        p = _packet(node)
        e_in = e.get(op.inputs[0], 0) if op.inputs else 0
        e_out = solution.produced(op)
        note = None
        if op.role is Role.LINEAR:
            note = _scale_linear(consts, node, op, e_in, e_out)
        elif op.role is Role.BOUNDED and e_in and p in NORM_OPS:
            _scale_eps(node, NORM_OPS[p][2], e_in)
            note = RewriteNote("scale", node.name, f"norm eps x 2^{-2 * e_in}")
        elif op.role is Role.BOUNDED and e_in:
            note = _scale_hardsigmoid(g, node, e_in)
        elif op.role is Role.TIED and e_in and p in TIED_SCALARS:
            note = _scale_tied(consts, node, op, e_in)
        if op.role is Role.TIED and e_in and p is not ATTENTION:
            note = _scale_constant_operands(g, node, op, e_in, acts) or note
        if p is ATTENTION:
            note = _scale_attention(node, e) or note
        elif op.role is Role.TIED and not op.inputs and e_out and p is aten.embedding:
            _scale_arg(consts, node, 0, -e_out)  # the table, read at integer indices
            note = RewriteNote("scale", node.name, f"embedding table x 2^{-e_out}")
        if note is not None:
            notes.append(note)
    notes.extend(_insert_rescales(g, solution))
    notes.extend(_saturate(g, solution, ops))
    notes.extend(_close_logs(g, solution))
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm, notes


def _saturate(g: fx.Graph, solution: ScaleSolution, ops: dict[str, ScaleOp]) -> list[RewriteNote]:
    """Each ``SATURATING`` or ``GATED`` op (:mod:`fp16guard.fixing.laws`) that reads its input at an
    exponent ``k != 0`` reads ``clamp(x_s, -B 2^-k, B 2^-k) * 2^k`` (``k < 0``: ``x_s * 2^k``), ``B``
    its row's saturation bound; a gated op ``f(x) = x g(x)`` becomes ``where(x_s > B 2^-k, x_s, f(.) * 2^-k)``,
    the last node taking its name, so its output stays at exponent ``k`` (see
    :func:`fp16guard.fixing.onnx_pass._saturate`)."""
    e = solution.exponents
    notes = []
    for node in list(g.nodes):
        op = ops.get(node.name)
        k = e.get(op.inputs[0], 0) if op is not None and op.inputs else 0
        if op is None or op.role not in laws.SATURATING_ROLES or not k or not reads_scaled(op, e):
            continue
        bound, x, name = LAWS[_packet(node)].bound, node.args[0], node.name
        with g.inserting_before(node):
            read = (g.call_function(aten.mul.Tensor, (g.call_function(aten.clamp.default, (
                x, -bound * pow2(-k), bound * pow2(-k))), pow2(k))) if k > 0 else g.call_function(aten.mul.Tensor, (x, pow2(k))))
        if op.role is Role.SATURATING:
            node.args = (read, *node.args[1:])
            notes.append(RewriteNote("scale", name, f"{_packet(node).__name__} reads its input stored x 2^-{k} through "
                                     f"clamp(+-{bound:g} 2^-{k}) then mul 2^{k} (saturated beyond {bound:g}: exact)"
                                     if k > 0 else f"{_packet(node).__name__} reads its input x 2^{k}"))
            continue
        with g.inserting_before(node):
            f = g.call_function(node.target, (read, *node.args[1:]), dict(node.kwargs))
            out = g.call_function(aten.mul.Tensor, (f, pow2(-k)))
            if k > 0:
                beyond = g.call_function(aten.gt.Scalar, (x, bound * pow2(-k)))
                out = g.call_function(aten.where.self, (beyond, x, out))
        node.replace_all_uses_with(out)
        g.erase_node(node)
        out.name = name
        notes.append(RewriteNote("scale", name, f"{_packet(f).__name__} of a value stored x 2^-{k}: where(x > {bound:g} "
                                 f"2^-{k}, x, f(clamp(x, +-{bound:g} 2^-{k}) 2^{k}) 2^-{k}), exact (f(x) rounds to x beyond "
                                 f"{bound:g})" if k > 0 else f"{_packet(f).__name__} of a value stored x 2^{-k}: f(x 2^{k}) 2^{-k}"))
    return notes


def _close_logs(g: fx.Graph, solution: ScaleSolution) -> list[RewriteNote]:
    """``log(x * 2**-e) + e ln 2`` for each ``LOG`` op reading its input at exponent ``e != 0``."""
    nodes = {n.name: n for n in g.nodes}
    notes = []
    for name, e in solution.log_offsets.items():
        log = nodes[name]
        users = list(log.users)
        with g.inserting_after(log):
            closed = g.call_function(aten.add.Tensor, (log, e * math.log(2.0)))
        for u in users:
            u.replace_input_with(log, closed)
        notes.append(RewriteNote("scale", name, f"log of a value stored x 2^{-e}: {e} ln 2 added after it"))
    return notes


def _scale_arg(consts: _Constants, node: fx.Node, index: int, exponent: int) -> None:
    """``node.args[index] *= 2**exponent`` (a new buffer or a new float); nothing if ``exponent`` is 0
    or the argument is absent.

    Raises:
        RewriteError: the rescaled constant exceeds 65504.
    """
    if exponent and index < len(node.args) and node.args[index] is not None:
        value = consts.get(node.args[index]) * pow2(exponent)
        if np.any(np.abs(value) > FP16_MAX) and node.name not in consts.fp32:  # an island keeps it in FP32
            raise RewriteError(f"rescaled constant {index} of {node.name} exceeds 65504; lower the headroom "
                               f"target (--target-log2) or use --fallback fp32")
        consts.replace(node, index, value)


def _scale_linear(consts: _Constants, node: fx.Node, op: ScaleOp, e_in: int, e_out: int) -> RewriteNote | None:
    """Fold the exponents of a linear op into its constants: conv/linear weight and bias, norm weight,
    bias and eps, the constant operand of a matmul/``mul``/``div``.

    Args:
        op: ``node``'s :class:`~fp16guard.fixing.solver.ScaleOp` (its activation inputs).
        e_in, e_out: exponents of its activation input and output.

    Returns:
        A note if either exponent is nonzero, else None.
    """
    p = _packet(node)
    if p is ADDMM:  # addmm(bias, x, W): GPT-2's Conv1D
        _scale_arg(consts, node, 2, e_in - e_out)
        _scale_arg(consts, node, 0, -e_out)
    elif p in LINEAR_OPS:
        _scale_arg(consts, node, 1, e_in - e_out)
        _scale_arg(consts, node, 2, -e_out)
    elif p in NORM_OPS:
        w_idx, b_idx, eps_idx = NORM_OPS[p]
        _norm_weight(consts, node, w_idx, e_out)
        _scale_arg(consts, node, w_idx, -e_out)
        if b_idx is not None:
            _scale_arg(consts, node, b_idx, -e_out)
        _scale_eps(node, eps_idx, e_in)
    elif p in MATMUL_OPS or p is aten.mul:
        k = 1 if consts.get(node.args[1]) is not None and node.args[0] is not None and \
            isinstance(node.args[0], fx.Node) and node.args[0].name in op.inputs else 0
        _scale_arg(consts, node, k, e_in - e_out)
    elif p is aten.div:
        _scale_arg(consts, node, 1, e_out - e_in)
    if e_in or e_out:
        return RewriteNote("scale", node.name, f"{p.__name__ if hasattr(p, '__name__') else p}: "
                           f"input exponent {e_in}, output exponent {e_out}")
    return None


def _scale_hardsigmoid(g: fx.Graph, node: fx.Node, e_in: int) -> RewriteNote:
    """Replace the ``hardsigmoid`` ``node`` (input exponent ``e_in``) with ``clamp(x * 2**e_in/6 + 1/2, 0, 1)``,
    the last node taking its name."""
    with g.inserting_before(node):
        m = g.call_function(aten.mul.Tensor, (node.args[0], pow2(e_in) / 6.0))
        a = g.call_function(aten.add.Tensor, (m, 0.5))
        c = g.call_function(aten.clamp.default, (a, 0.0, 1.0))
    node.replace_all_uses_with(c)
    name = node.name
    g.erase_node(node)
    c.name = name
    return RewriteNote("scale", name, f"hardsigmoid as clamp(x * 2^{e_in}/6 + 1/2, 0, 1)")


def _scale_tied(consts: _Constants, node: fx.Node, op: ScaleOp, e_in: int) -> RewriteNote | None:
    """Scale the constant scalar arguments of a tied op (:data:`TIED_SCALARS`: added constants, clamp
    bounds, pad values) by ``2**-e_in``; arguments that are the op's activation inputs are left alone.

    Returns:
        A note if any argument was scaled, else None.
    """
    p = _packet(node)
    changed = False
    if p is getattr(aten, "relu6", None):  # relu6 has no bound argument to scale: hardtanh(x, 0, 6)
        node.target, node.args = aten.hardtanh.default, (node.args[0], 0.0, 6.0)
    _with_defaults(node, max(TIED_SCALARS[p]))
    for k in TIED_SCALARS[p]:
        if k < len(node.args) and consts.get(node.args[k]) is not None and not (
                isinstance(node.args[k], fx.Node) and node.args[k].name in op.inputs):
            _scale_arg(consts, node, k, -e_in)
            changed = True
    if changed:
        return RewriteNote("scale", node.name, f"{p.__name__}: constants x 2^{-e_in}")
    return None


def _with_defaults(node: fx.Node, index: int) -> None:
    """Write out the float defaults of ``node``'s positional arguments up to ``index`` that the
    capture left out (``hardtanh(x)`` is ``hardtanh(x, -1.0, 1.0)``), so they can be scaled."""
    schema = getattr(node.target, "_schema", None)
    params = [a for a in schema.arguments if not a.kwarg_only] if schema is not None else []
    args = list(node.args)
    while len(args) <= index and len(args) < len(params) and params[len(args)].has_default_value() and \
            isinstance(params[len(args)].default_value, float) and params[len(args)].name not in node.kwargs:
        args.append(params[len(args)].default_value)
    node.args = tuple(args)


def _scale_constant_operands(g: fx.Graph, node: fx.Node, op: ScaleOp, e_in: int, acts: set[str]) -> RewriteNote | None:
    """A tied op's float tensor operands that are not activations (a ViT's class token,
    ``expand(cls_token)``, concatenated with the patches) read through ``mul(c, 2**-e_in)``;
    ``get_attr`` tensors and numbers are :func:`_scale_tied`'s."""
    scaled = []

    def scale(a, k):
        """``a`` (argument ``k``) multiplied by ``2**-e_in`` if it is a constant float tensor node."""
        if isinstance(a, fx.Node) and a.name not in acts and a.op != "get_attr" and _is_float_value(a):
            with g.inserting_before(node):
                scaled.append(g.call_function(aten.mul.Tensor, (a, pow2(-e_in))))
            return scaled[-1]
        return a

    node.args = tuple([scale(x, k) for x in a] if isinstance(a, (list, tuple)) else scale(a, k)
                      for k, a in enumerate(node.args))
    if scaled:
        return RewriteNote("scale", node.name, f"{len(scaled)} constant operand(s) x 2^{-e_in}")
    return None


#: ``node.meta`` key marking the ``aten.mul`` rescales the fix inserts (:func:`restoring_rescales`).
RESCALE_META = "fp16guard_rescale"


def _insert_rescales(g: fx.Graph, solution: ScaleSolution) -> list[RewriteNote]:
    """Insert the solution's explicit rescales: an ``aten.mul`` by ``2**exponent`` after the tensor, read
    by the one consumer named (one shared node per tensor and exponent) or else by all its readers.
    Each is marked in its ``meta`` (:data:`RESCALE_META`)."""
    by_name = {n.name: n for n in g.nodes}
    made: dict[tuple[str, int], fx.Node] = {}
    notes: list[RewriteNote] = []
    for r in solution.rescales:
        src = by_name[r.tensor]
        if r.consumer:
            user = by_name[r.consumer]
            if (r.tensor, r.exponent) not in made:
                with g.inserting_after(src):
                    made[(r.tensor, r.exponent)] = g.call_function(aten.mul.Tensor, (src, pow2(r.exponent)))
                made[(r.tensor, r.exponent)].meta[RESCALE_META] = r.exponent
            user.replace_input_with(src, made[(r.tensor, r.exponent)])
        else:
            with g.inserting_after(src):
                mul = g.call_function(aten.mul.Tensor, (src, pow2(r.exponent)))
            mul.meta[RESCALE_META] = r.exponent
            src.replace_all_uses_with(mul, delete_user_cb=lambda u: u is not mul)
        notes.append(RewriteNote("rescale_op", r.tensor, f"mul by 2^{r.exponent} (no constant could absorb it)"))
    return notes


def restoring_rescales(gm: fx.GraphModule, fp32_nodes: Iterable[str]) -> list[str]:
    """The rescales (:data:`RESCALE_META`) that run in FP32: those that scale a graph input (before the
    cast to FP16), and those that restore values only for FP32: every user runs in FP32
    (``fp32_nodes``, or another such rescale) or is the graph output. They run in FP32 too: the
    restored value may be beyond 65504, which is why its readers need FP32 (see
    :func:`fp16guard.fixing.onnx_pass.restoring_rescales`).

    Returns:
        Node names, in graph order.
    """
    fp32 = set(fp32_nodes)
    found = []
    scales_input = set()  # a rescale of a graph input scales it in FP32, before the cast to FP16
    for node in gm.graph.nodes:
        first = node.args[0] if node.args else None
        if RESCALE_META in node.meta and isinstance(first, fx.Node) and (first.op == "placeholder"
                                                                         or first.name in scales_input):
            scales_input.add(node.name)
    for node in reversed(list(gm.graph.nodes)):
        first = node.args[0] if node.args else None
        after_fp32 = isinstance(first, fx.Node) and first.name in fp32  # it scales an FP32 island's output down
        if RESCALE_META in node.meta and (node.name in scales_input or after_fp32 or node.users and all(
                u.op == "output" or u.name in fp32 for u in node.users)):
            fp32.add(node.name)
            found.append(node.name)
    return found[::-1]


def _norm_weight(consts: _Constants, node: fx.Node, index: int, e_out: int) -> None:
    """A norm without affine weight (``layer_norm(x, shape)``, ``InstanceNorm2d()``) writing exponent
    ``e_out != 0`` gets one of ones, which :func:`_scale_arg` then scales: the norm is linear either way."""
    if not e_out or index < len(node.args) and node.args[index] is not None:
        return
    x = node.args[0].meta.get("val", node.args[0].meta.get("tensor_meta"))
    shape = list(node.args[1]) if _packet(node) in (aten.layer_norm, getattr(aten, "rms_norm", None)) else [x.shape[1]]
    args = list(node.args) + [None] * (index + 1 - len(node.args))
    args[index] = consts.new(np.ones(shape), node)
    node.args = tuple(args)


def _scale_eps(node: fx.Node, index: int, e_in: int) -> None:
    if not e_in:
        return
    args = list(node.args)
    while len(args) <= index:
        args.append(None)  # a weight or bias left out, then the eps
    if args[index] is None:  # ATen's defaults: 1e-5, and rms_norm's the input dtype's machine epsilon (FP32's here)
        args[index] = torch.finfo(torch.float32).eps if _packet(node) is getattr(aten, "rms_norm", None) else 1e-5
    args[index] = float(args[index]) * pow2(-2 * e_in)
    node.args = tuple(args)


def raise_constants(gm: fx.GraphModule, raises: Sequence[tuple[str, float]]) -> tuple[fx.GraphModule, list[RewriteNote]]:
    """Raise constants FP16 flushes to zero: every nonzero ``|x| < floor`` becomes ``sign(x) * floor``.

    Args:
        gm: the graph (not modified).
        raises: ``(get_attr target, floor)`` pairs (the plan's consented underflow entries).

    Raises:
        RewriteError: no ``get_attr`` node reads that target.
    """
    gm = copy_module(gm)
    consts = _Constants(gm)
    notes = []
    nodes = {n.name: n for n in gm.graph.nodes}
    for target, floor in raises:
        name, _, index = target.partition(SCALAR_MARK)
        if index and name in nodes and int(index) < len(nodes[name].args):
            node, i = nodes[name], int(index)
            node.args = (*node.args[:i], math.copysign(floor, node.args[i]), *node.args[i + 1:])
            notes.append(RewriteNote("raise_constant", target, f"scalar {node.args[i]:.3g} raised to {floor:.3g}"))
            continue
        readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
        if not readers:
            raise RewriteError(f"plan raises constant {target!r}, which the model does not have")
        value, count = raise_small(get_attr(gm, target).detach().cpu().double().numpy(), floor)
        new = consts.new(value, readers[0], get_attr(gm, target))
        for r in readers:
            r.replace_all_uses_with(new)
        notes.append(RewriteNote("raise_constant", target, f"{count} value(s) below {floor:.3g} raised to {floor:.3g}"))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, notes


#: Names a scalar argument as a constant: ``<node>#<argument index>`` (``add_3#1`` for the ``1e-10``
#: of ``add(x, 1e-10)``).
SCALAR_MARK = "#"


def constants(gm: fx.GraphModule) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Float constants of the graph: ``{get_attr target: (value as float64, reader node names)}``,
    and the float scalar arguments of ops as ``{"<node>#<index>": (value, [node])}``."""
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            for i, a in enumerate(node.args):
                if isinstance(a, float):
                    out[f"{node.name}{SCALAR_MARK}{i}"] = (np.array(a, dtype=np.float64), [node.name])
        if node.op != "get_attr":
            continue
        t = get_attr(gm, node.target)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            readers = [u.name for u in node.users]
            if node.target in out:
                out[node.target][1].extend(readers)
            else:
                out[node.target] = (t.detach().cpu().double().numpy(), readers)
    return out


def program_on(program: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of ``program`` on ``device``: its constants moved, and the devices ``torch.export``
    recorded when it captured on another one (``arange(..., device=cpu)``, ``to(x, cpu)``)
    rewritten (``program`` itself is not changed)."""
    moved = copy.deepcopy(program).to(device)  # Module.to moves in place: hence the copy
    for module in moved.modules():  # tensor constants that are plain attributes (not buffers)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(module, name, value.to(device))
    def placed(a):
        """``device`` for a recorded device, else ``a``."""
        return device if isinstance(a, torch.device) else a

    for node in moved.graph.nodes:
        node.args = tuple(placed(a) for a in node.args)
        node.kwargs = {k: placed(v) for k, v in node.kwargs.items()}
    moved.recompile()
    return moved


def to_fp16_program(gm: fx.GraphModule, fp32_nodes: Iterable[str] = (),
                    island_dtype: torch.dtype = torch.float32) -> fx.GraphModule:
    """The typed FP16 program: FP16 constants and activations, FP32 graph inputs and outputs.

    Float placeholders are cast to FP16 on the way in and float outputs back to FP32 on the way
    out (the ONNX path's typed-graph boundary). Nodes named in ``fp32_nodes`` run in
    ``island_dtype`` (FP32, or BF16: FP32's range at 8 significant bits): their float inputs are
    cast to it, their constants are stored in it, and their FP16 readers get a cast down. With BF16,
    a node reading a float constant beyond BF16's range (``finfo(float32).min``) stays FP32.

    Args:
        gm: an FP32 graph (not modified).
        fp32_nodes: node names to keep out of FP16 (the plan's unfixable or fallback nodes).
        island_dtype: their precision, ``torch.float32`` (default) or ``torch.bfloat16``.

    Returns:
        A new ``GraphModule``; save it with ``torch.export`` (:func:`save_program`).
    """
    fp32 = set(fp32_nodes)
    program = _Fp16Program(gm)
    unfit = bf16_unfit_readers(gm) if island_dtype == torch.bfloat16 else set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            program.add_input(node)
        elif node.op == "get_attr":
            continue  # read() makes the constant in the precision its reader needs
        elif node.op == "output":
            program.add_output(node)
        elif _packet(node) is getattr(aten, "_assert_tensor_metadata", None):
            continue  # checks the capture's FP32 dtype and device, which the program changes
        else:
            program.add_op(node, torch.float16 if node.name not in fp32 else
                           torch.float32 if node.name in unfit else island_dtype)
    return program.module()


def bf16_unfit_readers(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes of ``gm`` that read a float constant BF16 cannot hold: a finite value
    beyond :data:`~fp16guard.fp16.BF16_MAX` (inf in BF16) or a nonzero one that flushes to 0."""
    out = set()
    for n in gm.graph.nodes:
        t = get_attr(gm, n.target) if n.op == "get_attr" else None
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            a = t.detach().double().abs()
            if bool(((a > BF16_MAX) & a.isfinite()).any() | ((a > 0) & (a <= BF16_MIN_SUBNORMAL / 2)).any()):
                out.update(u.name for u in n.users)
    return out


class _Fp16Program:
    """The typed program :func:`to_fp16_program` builds, one source node at a time: each float value is
    kept in the precision its producer ran in and cast (once) for consumers that need another one."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.g = fx.Graph()
        self.g._codegen = gm.graph._codegen
        self.new = torch.nn.Module()
        self.env: dict[torch.dtype, dict[fx.Node, Any]] = {}  # value as consumers of each dtype read it
        self.made: dict[fx.Node, torch.dtype] = {}  # the dtype a float value's producer wrote
        self.buffers: dict[tuple[str, torch.dtype], fx.Node] = {}
        self.count = 0

    def cast(self, node: fx.Node, dtype: torch.dtype) -> fx.Node:
        """``node`` converted to ``dtype`` (an ``aten._to_copy``)."""
        return self.g.call_function(aten._to_copy.default, (node,), {"dtype": dtype})

    def const(self, target: str, dtype: torch.dtype) -> fx.Node:
        """A ``get_attr`` for the constant at ``target`` stored as ``dtype`` (floats only)."""
        key = (target, dtype)
        if key not in self.buffers:
            t = get_attr(self.gm, target)
            name = f"c{self.count}"
            self.count += 1
            self.new.register_buffer(name, t.detach().to(dtype) if t.is_floating_point() else t.detach().clone())
            self.buffers[key] = self.g.get_attr(name)
        return self.buffers[key]

    def submodule(self, target: str, module: torch.nn.Module) -> fx.Node:
        """A ``get_attr`` for a subgraph a higher-order op calls (``wrap_with_set_grad_enabled``'s
        body, as ``torch.export`` writes ``with torch.no_grad():`` regions): kept as it is, its ops
        run in the precision of what it is given."""
        key = (target, None)
        if key not in self.buffers:
            name = f"body{self.count}"
            self.count += 1
            self.new.add_module(name, module)
            self.buffers[key] = self.g.get_attr(name)
        return self.buffers[key]

    def read(self, node: fx.Node, dtype: torch.dtype):
        """The value of ``node`` for a consumer running in ``dtype`` (FP16, FP32 or BF16)."""
        if node.op == "get_attr":
            t = get_attr(self.gm, node.target)
            if isinstance(t, torch.nn.Module):
                return self.submodule(node.target, t)
            if not isinstance(t, torch.Tensor):
                return None
            return self.const(node.target, dtype if t.is_floating_point() else t.dtype)
        env = self.env.setdefault(dtype, {})
        if node not in env:
            made = self.made.get(node)  # None: not a float value, the same for every reader
            env[node] = self.cast(self.env[made][node], dtype) if made is not None else self.env[None][node]
        return env[node]

    def add_input(self, node: fx.Node) -> None:
        """A graph input: a float one is FP32 (cast to FP16 when an FP16 op first reads it)."""
        p = self.g.placeholder(node.name)
        p.meta.update(node.meta)
        self.store(node, p, torch.float32 if _writes_float(node) else None)

    def store(self, node: fx.Node, value, dtype: torch.dtype | None) -> None:
        """Record ``value`` as ``node``'s, written in ``dtype`` (None: not a float value, read as it is)."""
        self.env.setdefault(dtype, {})[node] = value
        if dtype is not None:
            self.made[node] = dtype

    def add_output(self, node: fx.Node) -> None:
        """The graph's output node: every output read as FP32."""
        outs = tree_map(lambda a: self.read(a, torch.float32) if isinstance(a, fx.Node) else a, node.args[0])
        self.g.output(outs)

    def add_op(self, node: fx.Node, dtype: torch.dtype) -> None:
        """A copy of the op ``node`` running in ``dtype`` (FP16, or FP32 / BF16 in an island): its float
        inputs are read (cast if need be) in that precision, and an explicit ``dtype=float32`` of an op
        running in FP16 or BF16 becomes that dtype."""
        args, kwargs = tree_map(lambda a: self.read(a, dtype) if isinstance(a, fx.Node) else a,
                                (node.args, node.kwargs))
        kwargs = dict(kwargs)
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = dtype  # an explicit FP32 cast inside the model stays in the FP16 program
        # ... also when the dtype is positional (T5's ``hidden.to(torch.float32)``: aten.to.dtype)
        args = tuple(dtype if a is torch.float32 else a for a in args)
        out = self.g.create_node(node.op, node.target, tuple(args), kwargs, name=node.name)
        self.store(node, out, dtype if _writes_float(node) else None)

    def module(self) -> fx.GraphModule:
        """The finished program as a ``GraphModule`` (its constants are the new buffers)."""
        self.g.lint()
        return fx.GraphModule(self.new, self.g)


def save_program(program: fx.GraphModule, examples: Sequence[Sequence[torch.Tensor]], path) -> str:
    """Save an FP16 program as a ``.pt2`` ``ExportedProgram`` (``torch.export.save``); input
    dimensions that differ between ``examples`` stay dynamic. Load it with
    ``torch.export.load(path).module()``.

    Raises:
        ExportError: ``torch.export`` cannot re-capture the program.
    """
    try:
        ep = torch.export.export(program, tuple(examples[0]), dynamic_shapes=dynamic_dims(examples), strict=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot export the fixed program ({type(e).__name__}: {first_line(e)[:200]}); "
                          f"write an .onnx instead") from None
    torch.export.save(ep, str(path))
    return str(path)


def run_emulated(program: fx.GraphModule, *args: torch.Tensor) -> list[torch.Tensor]:
    """Run an FP16 program with strict FP16 storage and FP32 arithmetic, on the CPU.

    Each op gets its FP16 (and BF16) inputs converted to FP32, runs in FP32, and its result is
    rounded to the dtype the op would produce on the FP16 inputs (found on the ``meta`` device), so
    every FP16 value is exactly what an FP16 kernel with FP32 accumulation stores: values beyond
    65504 become inf, tiny ones subnormal or zero. A BF16 island's values are rounded to BF16 the
    same way (round to nearest even, inf beyond :data:`~fp16guard.fp16.BF16_MAX`). This is what the
    ``emulate`` ONNX backend does (:func:`fp16guard.fp16_onnx.emulation_model`).

    Args:
        program: from :func:`to_fp16_program`.
        args: graph inputs (FP32 tensors).

    Returns:
        The outputs, flattened, as given by the program (FP32 at the boundary).
    """
    def up(a):
        """FP16 and BF16 tensors to FP32."""
        return a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a

    def meta(a):
        """A tensor's stand-in on the meta device."""
        return torch.empty_like(a, device="meta") if isinstance(a, torch.Tensor) else a

    class Emulator(fx.Interpreter):
        """Runs each op in FP32 on FP16-stored inputs and rounds its result back."""

        def call_function(self, target, args, kwargs):
            """The op in FP32, rounded to the dtype it has in FP16."""
            out = target(*tree_map(up, args), **tree_map(up, kwargs))
            try:
                want = target(*tree_map(meta, args), **tree_map(meta, kwargs))
            except Exception as e:  # noqa: BLE001 - an op with no meta kernel keeps its FP32 dtype
                if "dtype" in str(e):  # FP16 and FP32 mixed where a kernel needs one: CUDA refuses it too
                    raise
                return out
            return tree_map(lambda o, w: o.to(w.dtype) if isinstance(o, torch.Tensor) and isinstance(w, torch.Tensor)
                            and o.is_floating_point() else o, out, _match(want, out))

    with torch.no_grad():
        out = Emulator(program).run(*args)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _match(want, out):
    """``want`` shaped like ``out`` for ``tree_map`` (a single tensor op may return a list)."""
    if isinstance(out, (list, tuple)) and not isinstance(want, (list, tuple)):
        return type(out)([want] * len(out))
    return want
