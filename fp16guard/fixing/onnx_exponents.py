"""The rewrites :func:`fp16guard.fixing.onnx_pass.apply_exponents` makes, op by op: a solution's
exponents folded into weights, biases, norm epsilons, constant multipliers and tied constants;
``Mul`` by a power of two inserted where a :class:`~fp16guard.fixing.solver_model.Rescale` asks for
one; saturating and gated ops reading a scaled input through a clamp (:func:`saturate`); ``Log``
closed by ``e ln 2`` (:func:`close_logs`); and the check that no rescaled constant leaves FP16."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fp16guard.control_flow import rename_free_reads
from fp16guard.errors import RewriteError
from fp16guard.fixing import laws
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.onnx_edit import Constants, node_attr, set_node_attr
from fp16guard.fixing.onnx_roles import LAWS, LINEAR_OPS, NORM_OPS, TIED_CONSTANTS
from fp16guard.fixing.solver_model import Rescale, Role, ScaleOp, ScaleSolution, reads_scaled
from fp16guard.folding import fp16_exact_steps, pow2
from fp16guard.fp16 import FP16_MAX
from fp16guard.onnx_graph import free_reads, subgraphs


def _input_exponent(op: ScaleOp, exponents: Mapping[str, int]) -> int:
    """Exponent of ``op``'s first activation input (0 when it has none or none was assigned)."""
    return exponents.get(op.inputs[0], 0) if op.inputs else 0


def _scale_weights(node: onnx.NodeProto, consts: Constants, e_in: int, e_out: int) -> None:
    """Rescale the weight and bias of a linear op (``W *= 2**(e_in - e_out)``, ``b *= 2**-e_out``) or
    of a norm (``scale, B *= 2**-e_out``, ``epsilon *= 2**(-2 e_in)``).

    Args:
        node: a node of :data:`LINEAR_OPS` or :data:`NORM_OPS` (edited in place).
        consts: the graph's initializers.
        e_in: exponent of the activation input; e_out: exponent of the output.
    """
    t = node.op_type
    if t in NORM_OPS:
        w_idx, b_idx = NORM_OPS[t]
        w_exp, b_exp = -e_out, -e_out
        if e_in:
            set_node_attr(node, "epsilon", float(node_attr(node, "epsilon", 1e-5)) * pow2(-2 * e_in))
    else:
        w_idx, b_idx = LINEAR_OPS[t]
        w_exp, b_exp = e_in - e_out, -e_out
        if t == "MatMul" and node.input[0] in consts:
            w_idx = 0
    if w_exp:
        consts.replace(node, w_idx, consts.get(node.input[w_idx]).astype(np.float64) * pow2(w_exp), f"x2^{w_exp}")
    if b_idx is not None and b_exp and len(node.input) > b_idx and node.input[b_idx]:
        consts.replace(node, b_idx, consts.get(node.input[b_idx]).astype(np.float64) * pow2(b_exp), f"x2^{b_exp}")


def _scale_mul_div_constant(node: onnx.NodeProto, op: ScaleOp, consts: Constants, e_in: int, e_out: int) -> None:
    """Rescale the constant operand of a ``Mul`` (``c *= 2**(e_in - e_out)``) or ``Div``
    (``c *= 2**(e_out - e_in)``) whose other operand is the activation ``op.inputs[0]``."""
    t = node.op_type
    k = [i for i, x in enumerate(node.input) if x not in op.inputs][0]
    exp = (e_in - e_out) if t == "Mul" else (e_out - e_in)
    if exp:
        consts.replace(node, k, consts.get(node.input[k]).astype(np.float64) * pow2(exp), f"x2^{exp}")


def _scale_tied_constants(node: onnx.NodeProto, consts: Constants, e_in: int) -> bool:
    """Multiply the float constants of a tied op (those :data:`TIED_CONSTANTS` lists, and Clip's
    ``min``/``max`` attributes) by ``2**-e_in``; whether anything changed."""
    t = node.op_type
    wanted = TIED_CONSTANTS[t]
    changed = False
    for k, x in enumerate(node.input):
        if x and x in consts and (wanted is None or k in wanted) and consts.get(x).dtype.kind == "f":
            consts.replace(node, k, consts.get(x).astype(np.float64) * pow2(-e_in), f"x2^{-e_in}")
            changed = True
    if t == "Clip":
        for a in ("min", "max"):
            if node_attr(node, a) is not None:
                set_node_attr(node, a, float(node_attr(node, a)) * pow2(-e_in))
                changed = True
    return changed


