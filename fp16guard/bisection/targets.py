"""The two kinds of bisect target: an ONNX graph cut at nodes, a PyTorch module cut at modules.

Both answer the same questions for :func:`fp16guard.bisection.bisect`: the candidate cuts
(``names``, ``kinds``), the error of the hybrid whose FP16 prefix ends at a cut
(``evaluate``), the longest prefix whose FP32 values all fit FP16 (``in_range_limit``: where the
rounding noise is measured), what to report about an offender (``describe``), and how to keep an
offender in FP32 for the next round (``block``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx

from fp16guard import control_flow
from fp16guard.backends import Backend, accepting
from fp16guard.bisection.onnx_split import OnnxSplitter
from fp16guard.bisection.torch_split import TorchSplitter
from fp16guard.compare import Metric
from fp16guard.errors import BisectError, ExportError, InputError
from fp16guard.fp16 import fits_fp16
from fp16guard.fp16_onnx import UnfitConstant, to_typed_fp16, unfit_constants
from fp16guard.inputs import NamedInput, onnx_feed, torch_args
from fp16guard.onnx_graph import (
    activation_values,
    consumers,
    cpu_session,
    graph_constants,
    node_reads,
    node_scope,
    subgraphs,
)
from fp16guard.onnx_stats import read_statistics, statistics_model, statistics_session
from fp16guard.stats import array_stats
from fp16guard.torch_graph import inference_copy
from fp16guard.torch_onnx import export_onnx


def _amax(arrays: Sequence[np.ndarray]) -> float:
    """Largest finite |x| over the floating arrays (integer outputs are shapes and indices)."""
    return max((array_stats(a).amax for a in arrays if np.issubdtype(np.asarray(a).dtype, np.floating)),
               default=0.0)


def _fits(a: np.ndarray) -> bool:
    """Whether a floating array is finite with ``|x| <= FP16_MAX`` (other arrays always fit)."""
    a = np.asarray(a)
    return not np.issubdtype(a.dtype, np.floating) or a.size == 0 or fits_fp16(float(np.abs(a).max()))


def _worst(errors) -> tuple[float, int]:
    """(worst error, inputs run) over an iterable of per-input errors; NaN counts as inf, and the
    first non-finite error stops the iteration: one broken input decides the cut."""
    worst, runs = 0.0, 0
    for err in errors:
        runs += 1
        worst = max(worst, err) if not math.isnan(err) else math.inf
        if worst == math.inf:
            break
    return worst, runs


def _constant_feeders(model: onnx.ModelProto, nodes: set[str]) -> set[str]:
    """Names of ``Constant`` nodes whose outputs only ``nodes`` read (they stay FP32 with them)."""
    readers = {value: {n.name for n in nodes} for value, nodes in consumers(model.graph).items()}
    return {n.name for n in model.graph.node
            if n.op_type == "Constant" and n.name and readers.get(n.output[0], set()) and readers[n.output[0]] <= nodes}


def _inside(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The nodes inside ``node``'s subgraphs, nested ones included."""
    return [n for _, sub in subgraphs(node) for n in control_flow.all_nodes(sub)]


@dataclass(frozen=True)
class CachedCut:
    """The FP16 prefix outputs of one cut, kept so that a longer prefix starts from them.

    Attributes:
        position: the cut (the position of its last node, in the target's execution order).
        values: per input, in the target's input order, the values crossing the cut as the FP16
            prefix computed them (FP32 arrays holding FP16 numbers, integer arrays as they are).
    """

    position: int
    values: tuple[dict[str, np.ndarray], ...]

    @property
    def nbytes(self) -> int:
        """Bytes of :attr:`values` over every input (what the cache holds)."""
        return sum(a.nbytes for values in self.values for a in values.values())


