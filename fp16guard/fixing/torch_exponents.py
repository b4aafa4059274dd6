"""The rewrites :func:`fp16guard.fixing.torch_pass.apply_exponents` makes, op by op: a solution's
exponents folded into weights, biases, norm epsilons, constant multipliers, clamp bounds, pad values
and an attention's scale; ``aten.mul`` by a power of two inserted where a
:class:`~fp16guard.fixing.solver_model.Rescale` asks for one (:data:`RESCALE_META` marks it);
saturating and gated ops reading a scaled input through a clamp (:func:`saturate`); ``log`` closed
by ``e ln 2`` (:func:`close_logs`). The PyTorch twin of :mod:`fp16guard.fixing.onnx_exponents`."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from fp16guard.errors import RewriteError
from fp16guard.fixing import laws
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.solver_model import Role, ScaleOp, ScaleSolution, reads_scaled
from fp16guard.fixing.torch_edit import (
    ADDMM,
    LAWS,
    LINEAR_OPS,
    MATMUL_OPS,
    NORM_OPS,
    TIED_SCALARS,
    Constants,
    aten,
    is_float_value,
    op_packet,
)
from fp16guard.folding import pow2
from fp16guard.fp16 import FP16_MAX


def scale_attention(node: fx.Node, e: dict) -> RewriteNote | None:
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


def saturate(g: fx.Graph, solution: ScaleSolution, ops: dict[str, ScaleOp]) -> list[RewriteNote]:
    """Each ``SATURATING`` or ``GATED`` op (:mod:`fp16guard.fixing.laws`) that reads its input at an
    exponent ``k != 0`` reads ``clamp(x_s, -B 2^-k, B 2^-k) * 2^k`` (``k < 0``: ``x_s * 2^k``), ``B``
    its row's saturation bound; a gated op ``f(x) = x g(x)`` becomes ``where(x_s > B 2^-k, x_s, f(.) * 2^-k)``,
    the last node taking its name, so its output stays at exponent ``k`` (see
    :func:`fp16guard.fixing.onnx_exponents.saturate`)."""
    e = solution.exponents
    notes = []
    for node in list(g.nodes):
        op = ops.get(node.name)
        k = e.get(op.inputs[0], 0) if op is not None and op.inputs else 0
        if op is None or op.role not in laws.SATURATING_ROLES or not k or not reads_scaled(op, e):
            continue
        bound, x, name = LAWS[op_packet(node)].bound, node.args[0], node.name
        with g.inserting_before(node):
            read = (g.call_function(aten.mul.Tensor, (g.call_function(aten.clamp.default, (
                x, -bound * pow2(-k), bound * pow2(-k))), pow2(k))) if k > 0 else g.call_function(aten.mul.Tensor, (x, pow2(k))))
        if op.role is Role.SATURATING:
            node.args = (read, *node.args[1:])
            notes.append(RewriteNote("scale", name, f"{op_packet(node).__name__} reads its input stored x 2^-{k} "
                                     f"through clamp(+-{bound:g} 2^-{k}) then mul 2^{k} (saturated beyond {bound:g}: "
                                     f"exact)" if k > 0 else f"{op_packet(node).__name__} reads its input x 2^{k}"))
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
        notes.append(RewriteNote("scale", name, f"{op_packet(f).__name__} of a value stored x 2^-{k}: where(x > "
                                 f"{bound:g} 2^-{k}, x, f(clamp(x, +-{bound:g} 2^-{k}) 2^{k}) 2^-{k}), exact (f(x) "
                                 f"rounds to x beyond {bound:g})" if k > 0 else
                                 f"{op_packet(f).__name__} of a value stored x 2^{-k}: f(x 2^{k}) 2^{-k}"))
    return notes


def close_logs(g: fx.Graph, solution: ScaleSolution) -> list[RewriteNote]:
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


def scale_arg(consts: Constants, node: fx.Node, index: int, exponent: int) -> None:
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


def scale_linear(consts: Constants, node: fx.Node, op: ScaleOp, e_in: int, e_out: int) -> RewriteNote | None:
    """Fold the exponents of a linear op into its constants: conv/linear weight and bias, norm weight,
    bias and eps, the constant operand of a matmul/``mul``/``div``.

    Args:
        op: ``node``'s :class:`~fp16guard.fixing.solver_model.ScaleOp` (its activation inputs).
        e_in, e_out: exponents of its activation input and output.

    Returns:
        A note if either exponent is nonzero, else None.
    """
    p = op_packet(node)
    if p is ADDMM:  # addmm(bias, x, W): GPT-2's Conv1D
        scale_arg(consts, node, 2, e_in - e_out)
        scale_arg(consts, node, 0, -e_out)
    elif p in LINEAR_OPS:
        scale_arg(consts, node, 1, e_in - e_out)
        scale_arg(consts, node, 2, -e_out)
    elif p in NORM_OPS:
        w_idx, b_idx, eps_idx = NORM_OPS[p]
        _norm_weight(consts, node, w_idx, e_out)
        scale_arg(consts, node, w_idx, -e_out)
        if b_idx is not None:
            scale_arg(consts, node, b_idx, -e_out)
        scale_eps(node, eps_idx, e_in)
    elif p in MATMUL_OPS or p is aten.mul:
        k = 1 if consts.get(node.args[1]) is not None and node.args[0] is not None and \
            isinstance(node.args[0], fx.Node) and node.args[0].name in op.inputs else 0
        scale_arg(consts, node, k, e_in - e_out)
    elif p is aten.div:
        scale_arg(consts, node, 1, e_out - e_in)
    if e_in or e_out:
        return RewriteNote("scale", node.name, f"{p.__name__ if hasattr(p, '__name__') else p}: "
                           f"input exponent {e_in}, output exponent {e_out}")
    return None


def scale_hardsigmoid(g: fx.Graph, node: fx.Node, e_in: int) -> RewriteNote:
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


def scale_tied(consts: Constants, node: fx.Node, op: ScaleOp, e_in: int) -> RewriteNote | None:
    """Scale the constant scalar arguments of a tied op (:data:`TIED_SCALARS`: added constants, clamp
    bounds, pad values) by ``2**-e_in``; arguments that are the op's activation inputs are left alone.

    Returns:
        A note if any argument was scaled, else None.
    """
    p = op_packet(node)
    changed = False
    if p is getattr(aten, "relu6", None):  # relu6 has no bound argument to scale: hardtanh(x, 0, 6)
        node.target, node.args = aten.hardtanh.default, (node.args[0], 0.0, 6.0)
    _with_defaults(node, max(TIED_SCALARS[p]))
    for k in TIED_SCALARS[p]:
        if k < len(node.args) and consts.get(node.args[k]) is not None and not (
                isinstance(node.args[k], fx.Node) and node.args[k].name in op.inputs):
            scale_arg(consts, node, k, -e_in)
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


def scale_constant_operands(g: fx.Graph, node: fx.Node, op: ScaleOp, e_in: int, acts: set[str]) -> RewriteNote | None:
    """A tied op's float tensor operands that are not activations (a ViT's class token,
    ``expand(cls_token)``, concatenated with the patches) read through ``mul(c, 2**-e_in)``;
    ``get_attr`` tensors and numbers are :func:`scale_tied`'s."""
    scaled = []

    def scale(a, k):
        """``a`` (argument ``k``) multiplied by ``2**-e_in`` if it is a constant float tensor node."""
        if isinstance(a, fx.Node) and a.name not in acts and a.op != "get_attr" and is_float_value(a):
            with g.inserting_before(node):
                scaled.append(g.call_function(aten.mul.Tensor, (a, pow2(-e_in))))
            return scaled[-1]
        return a

    node.args = tuple([scale(x, k) for x in a] if isinstance(a, (list, tuple)) else scale(a, k)
                      for k, a in enumerate(node.args))
    if scaled:
        return RewriteNote("scale", node.name, f"{len(scaled)} constant operand(s) x 2^{-e_in}")
    return None


