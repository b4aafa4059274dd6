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
   :class:`~fp16guard.fixing.solver_model.Role`), so the PyTorch and ONNX paths share one solver.
3. :func:`activation_amax`: calibration amax of every activation (node), kept on the device and
   read back once per forward.
4. :func:`apply_exponents`: the solution's power-of-two exponents folded into weights, biases,
   norm epsilons, constant multipliers, clamp bounds and pad values; an explicit
   ``aten.mul`` by a power of two only where :class:`~fp16guard.fixing.solver_model.Rescale` asks for one.
5. :func:`to_fp16_program`: the typed FP16 program (FP16 constants and activations, FP32 graph
   inputs and outputs, named nodes optionally kept in FP32 with casts around them), what
   ``fp16guard fix ... -o OUT.pt2`` saves with ``torch.export.save``.
6. :func:`run_emulated`: strict FP16 emulation of such a program on the CPU (every op computed in
   FP32 from FP16-stored inputs and rounded to FP16), the counterpart of the ``emulate`` ONNX
   backend; PyTorch's own CPU FP16 kernels are 40x slower than FP32 on the crepe example.

Names: the plan's tensors are fx node names of the graph after step 1 (each ATen op writes one
value named like the node, e.g. ``conv2d_1``); ``capture`` and ``fold_batchnorms`` are
deterministic, so calibration and application see the same names.