class OnnxSplitTarget:
    """An ONNX graph: node-level cuts, FP32 suffix in ONNX Runtime CPU.

    Prefix reuse. The search only ever moves a cut forward from the last good one: after a good
    cut ``g`` every later cut of the round lies after it. So the values crossing the last good cut
    are kept, per input (:class:`CachedCut`: at most one cut, plus the cut being evaluated), and a
    later cut runs only the nodes between the two (:meth:`OnnxSplitter.step`) in FP16, fed those
    values. This gives the numbers of the whole prefix, bit for bit, on a backend that runs every
    node on its own (``emulate``: ONNX Runtime CPU, graph optimizations off, each FP16 value
    rounded where it is written): a value crossing a cut is an FP16 number in both cases (its
    producer rounds it; an FP32 value crosses as it is), handed over as FP32 and rounded again
    exactly, and every node after the cut reads the same numbers in the same precision
    (``tests/test_bisect.py`` compares every trial's error with the whole prefixes'). Backends
    that fuse nodes (TensorRT, ONNX Runtime CUDA) could fuse across the cached cut differently:
    they run every prefix whole (:attr:`EXACT_STEP_BACKENDS`). An offender kept in FP32
    (:meth:`block`) drops the cached cut unless it lies after it.
    Memory: one cut's values per input, plus those of the cut being evaluated. PP-OCRv4 det on its
    three photos (736 x 1088 to 736 x 1920): the cached cut holds 17 to 104 MB (1 to 5 tensors
    per photo), 158 MB at most with the cut being evaluated (:attr:`cache_peak`;
    ``python benchmarks/bisect_cost.py --prefix-reuse 1`` prints it).

    Args:
        model: the FP32 graph (not modified).
        inputs: the inputs every cut is evaluated on (arrays, in graph input order).
        backend: runs each typed FP16 prefix.

    Raises:
        InputError: the model rejects an input.
    """

    stage = "node"
    #: Start each prefix from the cached values of the last good cut (class docstring); False: run
    #: every prefix from the graph inputs.
    reuse_prefix = True
    #: Backends that run node by node, for which a prefix run in two steps is exact.
    EXACT_STEP_BACKENDS = ("emulate",)

    def __init__(self, model: onnx.ModelProto, inputs: Sequence[NamedInput], backend: Backend):
        model, _ = control_flow.normalize(model)  # unique names inside subgraphs, static Ifs inlined
        self.model = model
        self.splitter = OnnxSplitter(model)
        self.backend = backend
        self.names = [c.name for c in self.splitter.candidates]
        self.kinds = [c.op_type for c in self.splitter.candidates]
        self.feeds = [onnx_feed(self.splitter.graph_inputs, item) for item in inputs]
        full = cpu_session(model)
        self.reference = []
        for item, feed in zip(inputs, self.feeds):
            try:
                self.reference.append(full.run(None, feed))
            except Exception as e:  # noqa: BLE001 - ORT raises its own types
                shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
                declared = ", ".join(f"{i.name} {i.shape}" for i in full.get_inputs())
                raise InputError(f"the model rejected input {item.label} ({shapes}; it declares {declared}): "
                                 f"{str(e).strip().splitlines()[0]}") from None
        self._suffixes: dict[int, Any] = {}
        self.fp32_nodes: set[str] = set()
        self.unfit: list[UnfitConstant] = []
        self._anchor: CachedCut | None = None  # the last good cut's prefix outputs
        self._last: CachedCut | None = None  # the cut evaluated last, until its verdict
        #: FP16 prefix nodes run so far, summed over inputs (the model's nodes, Casts not counted)
        self.prefix_nodes = 0
        #: the most bytes of prefix outputs held at once (cached cut plus the cut evaluated)
        self.cache_peak = 0

    def cut_position(self, cut: int) -> int:
        """Node index (in ``graph.node``) of the last node in the FP16 prefix of ``cut``."""
        return self.splitter.candidates[cut - 1].position

    def block(self, offender_nodes: Sequence[str], name: str) -> None:
        """Keep these nodes (and the Constants only they read) in FP32 from now on; a node with
        subgraphs is one unit: every node inside it too. The cached cut stays where every node
        newly kept in FP32 (``Constant`` nodes aside) lies after it: it did not run them."""
        before = set(self.fp32_nodes)
        self.fp32_nodes |= set(offender_nodes)
        for node in self.model.graph.node:
            if node.name in self.fp32_nodes and subgraphs(node):
                self.fp32_nodes |= {n.name for n in _inside(node)}
        self.fp32_nodes |= _constant_feeders(self.model, self.fp32_nodes)
        added = self.fp32_nodes - before
        first = next((i for i, n in enumerate(self.splitter.nodes) if n.op_type != "Constant" and n.name in added),
                     len(self.splitter.nodes))
        if self._anchor is not None and self._anchor.position >= first:
            self._anchor = None
        self._last = None

    def accept(self, position: int) -> None:
        """The cut at ``position`` was judged good: its prefix outputs (if every input ran) replace
        the cached ones, the start of every later cut of the search."""
        if self._last is not None and self._last.position == position:
            self._anchor = self._last
        self._last = None

    def _suffix_session(self, position: int, suffix: onnx.ModelProto | None):
        """The FP32 suffix session of the cut at ``position`` (one per cut, kept), or None."""
        if suffix is None:
            return None
        if position not in self._suffixes:
            self._suffixes[position] = cpu_session(suffix)
        return self._suffixes[position]

    def evaluate(self, position: int, metric: Metric, full: bool) -> tuple[float, bool, int]:
        """``(worst error over inputs, engine built?, prefix runs)`` for the hybrid whose FP16
        prefix ends at node ``position``; ``full`` marks the all-FP16 cut (its unfit constants
        are kept for the result). The prefix starts from the cached cut where it can (class
        docstring); the values crossing ``position`` are kept until :meth:`accept` or the next call."""
        prefix, suffix, live = self.splitter.split(position)
        if full and not self.unfit:
            self.unfit = unfit_constants(prefix)
        self._last = None
        reuse = self.reuse_prefix and self.backend.name in self.EXACT_STEP_BACKENDS
        anchor = self._anchor if reuse and self._anchor is not None and self._anchor.position <= position else None
        model = prefix if anchor is None else self.splitter.step(anchor.position, position)[0]
        before = self.backend.builds
        engine = None
        if model is not None:
            engine = self.backend.build(to_typed_fp16(model, node_block_list=sorted(self.fp32_nodes))[0])
        built = self.backend.builds > before
        suffix_session = self._suffix_session(position, suffix)
        kept: list[dict[str, np.ndarray]] = []

        def errors():
            """The metric on each input: FP16 prefix (from the cached cut), then the FP32 ONNX Runtime suffix."""
            for i, (feed, ref) in enumerate(zip(self.feeds, self.reference)):
                values = dict(feed)
                if anchor is not None:
                    values.update(anchor.values[i])
                if engine is not None:
                    values.update(zip(engine.output_names, engine.run(values)))
                    self.prefix_nodes += len(model.graph.node)
                if reuse:
                    kept.append({name: values[name] for name in live})
                    self.cache_peak = max(self.cache_peak, sum(a.nbytes for k in kept for a in k.values())
                                          + (self._anchor.nbytes if self._anchor is not None else 0))
                if suffix_session is not None:
                    names = [i.name for i in suffix_session.get_inputs()]
                    outs = suffix_session.run(None, {n: values[n] for n in names})
                    values.update(dict(zip([o.name for o in suffix_session.get_outputs()], outs)))
                yield metric([values[o] for o in self.splitter.graph_outputs], ref)

        worst, runs = _worst(errors())
        if reuse and runs == len(self.feeds):
            self._last = CachedCut(position, tuple(kept))
        return worst, built, runs

    def in_range_limit(self, n: int) -> int:
        """The longest cut ``<= n`` whose FP16 prefix stays in FP16 range in FP32: every node up to
        it (``Constant`` nodes aside) reads and writes floating values, activations and constants,
        that are finite with ``|x| <= FP16_MAX`` on every input. Costs one FP32 ONNX Runtime run
        per input of the graph with the range statistics of every activation before the first
        out-of-range constant inside it (:func:`~fp16guard.onnx_stats.statistics_model`: scalars
        out, whatever the model's size); no engine is built."""
        nodes = self.splitter.nodes
        constants = graph_constants(self.model)
        first_out = self._first_reader({name for name, a in constants.items() if not _fits(a)}, len(nodes))
        measured, _ = activation_values(self.model, self.splitter.types, constants)
        producer = {o: i for i, node in enumerate(nodes) for o in node.output if o}
        measured = [v for v in measured if producer.get(v, -1) < first_out]
        if measured:
            graph, outputs = statistics_model(self.model, measured, self.splitter.types, counts=False)
            session = statistics_session(graph)
            names = [o.name for o in session.get_outputs()]
            out = {value for feed in self.feeds
                   for value, s in read_statistics(dict(zip(names, session.run(None, feed))), outputs).items()
                   if s.out_of_range}
            if out:
                produced = [producer[v] for v in out if v in producer]
                first_out = min(first_out, *produced, self._first_reader(out - set(producer), first_out))
        stats = None
        for position, node in enumerate(nodes[:first_out]):  # values inside If/Loop/Scan: replayed
            if subgraphs(node):
                stats = stats if stats is not None else control_flow.inner_ranges(self.model, self.feeds)
                values = {o for n in _inside(node) for o in n.output}
                if any(s.out_of_range for run in stats for v, s in run.items() if v in values):
                    first_out = position
                    break
        return sum(1 for c in self.splitter.candidates[:n] if c.position < first_out)

    def _first_reader(self, values: set[str], default: int) -> int:
        """Position of the first node (``Constant`` nodes aside) that reads one of ``values``."""
        return next((i for i, node in enumerate(self.splitter.nodes)
                     if node.op_type != "Constant" and values.intersection(node_reads(node))), default)

    def describe(self, cut: int) -> tuple[tuple[str, ...], float]:
        """``(ONNX nodes, amax)`` of the offender at ``cut``: the node itself, and the largest
        finite |x| of the FP32 values crossing that cut (an FP32 run of the prefix)."""
        c = self.splitter.candidates[cut - 1]
        prefix, _, _ = self.splitter.split(c.position)
        session = cpu_session(prefix)
        return (c.name,), max(_amax(session.run(None, feed)) for feed in self.feeds)