#: ``node.meta`` key marking the ``aten.mul`` rescales the fix inserts
#: (:func:`fp16guard.fixing.torch_pass.restoring_rescales`).
RESCALE_META = "fp16guard_rescale"


def insert_rescales(g: fx.Graph, solution: ScaleSolution) -> list[RewriteNote]:
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


def _norm_weight(consts: Constants, node: fx.Node, index: int, e_out: int) -> None:
    """A norm without affine weight (``layer_norm(x, shape)``, ``InstanceNorm2d()``) writing exponent
    ``e_out != 0`` gets one of ones, which :func:`scale_arg` then scales: the norm is linear either way."""
    if not e_out or index < len(node.args) and node.args[index] is not None:
        return
    x = node.args[0].meta.get("val", node.args[0].meta.get("tensor_meta"))
    norms = (aten.layer_norm, getattr(aten, "rms_norm", None))
    shape = list(node.args[1]) if op_packet(node) in norms else [x.shape[1]]
    args = list(node.args) + [None] * (index + 1 - len(node.args))
    args[index] = consts.new(np.ones(shape), node)
    node.args = tuple(args)


def scale_eps(node: fx.Node, index: int, e_in: int) -> None:
    """A norm's ``eps`` (argument ``index``, ATen's default where absent) ``*= 2**(-2 e_in)``."""
    if not e_in:
        return
    args = list(node.args)
    while len(args) <= index:
        args.append(None)  # a weight or bias left out, then the eps
    if args[index] is None:  # ATen's defaults: 1e-5, and rms_norm's the input dtype's machine epsilon (FP32's here)
        args[index] = torch.finfo(torch.float32).eps if op_packet(node) is getattr(aten, "rms_norm", None) else 1e-5
    args[index] = float(args[index]) * pow2(-2 * e_in)
    node.args = tuple(args)