def scale_op_constants(node: onnx.NodeProto, op: ScaleOp, solution: ScaleSolution,
                        consts: Constants) -> RewriteNote | None:
    """Rescale the constants (and scale attributes) of one op by its role in ``solution``.

    Args:
        node: the node (edited in place); op: its :class:`ScaleOp`.
        solution: the exponents being applied.
        consts: the graph's initializers.

    Returns:
        the ``scale`` note for ``node``, or None when nothing about it changed.
    """
    e_in = _input_exponent(op, solution.exponents)
    e_out = solution.produced(op)
    t = node.op_type
    if op.role is Role.LINEAR:
        if t in LINEAR_OPS or t in NORM_OPS:
            _scale_weights(node, consts, e_in, e_out)
        elif t in ("Mul", "Div"):
            _scale_mul_div_constant(node, op, consts, e_in, e_out)
        if e_in or e_out:
            return RewriteNote("scale", node.name, f"{t}: input exponent {e_in}, output exponent {e_out}")
    elif op.role is Role.BOUNDED and e_in and t == "HardSigmoid":
        set_node_attr(node, "alpha", float(node_attr(node, "alpha", 0.2)) * pow2(e_in))
        return RewriteNote("scale", node.name, f"HardSigmoid alpha x 2^{e_in}")
    elif op.role is Role.TIED and t in TIED_CONSTANTS:
        e_tied = e_in if op.inputs else e_out  # an embedding Gather reads no activation
        if e_tied and _scale_tied_constants(node, consts, e_tied):
            return RewriteNote("scale", node.name, f"{t}: constants x 2^{-e_tied}")
    return None


#: Rescale ``Mul`` nodes the fix inserts are named ``<value>__rescale`` (``__rescale1``, ... for the
#: further steps of a chain); :func:`fp16guard.fixing.onnx_pass.restoring_rescales` finds them by this mark.
RESCALE_MARK = "__rescale"


def _rescale_nodes(graph: onnx.GraphProto, src: str, exponent: int, dst: str,
                   notes: list[RewriteNote]) -> list[onnx.NodeProto]:
    """``dst = src * 2**exponent`` as a chain of ``Mul`` nodes whose FP32 scalar factors are each a
    normal FP16 number (:func:`~fp16guard.folding.fp16_exact_steps`), so no factor becomes inf or 0
    when the chain runs in FP16; the constants are added to ``graph``, one note to ``notes``."""
    steps = fp16_exact_steps(exponent)
    nodes, cur = [], src
    for i, step in enumerate(steps):
        suffix = "" if i == 0 else str(i)
        out = dst if i == len(steps) - 1 else f"{dst}__part{i}"
        c = f"{dst}__factor{suffix}"
        graph.initializer.append(numpy_helper.from_array(np.array(pow2(step), dtype=np.float32), c))
        nodes.append(helper.make_node("Mul", [cur, c], [out], name=f"{dst}{RESCALE_MARK}{suffix}"))
        cur = out
    notes.append(RewriteNote("rescale_op", dst, f"Mul by 2^{exponent} (no constant could absorb it)"))
    return nodes