class TorchSplitTarget:
    """A PyTorch module: module-level cuts, refined to ops; FP32 suffix in PyTorch.

    The module is measured as deployed, in eval mode, on a copy
    (:func:`~fp16guard.torch_graph.inference_copy`): the reference outputs and every cut come from
    that copy, so a model in train or mixed mode gives the eval-mode result, and the caller's model
    (parameters, BatchNorm statistics, training flags) is never changed.

    Args:
        model: the FP32 module, or an ``ExportedProgram``.
        inputs: the inputs every cut is evaluated on.
        backend: runs each FP16 prefix: exported to a typed FP16 ONNX where the backend takes ONNX
            models (its ``accepts``), else as the prefix's naive FP16 program (``torch``:
            :meth:`~fp16guard.backends.base.Backend.build_module`).

    Raises:
        InputError: the model rejects an input; SplitError: the model cannot be captured.
    """

    stage = "module"

    def __init__(self, model, inputs: Sequence[NamedInput], backend: Backend):
        import torch

        self.torch = torch
        self.backend = backend
        model = inference_copy(model)
        self.inputs = [torch_args(item) for item in inputs]
        self.reference = []
        with torch.no_grad():
            for item, args in zip(inputs, self.inputs):
                try:
                    out = model(*args)
                except (RuntimeError, ValueError, TypeError, IndexError) as e:
                    shapes = ", ".join(str(list(t.shape)) for t in args)
                    raise InputError(f"the model rejected input {item.label} of shape {shapes}: "
                                     f"{str(e).strip().splitlines()[0]}") from None
                self.reference.append([t.numpy() for t in torch.utils._pytree.tree_leaves(out)
                                       if isinstance(t, torch.Tensor)])
        self.splitter = TorchSplitter(model, self.inputs[0])
        self.names = [s.name for s in self.splitter.segments]
        self.kinds = [s.module_type for s in self.splitter.segments]
        self.fp32_modules: set[str] = set()
        self.unfit: list[UnfitConstant] = []
        self._exports: dict[int, tuple[onnx.ModelProto | None, str | None]] = {}
        #: each prefix exported to a typed FP16 ONNX where the backend takes ONNX models (emulate,
        #: onnxruntime, tensorrt: a module can then be kept in FP32), else run as a PyTorch program
        self.onnx_route = "onnx" in backend.accepts

    def cut_position(self, cut: int) -> int:
        """Op position (execution order) of the last op of segment ``cut - 1``."""
        return self.splitter.end_of(cut - 1)

    def block(self, offender_nodes: Sequence[str], name: str) -> None:
        """Keep module ``name``'s ops in FP32 in later prefixes (ONNX backends only)."""
        self.fp32_modules.add(name)

    def accept(self, position: int) -> None:
        """The cut at ``position`` was judged good; nothing is cached (each prefix runs whole)."""

    def _export(self, position: int, prefix) -> onnx.ModelProto:
        if position in self._exports:
            model, error = self._exports[position]
            if error:
                raise BisectError(error)
            return model
        try:
            model = export_onnx(prefix, tuple(self.inputs[0]),
                                what=f"the prefix ending at {self.splitter.op_name(position)}")
        except ExportError as e:
            self._exports[position] = (None, str(e))
            raise BisectError(str(e)) from None
        self._exports[position] = (model, None)
        return model

    def export_error(self, cut: int) -> str | None:
        """Why the prefix of ``cut`` cannot be exported to ONNX, or None if it can."""
        position = self.cut_position(cut)
        try:
            self._export(position, self.splitter.split(position)[0])
        except BisectError as e:
            return str(e)
        return None

    def exportable_limit(self, n: int) -> int:
        """Largest cut ``<= n`` whose prefix exports to ONNX (``n`` when the backend takes no ONNX
        models: it runs the PyTorch prefix itself). Post-processing the exporter cannot handle stays
        in the FP32 suffix; found by binary search over exports only (exportability shrinks with the prefix)."""
        if not self.onnx_route:
            return n  # the backend runs GraphModules: no export needed
        if self.export_error(n) is None:
            return n
        lo, hi = 0, n  # lo exports (0: the empty prefix), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.export_error(mid) is None:
                lo = mid
            else:
                hi = mid
        return lo

    def _module_nodes(self, model: onnx.ModelProto, modules: set[str]) -> list[str]:
        """Names of the exported ONNX nodes that belong to any of ``modules`` (or their children),
        from torch.onnx's ``pkg.torch.onnx.name_scopes`` metadata, else from scoped node names."""
        def inside(fqn: str) -> bool:
            """Whether module path ``fqn`` is one of ``modules`` or inside one."""
            return bool(fqn) and any(fqn == m or fqn.startswith(m + ".") for m in modules)

        return [n.name for n in model.graph.node if inside(node_scope(n))]

    def evaluate(self, position: int, metric: Metric, full: bool) -> tuple[float, bool, int]:
        """``(worst error over inputs, engine built?, prefix runs)`` for the hybrid whose FP16
        prefix ends at op ``position``; ``full`` marks the all-FP16 cut (its unfit constants are
        kept for the result).

        Raises:
            BisectError: the prefix cannot be exported, or ``all_offenders`` with the torch backend.
        """
        torch = self.torch
        prefix, suffix, live = self.splitter.split(position)
        before = self.backend.builds
        if self.onnx_route:
            model = self._export(position, prefix)
            blocked = self._module_nodes(model, self.fp32_modules) if self.fp32_modules else []
            if blocked:
                blocked += sorted(_constant_feeders(model, set(blocked)))
            fp16, conversion = to_typed_fp16(model, node_block_list=blocked)
            if full and not self.unfit:
                self.unfit = conversion.unfit
            engine = self.backend.build(fp16)
        elif self.fp32_modules:
            raise BisectError(f"all_offenders needs an ONNX backend ({', '.join(accepting('onnx'))}): the "
                              f"{self.backend.name} backend cannot keep a module in FP32 inside its FP16 prefix")
        else:
            engine = self.backend.build_module(prefix, self.inputs[0])
        built = self.backend.builds > before

        def errors():
            """The metric on each input: FP16 prefix engine, then the FP32 PyTorch suffix."""
            for args, ref in zip(self.inputs, self.reference):
                mid = engine.run({name: t.numpy() for name, t in zip(engine.input_names, args)})
                with torch.no_grad():
                    out = suffix(*(torch.from_numpy(np.require(a, requirements="C")) for a in mid), *args)
                yield metric([t.numpy() for t in out if isinstance(t, torch.Tensor)], ref)

        worst, runs = _worst(errors())
        return worst, built, runs

    def in_range_limit(self, n: int) -> int:
        """The longest cut ``<= n`` whose FP16 prefix stays in FP16 range in FP32: every op of its
        segments reads and writes floating tensors (activations, parameters, buffers) that are
        finite with ``|x| <= FP16_MAX`` on every input. Costs one FP32 run of the captured graph per
        input (:meth:`TorchSplitter.op_amax`); nothing is exported or built."""
        amax = [max(per_op) for per_op in zip(*(self.splitter.op_amax(args) for args in self.inputs))]
        for cut in range(n):
            if not all(fits_fp16(amax[p]) for p in self.splitter.op_positions(cut)):
                return cut
        return n

    def describe(self, cut: int) -> tuple[tuple[str, ...], float]:
        """``(ONNX nodes, amax)`` of the offending segment at ``cut``: its nodes in the exported
        prefix (empty if that prefix cannot be exported), and the largest finite |x| of the FP32
        values crossing the cut (an FP32 run of the prefix)."""
        torch = self.torch
        position = self.cut_position(cut)
        prefix = self.splitter.split(position)[0]
        with torch.no_grad():
            amax = max(_amax([t.numpy() for t in prefix(*args) if isinstance(t, torch.Tensor)])
                       for args in self.inputs)
        try:
            nodes = tuple(self._module_nodes(self._export(position, prefix), {self.names[cut - 1]}))
        except BisectError:
            nodes = ()
        return nodes, amax