Each pass's machinery is a module of its own job, which this one drives:
:mod:`~fp16guard.fixing.torch_edit` (ATen packets, law-table rows, copy-on-write constants),
:mod:`~fp16guard.fixing.torch_fold` (BatchNorm folding), :mod:`~fp16guard.fixing.torch_roles` (each
op as the solver sees it), :mod:`~fp16guard.fixing.torch_exponents` (the rewrites of
:func:`apply_exponents`) and :mod:`~fp16guard.fixing.torch_typed` (the typed program's builder). The
emulator and the device copy of a program (:func:`run_emulated`, :func:`program_on`) are the
backends' (:mod:`fp16guard.backends.torch_program`), imported here for this module's callers.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from fp16guard import progress
# the emulator and a program's device copy are the backends' (their one home), imported for this module's callers
from fp16guard.backends.torch_program import program_on, run_emulated  # noqa: F401
from fp16guard.errors import ExportError, RewriteError, first_line
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.solver_model import Role, ScaleOp, ScaleSolution
from fp16guard.fixing.torch_edit import (
    ATTENTION,
    NORM_OPS,
    SCALAR_MARK,
    TIED_SCALARS,
    Constants,
    activations,
    aten,
    copy_module,
    is_float_value,
    op_packet,
    packets,
)
from fp16guard.fixing.torch_exponents import (
    RESCALE_META,
    close_logs,
    insert_rescales,
    saturate,
    scale_arg,
    scale_attention,
    scale_constant_operands,
    scale_eps,
    scale_hardsigmoid,
    scale_linear,
    scale_tied,
)
from fp16guard.fixing.torch_fold import (
    batchnorm_affine,
    batchnorm_outputs,
    batchnorm_to_mul_add,
    erase_batchnorm,
    fold_into_conv,
)
from fp16guard.fixing.torch_roles import SCALE_BLIND_OPS, attention_ops, op_role, scaled_constants
from fp16guard.fixing.torch_typed import Fp16Program
from fp16guard.folding import raise_small
from fp16guard.fp16 import BF16_MAX, BF16_MIN_SUBNORMAL
from fp16guard.torch_graph import dynamic_dims, get_attr, module_scope


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
    consts = Constants(gm)
    notes: list[RewriteNote] = []
    bn_ops = packets("batch_norm", "_native_batch_norm_legit_no_training")
    for bn in list(g.nodes):
        if op_packet(bn) not in bn_ops:
            continue
        c, scale, shift, var = batchnorm_affine(bn, consts)
        out_nodes = batchnorm_outputs(bn)
        conv = bn.args[0] if isinstance(bn.args[0], fx.Node) else None
        if conv is not None and fold_into_conv(gm, consts, conv, c, scale, shift):
            for o in out_nodes:
                o.replace_all_uses_with(conv)
            notes.append(RewriteNote("fold_batchnorm", bn.name, f"folded into {conv.name} in float64 "
                                     f"(running variance amax {float(np.max(var)):.4g})"))
            erase_batchnorm(g, bn, out_nodes)
        else:
            notes.append(batchnorm_to_mul_add(gm, consts, bn, out_nodes, c, scale, shift, conv))
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm, notes


def scale_ops(gm: fx.GraphModule) -> list[ScaleOp]:
    """The graph as :func:`fp16guard.fixing.solver.solve` sees it.

    Each ``call_function`` node whose value depends on a graph input is one
    :class:`~fp16guard.fixing.solver_model.ScaleOp` named like the node, writing the value of the same name;
    its inputs are the activation nodes it reads (constants left out). Roles: the law table
    (:mod:`fp16guard.fixing.laws`, :func:`op_role`), the one the ONNX pass reads too; an op it lacks is a
    barrier.

    Args:
        gm: a captured graph after :func:`fold_batchnorms`.
    """
    acts = activations(gm)
    consts = Constants(gm)
    ops = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node.name not in acts:
            continue
        reads = [a.name for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node) and a.name in acts]
        if op_packet(node) in SCALE_BLIND_OPS:
            reads = []  # reads a shape or dtype, not values
        if op_packet(node) is aten.embedding:
            reads = []  # the table is a constant, the indices integers
        outs = (node.name,) if is_float_value(node) or "val" not in node.meta and "tensor_meta" not in node.meta else ()
        if op_packet(node) is ATTENTION and len(node.args) >= 3 and node.kwargs.get("dropout_p", 0.0) == 0.0:
            ops += attention_ops(node, acts)
            continue
        role, degree = op_role(node, acts) if node.op == "call_function" else (Role.BARRIER, Fraction(1))
        # a product reads x twice in x * x (exponent 2e); elsewhere each activation counts once
        ins = tuple(reads) if role in (Role.PRODUCT, Role.QUOTIENT) else tuple(dict.fromkeys(reads))
        ops.append(ScaleOp(node.name, role, ins, outs, module_scope(node), degree,
                           scaled_constants(node, role, ins, consts) if node.op == "call_function" else ()))
    return ops


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
    * each :class:`~fp16guard.fixing.solver_model.Rescale`: ``aten.mul`` by ``2**exponent`` on that edge.
    * saturating ops (sigmoid, tanh, erf) reading exponent ``k``: ``clamp(-B 2^-k, B 2^-k)``, ``mul 2^k``
      before them; gated ones (silu, gelu, hardswish, mish) also ``where(x > B 2^-k, x, f * 2^-k)``
      after (:func:`saturate`, :mod:`fp16guard.fixing.laws`); ``relu6`` with ``e != 0`` becomes
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
    consts = Constants(gm, (n for u in solution.unfixable for n in u.ops))
    e = solution.exponents
    ops = {op.name: op for op in scale_ops(gm)}
    acts = activations(gm)
    notes: list[RewriteNote] = []
    for node in list(g.nodes):
        op = ops.get(node.name)
        if op is None:
            continue
        p = op_packet(node)
        e_in = e.get(op.inputs[0], 0) if op.inputs else 0
        e_out = solution.produced(op)
        note = None
        if op.role is Role.LINEAR:
            note = scale_linear(consts, node, op, e_in, e_out)
        elif op.role is Role.BOUNDED and e_in and p in NORM_OPS:
            scale_eps(node, NORM_OPS[p][2], e_in)
            note = RewriteNote("scale", node.name, f"norm eps x 2^{-2 * e_in}")
        elif op.role is Role.BOUNDED and e_in:
            note = scale_hardsigmoid(g, node, e_in)
        elif op.role is Role.TIED and e_in and p in TIED_SCALARS:
            note = scale_tied(consts, node, op, e_in)
        if op.role is Role.TIED and e_in and p is not ATTENTION:
            note = scale_constant_operands(g, node, op, e_in, acts) or note
        if p is ATTENTION:
            note = scale_attention(node, e) or note
        elif op.role is Role.TIED and not op.inputs and e_out and p is aten.embedding:
            scale_arg(consts, node, 0, -e_out)  # the table, read at integer indices
            note = RewriteNote("scale", node.name, f"embedding table x 2^{-e_out}")
        if note is not None:
            notes.append(note)
    notes.extend(insert_rescales(g, solution))
    notes.extend(saturate(g, solution, ops))
    notes.extend(close_logs(g, solution))
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm, notes


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


def raise_constants(gm: fx.GraphModule, raises: Sequence[tuple[str, float]]) -> tuple[fx.GraphModule, list[RewriteNote]]:
    """Raise constants FP16 flushes to zero: every nonzero ``|x| < floor`` becomes ``sign(x) * floor``.

    Args:
        gm: the graph (not modified).
        raises: ``(get_attr target, floor)`` pairs (the plan's consented underflow entries).

    Raises:
        RewriteError: no ``get_attr`` node reads that target.
    """
    gm = copy_module(gm)
    consts = Constants(gm)
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
    program = Fp16Program(gm)
    unfit = bf16_unfit_readers(gm) if island_dtype == torch.bfloat16 else set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            program.add_input(node)
        elif node.op == "get_attr":
            continue  # read() makes the constant in the precision its reader needs
        elif node.op == "output":
            program.add_output(node)
        elif op_packet(node) is getattr(aten, "_assert_tensor_metadata", None):
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
