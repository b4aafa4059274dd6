"""Split a PyTorch model, in execution order, into a prefix and a suffix at module boundaries.

The model is captured with ``torch.export`` (falling back to ``torch.fx.symbolic_trace``); its
call nodes are put in execution order and grouped into *segments*: maximal runs of consecutive ops
that ran inside the same innermost module, read from each node's ``nn_module_stack`` metadata.
A cut after segment ``k`` gives

* the **prefix**: the model's inputs -> every value computed by segments ``0..k`` that a later
  op or the model output still needs (the values *live across the cut*), and
* the **suffix**: those live values (and any model input still needed) -> the model's outputs,

both as ``torch.fx.GraphModule`` s sharing the model's parameters. The prefix is what an FP16
backend runs (as ONNX or as an FP16 module); the suffix runs in FP32 PyTorch on its outputs, so
post-processing that cannot be exported stays on the PyTorch side.

Functional ops that run in a parent's ``forward`` (``F.relu``, ``+``) form their own segments,
named ``"<parent>.forward:<op>"`` so every candidate cut has a qualified name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from fp16guard.errors import ExportError, SplitError
from fp16guard.torch_graph import capture, module_stack


@dataclass(frozen=True)
class Segment:
    """A run of consecutive ops inside one module call: the unit a cut is placed after.

    Attributes:
        index: position in execution order (0-based).
        name: qualified module name (``"conv2_BN"``), or ``"<parent>.forward:<op>"`` for
            functional ops run in a parent's ``forward`` (the root's parent is ``"model"``).
        module_type: the module's class (``"BatchNorm2d"``) or ``"function"``.
        nodes: names of the FX nodes in this segment, in order.
        targets: their ops (``"aten.batch_norm.default"``), in order.
    """

    index: int
    name: str
    module_type: str
    nodes: tuple[str, ...]
    targets: tuple[str, ...]


def _innermost(node: fx.Node) -> tuple[str, str]:
    """``(qualified name, class name)`` of the innermost module a node ran inside."""
    stack = module_stack(node)
    if stack:
        return stack[-1]
    if node.op == "call_module":
        return str(node.target), "module"
    return "", "function"


def _largest(*values: Any) -> float:
    """Largest |x| over the floating tensors among ``values`` (nested containers too); inf when
    one holds inf or NaN, 0.0 when there is none."""
    worst = 0.0
    for t in torch.utils._pytree.tree_leaves(values):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            a = t.detach().abs().max()
            if not torch.isfinite(a):
                return math.inf
            worst = max(worst, float(a))
    return worst


class TorchSplitter:
    """Cuts of a captured PyTorch model at segment (module) boundaries, or at single ops.

    Args:
        model: an ``nn.Module`` (captured with :func:`capture`) or an ``ExportedProgram``.
        args: example inputs (tensors), used for capture.

    Attributes:
        gm: the captured ``GraphModule``.
        segments: every :class:`Segment` in execution order.
    """

    def __init__(self, model: torch.nn.Module | torch.export.ExportedProgram, args: Sequence[Any]):
        try:
            self.gm = capture(model, [tuple(args)], trace_fallback=True)
        except ExportError as e:
            raise SplitError(str(e)) from None

        self._nodes = [n for n in self.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
                       and n.target != "_guards_fn"]  # torch.export's input-shape guard: not an op
        self._position = {n.name: i for i, n in enumerate(self._nodes)}
        self.segments = self._segments()

    def _segments(self) -> list[Segment]:
        segments: list[Segment] = []
        run: list[fx.Node] = []
        key = None
        for node in self._nodes:
            fqn, kind = _innermost(node)
            k = (fqn, kind) if fqn else ("", f"op:{id(node)}")  # each root-level op stands alone
            if run and k != key:
                segments.append(self._segment(len(segments), run, key))
                run = []
            run.append(node)
            key = k
        if run:
            segments.append(self._segment(len(segments), run, key))
        return segments

    def _segment(self, index: int, nodes: list[fx.Node], key: tuple[str, str]) -> Segment:
        fqn, kind = key
        if not fqn:
            parents = nodes[0].meta.get("nn_module_stack") or {}
            parent, parent_kind = list(parents.values())[-1] if parents else ("", "model")
            parent_kind = parent_kind if isinstance(parent_kind, str) else parent_kind.__name__
            parent = _innermost(nodes[0])[0] or parent_kind.rsplit(".", 1)[-1]
            name = f"{parent}.forward:{nodes[0].name}"
            kind = "function"
        else:
            name = fqn
        return Segment(index, name, kind, tuple(n.name for n in nodes), tuple(str(n.target) for n in nodes))

    # -- cutting -------------------------------------------------------------------------------
    def end_of(self, segment: int) -> int:
        """Op position (into the execution order) of the last op of ``segment``."""
        return self._position[self.segments[segment].nodes[-1]]

    def op_positions(self, segment: int) -> list[int]:
        """Op positions of every op in ``segment``: the candidate cuts when refining inside it."""
        return [self._position[name] for name in self.segments[segment].nodes]

    def op_amax(self, args: Sequence[Any]) -> list[float]:
        """Per op, in execution order: the largest |x| over the floating tensors the op reads
        (activations, parameters, buffers; a whole module's for a ``call_module`` op of a traced
        graph) and writes, in one FP32 run of the captured graph.

        Args:
            args: the model's inputs (FP32 tensors), flattened as :meth:`split`'s prefix takes them.

        Returns:
            one float per op (same unit as the values; ``inf`` when one of them holds inf or NaN).
        """
        position, amax = self._position, [0.0] * len(self._nodes)

        class Probe(fx.Interpreter):
            """Runs the graph and records each op's largest magnitude."""

            def run_node(self, n: fx.Node) -> Any:
                """Run ``n``; for a candidate op, record the largest |x| it reads or writes
                (``inf`` if any is inf/NaN; same unit as the values)."""
                out = super().run_node(n)
                if n.name in position:
                    args_, kwargs = self.fetch_args_kwargs_from_env(n)
                    state = self.module.get_submodule(n.target).state_dict() if n.op == "call_module" else {}
                    amax[position[n.name]] = _largest(args_, kwargs, out, list(state.values()))
                return out

        with torch.no_grad():
            Probe(self.gm).run(*args)
        return amax

    def op_name(self, position: int) -> str:
        """FX node name and op of the op at ``position`` (``"batch_norm_1 (aten.batch_norm.default)"``)."""
        node = self._nodes[position]
        return f"{node.name} ({node.target})"

    def split(self, position: int, fp32_ops: frozenset[int] = frozenset()) -> tuple[fx.GraphModule, fx.GraphModule, list[str]]:
        """Prefix and suffix modules for a cut after op ``position`` (-1: empty prefix).

        Args:
            position: the last op (in execution order) that belongs to the prefix.
            fp32_ops: op positions inside the prefix that must stay FP32 anyway (earlier offenders
                under ``--all``): they move to the suffix side, so the prefix stops before the first
                of them. (The prefix is always a contiguous run from the model inputs.)

        Returns:
            ``(prefix, suffix, live)``: ``prefix(*inputs)`` returns a tuple of the live values,
            ``suffix(*live, *inputs)`` returns the model's outputs as a flat tuple (the order of
            ``torch.utils._pytree.tree_flatten`` of the model's output); ``live`` names them.
            ``inputs`` are the model's inputs flattened the same way.
        """
        if fp32_ops:
            position = min(position, min(fp32_ops) - 1)
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        inside = {n for n in self._nodes[: position + 1]}
        output_node = next(n for n in graph.nodes if n.op == "output")

        def users_outside(n: fx.Node) -> bool:
            """Whether an op outside the prefix (or the output) reads ``n``."""
            return any(u not in inside and u.op != "get_attr" for u in n.users)

        live = [n for n in self._nodes[: position + 1] if users_outside(n)]

        prefix_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for p in placeholders:
            env[p] = prefix_graph.placeholder(p.name)
        for n in graph.nodes:
            if n.op == "get_attr" and any(u in inside for u in n.users):
                env[n] = prefix_graph.node_copy(n, lambda a: env[a])
        for n in self._nodes[: position + 1]:
            env[n] = prefix_graph.node_copy(n, lambda a: env[a])
        prefix_graph.output(tuple(env[n] for n in live))

        suffix_graph = fx.Graph()
        senv: dict[fx.Node, fx.Node] = {}
        for n in live:
            senv[n] = suffix_graph.placeholder(f"live_{n.name}")
        for p in placeholders:
            senv[p] = suffix_graph.placeholder(p.name)
        for n in graph.nodes:
            if n.op == "get_attr" and any(u not in inside for u in n.users):
                senv[n] = suffix_graph.node_copy(n, lambda a: senv[a])
        for n in self._nodes[position + 1:]:
            senv[n] = suffix_graph.node_copy(n, lambda a: senv[a])
        outputs = torch.utils._pytree.tree_leaves(output_node.args[0])
        suffix_graph.output(tuple(senv[a] if isinstance(a, fx.Node) else a for a in outputs))

        prefix = fx.GraphModule(self.gm, prefix_graph, "prefix")
        suffix = fx.GraphModule(self.gm, suffix_graph, "suffix")
        return prefix, suffix, [n.name for n in live]