def insert_rescales(graph: onnx.GraphProto, solution: ScaleSolution, notes: list[RewriteNote]) -> None:
    """Insert a ``Mul`` by ``2**exponent`` for each of ``solution.rescales``: on one consumer's input
    edge (one Mul per tensor and exponent), or after the producer (its output renamed
    ``{tensor}__unscaled``) when the rescale has no consumer. Appends a ``rescale_op`` note per Mul.

    Raises:
        RewriteError: a graph output has a nonzero exponent and no rescale.
    """
    by_consumer: dict[tuple[str, str], Rescale] = {}
    outputs = {o.name for o in graph.output}
    new_nodes = []
    pending_out: dict[str, tuple[str, int]] = {}  # producer output renamed -> (raw name, exponent)
    for r in solution.rescales:  # two on one value compose: a barrier's graph output scaled down, then restored
        if not r.consumer:
            pending_out[r.tensor] = (f"{r.tensor}__unscaled", pending_out.get(r.tensor, ("", 0))[1] + r.exponent)
    after_producer = set(pending_out)
    pending_out = {t: v for t, v in pending_out.items() if v[1]}
    made: dict[tuple[str, int], str] = {}
    for r in solution.rescales:
        if r.consumer:
            by_consumer[(r.tensor, r.consumer)] = r
    scaled_inputs: dict[str, str] = {}  # a graph input has no producer: its rescale comes first
    for x in [i.name for i in graph.input if i.name in pending_out]:
        _, exponent = pending_out.pop(x)
        scaled_inputs[x] = f"{x}__scaled"
        new_nodes += _rescale_nodes(graph, x, exponent, scaled_inputs[x], notes)

    def edge(x: str, consumer: str) -> str:
        """The value ``consumer`` reads in place of ``x``: the scaled graph input, rescaled once per
        tensor and exponent where the solution puts a rescale on this edge."""
        src = scaled_inputs.get(x, x)
        r = by_consumer.get((x, consumer))
        if r is None:
            return src
        if (src, r.exponent) not in made:
            made[(src, r.exponent)] = f"{src}__x2^{r.exponent}"
            new_nodes.extend(_rescale_nodes(graph, src, r.exponent, made[(src, r.exponent)], notes))
        return made[(src, r.exponent)]

    for node in graph.node:
        for k, x in enumerate(node.input):
            node.input[k] = edge(x, node.name)
        for x in dict.fromkeys(r for _, sub in subgraphs(node) for r in free_reads(sub)):
            src = edge(x, node.name)  # an outer value a subgraph reads by name: rescaled the same way
            if src != x:
                rename_free_reads(node, x, src)
        renamed = []
        for j, o in enumerate(node.output):
            if o in pending_out:
                raw, _ = pending_out[o]
                node.output[j] = raw
                renamed.append(o)
        new_nodes.append(node)
        for o in renamed:
            raw, exponent = pending_out[o]
            new_nodes += _rescale_nodes(graph, raw, exponent, o, notes)
    e = solution.exponents
    for o in outputs:
        if o not in after_producer and e.get(o, 0):
            raise RewriteError(f"graph output {o!r} has exponent {e[o]} but no rescale")
    del graph.node[:]
    graph.node.extend(new_nodes)


def check_rescaled_range(graph: onnx.GraphProto, ops: Mapping[str, ScaleOp], exponents: Mapping[str, int],
                          fp32: frozenset[str] = frozenset()) -> None:
    """Fail when a float initializer read by an op with a nonzero input exponent exceeds 65504,
    unless every such reader is one of ``fp32`` (an island: its constants stay FP32).

    Raises:
        RewriteError: such an initializer (its readers named).
    """
    for init in graph.initializer:
        v = numpy_helper.to_array(init)
        if v.dtype.kind == "f" and np.any(np.isfinite(v) & (np.abs(v.astype(np.float64)) > FP16_MAX)):
            readers = [n.name for n in graph.node if init.name in n.input]
            if any(ops.get(n) is not None and _input_exponent(ops[n], exponents) and n not in fp32 for n in readers):
                raise RewriteError(f"rescaled constant {init.name} (read by {', '.join(readers)}) exceeds 65504; "
                                   f"lower the headroom target or use --fallback fp32")


def _times_pow2(g: onnx.GraphProto, src: str, exponent: int, dst: str, name: str) -> list[onnx.NodeProto]:
    """``dst = src * 2**exponent`` as ``Mul`` nodes whose factors are each a normal FP16 number
    (:func:`~fp16guard.folding.fp16_exact_steps`), named ``{name}``, ``{name}1``, ... (not rescales:
    they belong to the op that reads them)."""
    nodes, cur = [], src
    steps = fp16_exact_steps(exponent)
    for i, step in enumerate(steps):
        out = dst if i == len(steps) - 1 else f"{dst}__part{i}"
        factor = f"{name}{i or ''}__factor"
        g.initializer.append(numpy_helper.from_array(np.array(pow2(step), np.float32), factor))
        nodes.append(helper.make_node("Mul", [cur, factor], [out], name=f"{name}{i or ''}"))
        cur = out
    return nodes


def saturate(m: onnx.ModelProto, solution: ScaleSolution, ops: Mapping[str, ScaleOp], notes: list[RewriteNote]) -> None:
    """Each ``SATURATING`` or ``GATED`` op (:mod:`fp16guard.fixing.laws`) that reads its input at an
    exponent ``k != 0`` reads ``Clip(x_s, -B 2^-k, B 2^-k) * 2^k`` (``k < 0``: ``x_s * 2^k``), ``B``
    its row's saturation bound: what it reads is the true value wherever its output is not already
    constant in FP16. A gated op ``f(x) = x g(x)`` then writes ``Where(x_s > B 2^-k, x_s, f(.) * 2^-k)``
    under its output's name (above ``B``, ``f(x)`` rounds to ``x``; below ``-B``, ``f(-B)`` to 0):
    its output stays at exponent ``k``, rounded once."""
    g = m.graph
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)
    e = solution.exponents
    nodes: list[onnx.NodeProto] = []
    for node in list(g.node):
        op = ops.get(node.name)
        k = e.get(op.inputs[0], 0) if op is not None and op.inputs else 0
        if op is None or op.role not in laws.SATURATING_ROLES or not k or not reads_scaled(op, e):
            nodes.append(node)
            continue
        bound, x, name = LAWS[node.op_type].bound, node.input[0], node.name
        read = f"{name}__sat_in"
        if k > 0:
            hi = f"{name}__sat_hi"
            lo = f"{name}__sat_lo"
            g.initializer.extend([numpy_helper.from_array(np.array(bound * pow2(-k), np.float32), hi),
                                  numpy_helper.from_array(np.array(-bound * pow2(-k), np.float32), lo)])
            clipped = f"{name}__sat_clip"
            if opset >= 11:
                nodes.append(helper.make_node("Clip", [x, lo, hi], [clipped], name=clipped))
            else:
                nodes.append(helper.make_node("Clip", [x], [clipped], name=clipped, min=-bound * pow2(-k),
                                              max=bound * pow2(-k)))
            nodes += _times_pow2(g, clipped, k, read, f"{name}__sat_mul")
        else:
            nodes += _times_pow2(g, x, k, read, f"{name}__sat_mul")
        node.input[0] = read
        if op.role is Role.SATURATING:
            nodes.append(node)
            notes.append(RewriteNote("scale", name, f"{node.op_type} reads its input stored x 2^-{k} through "
                                     f"Clip(-{bound:g} 2^-{k}, {bound:g} 2^-{k}) then Mul 2^{k} (saturated beyond "
                                     f"{bound:g}: exact)" if k > 0 else f"{node.op_type} reads its input x 2^{k}"))
            continue
        out = node.output[0]
        node.output[0] = f"{out}__sat_f"
        nodes.append(node)
        if k < 0:
            nodes += _times_pow2(g, node.output[0], -k, out, f"{name}__sat_out")
        else:
            scaled, beyond = f"{out}__sat_scaled", f"{out}__sat_beyond"
            nodes += _times_pow2(g, node.output[0], -k, scaled, f"{name}__sat_out")
            nodes += [helper.make_node("Greater", [x, f"{name}__sat_hi"], [beyond], name=beyond),
                      helper.make_node("Where", [beyond, x, scaled], [out], name=f"{name}__sat_where")]
        notes.append(RewriteNote("scale", name, f"{node.op_type} of a value stored x 2^-{k}: where(x > {bound:g} "
                                 f"2^-{k}, x, f(clip(x, +-{bound:g} 2^-{k}) 2^{k}) 2^-{k}), exact (f(x) rounds to x "
                                 f"beyond {bound:g})"
                                 if k > 0 else f"{node.op_type} of a value stored x 2^{-k}: f(x 2^{k}) 2^{-k}"))
    del g.node[:]
    g.node.extend(nodes)


def close_logs(g: onnx.GraphProto, solution: ScaleSolution, notes: list[RewriteNote]) -> None:
    """``Log(x * 2**-e) + e ln 2`` for each ``LOG`` op reading its input at exponent ``e != 0``
    (an ``Add`` after the ``Log``, writing its output's name)."""
    nodes = []
    for node in g.node:
        nodes.append(node)
        e = solution.log_offsets.get(node.name)
        if not e:
            continue
        out = node.output[0]
        node.output[0] = f"{out}__log_scaled"
        offset = f"{node.name}__log_offset"
        g.initializer.append(numpy_helper.from_array(np.array(e * np.log(2.0), np.float32), offset))
        nodes.append(helper.make_node("Add", [node.output[0], offset], [out], name=f"{node.name}__close"))
        notes.append(RewriteNote("scale", node.name, f"Log of a value stored x 2^{-e}: {e} ln 2 added after it"))
    del g.node[:]
    g.node.extend(nodes)
