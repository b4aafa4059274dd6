"""The two kinds of model the fix rewrites, behind one :class:`FixTarget` protocol.

The pipeline (:mod:`fp16guard.fixing.pipeline`) calibrates, solves, applies, converts and verifies
through these methods only, so an ONNX graph and a PyTorch module share every step but the
adapter:

* :class:`OnnxFixTarget`: an FP32 ONNX graph; passes in :mod:`fp16guard.fixing.onnx_pass`, typed
  FP16 conversion by :func:`fp16guard.fp16_onnx.to_typed_fp16`, verification on any ONNX backend.
* :class:`TorchFixTarget`: a ``torch.nn.Module`` captured once with ``torch.export``; passes in
  :mod:`fp16guard.fixing.torch_pass`, a typed FP16 ``GraphModule`` out, verification on a backend
  that takes PyTorch programs (``emulate``: strict FP16 emulation on the CPU; ``torch``: PyTorch's
  FP16 kernels on CUDA).

Both check their inputs (:meth:`FixTarget.check_feeds`), build their verification engine from a
backend (:meth:`FixTarget.runner`) and write the fixed model (:meth:`FixTarget.save`) behind the
same methods, so the pipeline and the command line call one method for either.

Each target loads or captures its model once, when it is built, and keeps the two graphs every
step needs: ``base`` (the model as captured, for the FP32 fallback) and ``prepared`` (after the
structural passes: BatchNorms and bias constants folded; the graph a plan names).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import fx
from torch.utils._pytree import tree_flatten

from fp16guard import control_flow
from fp16guard.backends import Backend, get_backend
from fp16guard.errors import ModelLoadError, PlanError
from fp16guard.fixing import onnx_pass, torch_masks, torch_pass
from fp16guard.fixing.joint_ranges import joint_model
from fp16guard.fixing.module_scales import module_scales
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.solver_model import ScaleOp, ScaleSolution
from fp16guard.fp16 import FP16_MAX, FP16_MIN_SUBNORMAL
from fp16guard.fp16_onnx import ISLAND_DTYPES, Fp16Conversion, to_typed_fp16, unfit_constants
from fp16guard.inputs import NamedInput, check_feeds, onnx_feed, torch_args
from fp16guard.loading import refuse_fp16_module  # noqa: F401 - re-exported: fp16guard.fixing.targets.refuse_fp16_module
from fp16guard.onnx_graph import (
    consumers,
    cpu_session,
    fed_inputs,
    load_onnx,
    node_reads,
    inputs_only,
    refuse_fp16_model,
    skeleton,
)
from fp16guard.onnx_graph import model_sha256 as onnx_model_sha256
from fp16guard.onnx_ranges import value_ranges
from fp16guard.plan import RewritePlan
from fp16guard.torch_graph import capture, get_attr, inference_copy, state_dict_sha256

logger = logging.getLogger("fp16guard")

#: ``(node name, input value names, output value names)``: a graph op as the FP32-fallback rule sees it.
NodeIO = tuple[str, Sequence[str], Sequence[str]]

#: Runs one FP16 model on one input and returns its outputs (numpy, FP32).
Runner = Callable[[NamedInput], list[np.ndarray]]


class FixTarget(Protocol):
    """What the fix pipeline needs of a model, whatever its framework.

    Attributes:
        framework: the graph a plan for it names: ``"onnx"`` or ``"torch"``.
        source: the model's display name.
        model_sha256: what a plan's ``model_sha256`` must equal to be applied to it.
    """

    framework: str
    source: str
    model_sha256: str

    def activation_amax(self, inputs: Sequence[NamedInput], *, prepared: bool = True) -> dict[str, float]:
        """Max |x| of every activation of the prepared (or base) graph over ``inputs``; inf where
        a value is ever non-finite."""

    def flushed_values(self, inputs: Sequence[NamedInput]) -> set[str]:
        """Activations of the prepared graph holding a nonzero value FP16 flushes to zero
        (``|x| < 2**-24``, unscaled) on ``inputs``."""

    def scale_ops(self) -> list[ScaleOp]:
        """The prepared graph as the solver sees it."""

    def graph_io(self) -> tuple[list[str], list[str]]:
        """``(input, output)`` value names of the prepared graph."""

    def flushed_constants(self) -> list[tuple[str, list[str], float, int]]:
        """``(name, readers, amax, flushed)`` of each prepared-graph constant FP16 flushes entirely to 0."""

    def fallback_graph(self) -> tuple[list[NodeIO], set[str]]:
        """The base graph's ops and the names of its constants beyond 65504 (the FP32 fallback's input)."""

    def rewrite(self, solution: ScaleSolution, raises: Sequence[tuple[str, float]]) -> tuple[object, list[RewriteNote]]:
        """The prepared graph with the solution's exponents folded in and the consented constant raises."""

    def convert(self, graph: object, fp32_nodes: Sequence[str], *, islands: str = "fp32") -> tuple[object, Fp16Conversion]:
        """The typed FP16 model of an FP32 graph, ``fp32_nodes`` kept in FP32 (``islands="bf16"``: run in
        BF16 where the op has a BF16 form)."""

    def references(self, inputs: Sequence[NamedInput]) -> list[list[np.ndarray]]:
        """The FP32 model's outputs on each input."""

    def complete_plan(self, plan: RewritePlan, amax: Mapping[str, float] | None = None) -> RewritePlan:
        """The calibrated plan with what only this framework's rewriters need (PyTorch: per-module
        scales for the mmdeploy rewriters)."""

    def runner(self, fixed: object, backend: str | Backend) -> tuple[str, Runner]:
        """``(backend description, run)`` for an FP16 model made by :meth:`convert`: the backend
        builds its engine (:meth:`~fp16guard.backends.base.Backend.build`).

        Raises:
            BackendError: the backend does not take this kind of model (its ``accepts``), or cannot run here.
        """

    def check_feeds(self, items: Sequence[NamedInput], what: str) -> None:
        """Refuse, before any long run, an item the model does not take.

        Raises:
            InputError: ``<what> <label>...``, naming the input and what the model takes.
        """

    def save(self, fixed: object, path: str | Path) -> str:
        """Write an FP16 model made by :meth:`convert` to ``path`` (``.onnx``, or ``.pt2`` for a
        PyTorch program); returns the path written.

        Raises:
            ExportError: a PyTorch program ``torch.export`` cannot re-capture.
        """


def _same_inputs(a, b) -> bool:
    """Whether two ``(prepared, inputs)`` keys name the same graph and the very same input objects."""
    return a is not None and a[0] == b[0] and len(a[1]) == len(b[1]) and all(x is y for x, y in zip(a[1], b[1]))


def _amax_of(runs: Sequence[Mapping]) -> dict[str, float]:
    """Max amax per value over runs of :func:`~fp16guard.onnx_ranges.value_ranges`; inf if ever non-finite."""
    out: dict[str, float] = {}
    for run in runs:
        for name, s in run.items():
            out[name] = math.inf if s.nonfinite or out.get(name) == math.inf else max(out.get(name, 0.0), s.amax)
    return out


#: The structural passes after ``constants_to_initializers``: additive masks beyond FP16 saturated
#: (:func:`~fp16guard.fixing.onnx_pass.saturate_masks`), bias Adds and BatchNorms folded.
STRUCTURAL_PASSES = (onnx_pass.saturate_masks, onnx_pass.fold_affine_constants, onnx_pass.fold_batchnorms,
                     onnx_pass.fold_affine_constants)


def prepare_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """Constants to initializers, then the :data:`STRUCTURAL_PASSES`.

    Returns ``(model', notes)``; ``model`` is not modified.
    """
    model, notes = onnx_pass.constants_to_initializers(model)
    return _structural(model, notes)


def _structural(model: onnx.ModelProto, notes: list[RewriteNote]) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """The :data:`STRUCTURAL_PASSES` on a model whose constants are initializers; notes appended."""
    notes = list(notes)
    for rewrite in STRUCTURAL_PASSES:
        model, n = rewrite(model)
        notes += n
    return model, notes


class OnnxFixTarget:
    """An FP32 ONNX model to fix.

    Args:
        model: ``.onnx`` path or ``onnx.ModelProto`` (loaded once; never modified).
        source: display name (default: the file name or the graph's name).
        model_sha256: the identity a plan must carry (default: SHA-256 of the serialized model;
            a PyTorch module exported to ONNX passes its state_dict hash).
        memory_budget: bytes of intermediate values held at once while measuring.

    Control flow (``If``/``Loop``/``Scan``): names inside subgraphs are made unique and an ``If``
    whose condition is static is inlined (:func:`fp16guard.control_flow.normalize`, a
    ``control_flow`` note); calibration measures the values inside the subgraphs where they ran
    (:func:`~fp16guard.control_flow.inner_ranges`). The scale solver sees a control flow node as a
    barrier (true values in and out, the outer values its subgraphs read included); its subgraphs
    are converted to FP16, except the inner nodes that write or read values beyond FP16 in
    calibration, which the plan keeps in FP32 (``unfixable`` entries: islands inside the
    subgraph). A subgraph that never ran in calibration is converted unmeasured, with a warning
    and a ``control_flow`` note.

    A float64 model is computed in float32 (:func:`~fp16guard.fixing.onnx_pass.doubles_to_float`; its
    FP32 references still come from the float64 model), and weights also listed as graph inputs
    become plain initializers (:func:`~fp16guard.fixing.onnx_pass.initializer_inputs_to_constants`);
    both are notes of the fix.

    Raises:
        ModelLoadError: the file is missing or not a valid ONNX model, or it is already converted to
            FP16 (:func:`~fp16guard.onnx_graph.refuse_fp16_model`).
    """

    framework = "onnx"

    def __init__(self, model: str | Path | onnx.ModelProto, *, source: str | None = None,
                 model_sha256: str | None = None, memory_budget: int = 1 << 30):
        self.original = load_onnx(model)
        refuse_fp16_model(self.original, "calibrate and fix")
        self.source = source or (Path(model).name if not isinstance(model, onnx.ModelProto)
                                 else self.original.graph.name or "model")
        self.model_sha256 = model_sha256 or onnx_model_sha256(self.original)
        self.memory_budget = memory_budget
        self.input_names = fed_inputs(self.original)
        fp32, notes = onnx_pass.doubles_to_float(self.original)
        self._float64 = bool(notes)  # its references come from the float64 model, not the calibration run
        self._outputs: list[tuple[NamedInput, list]] = []  # the FP32 outputs of the last calibration run
        fp32, more = onnx_pass.initializer_inputs_to_constants(fp32)
        fp32, flow = control_flow.normalize(fp32)
        more += [RewriteNote("control_flow", "graph", change) for change in flow]
        self.base, constants = onnx_pass.constants_to_initializers(fp32)
        self.prepared, self.prepared_notes = _structural(self.base, notes + more + constants)
        self.control_notes: list[RewriteNote] = []  # subgraphs the last calibration never ran
        self._checked = _passes_checker(self.base)  # then every typed FP16 model of it must pass too
        if not self._float64:  # the base graph computes what it does: keep only its inputs (memory)
            self.original = inputs_only(self.original)
        self._last_ranges: tuple = (None, ([], []))
        self._joint: bool | None = None  # False once the graphs were found not to join
        self._scale_ops: tuple[ScaleOp, ...] | None = None
        self._flushed_constants: list | None = None

    def feed(self, item: NamedInput) -> dict[str, np.ndarray]:
        """``item`` as a feed of the model's graph inputs (one inputs-to-feeds path: :func:`onnx_feed`)."""
        return onnx_feed(self.input_names, item)

    def check_feeds(self, items: Sequence[NamedInput], what: str) -> None:
        """Refuse, before any run, an item the graph's declared inputs do not take: the one check of
        inputs against a model (:func:`fp16guard.inputs.check_feeds`), on the model as given.

        Raises:
            InputError: naming the item (``what`` and its label), the input, and the shape or
                type the graph declares.
        """
        check_feeds(self.original, items, framework=self.framework, what=what)

    def activation_amax(self, inputs: Sequence[NamedInput], *, prepared: bool = True) -> dict[str, float]:
        """See :meth:`FixTarget.activation_amax`."""
        return _amax_of(self._ranges(inputs, prepared))

    def flushed_values(self, inputs: Sequence[NamedInput]) -> set[str]:
        """See :meth:`FixTarget.flushed_values`."""
        return {name for run in self._ranges(inputs, True) for name, s in run.items() if s.flush_to_zero}

    def _ranges(self, inputs: Sequence[NamedInput], prepared: bool) -> list:
        """:func:`value_ranges` of the prepared (or base) graph, both measured together and kept for
        the last inputs asked (:meth:`_measure`)."""
        key = (True, list(inputs))  # the inputs themselves: held, so their ids cannot be reused
        if not _same_inputs(self._last_ranges[0], key):
            self._last_ranges = (key, self._measure(inputs))
            self.control_notes = []
            for owner, attr in control_flow.unmeasured(self.prepared, self._last_ranges[1][1]):
                what = (f"{control_flow.branch_label(owner, attr)} never ran in calibration: converted to "
                        f"FP16 unmeasured")
                logger.warning("%s", what)
                self.control_notes.append(RewriteNote("control_flow", owner.name, what))
        return self._last_ranges[1][1 if prepared else 0]

    def _measure(self, inputs: Sequence[NamedInput]) -> tuple[list, list]:
        """``(base runs, prepared runs)`` of :func:`value_ranges` on ``inputs``: one ONNX Runtime run
        per input of the joint graph (:func:`~fp16guard.fixing.joint_ranges.joint_model`), amax and
        inf/NaN counts only, plus the flush counts of the values :meth:`flushed_values` can matter
        for (:meth:`_count_values`); two runs per input where the graphs cannot be joined."""
        feeds = [self.feed(i) for i in inputs]
        labels = [i.label for i in inputs]
        counts = self._count_values()
        self._outputs = []
        joint = joint_model(self.base, self.prepared) if self._joint is not False else None
        if joint is None:  # made for each calibration and consumed by it: not held (memory)
            self._joint = False
            return (value_ranges(self.base, feeds, labels=labels, memory_budget=self.memory_budget, counts=False),
                    value_ranges(self.prepared, feeds, labels=labels, memory_budget=self.memory_budget, counts=counts))
        kept: list | None = [] if not self._float64 else None
        runs = value_ranges(joint.model, feeds, labels=labels, memory_budget=self.memory_budget,
                            counts={joint.prepared_values.get(v, v) for v in counts}, outputs=kept, consume=True)
        self._outputs = list(zip(inputs, kept)) if kept is not None else []
        main = set(joint.measured)
        base_runs, prepared_runs = [], []
        for run in runs:
            inner = {k: v for k, v in run.items() if k not in main}  # inside subgraphs: the same in both
            base_runs.append({**{v: run[v] for v in joint.base_values}, **inner})
            prepared_runs.append({**{v: run[j] for v, j in joint.prepared_values.items()}, **inner})
        return base_runs, prepared_runs

    def _count_values(self) -> set[str]:
        """Prepared-graph values downstream of a reader of a constant FP16 flushes to zero: the only
        ones whose flush counts :func:`~fp16guard.fixing.calibration.underflow_islands` reads."""
        readers = consumers(self.prepared.graph)
        todo = [n for name, _, _, _ in self.flushed_constants() for n in readers.get(name, [])]
        out: set[str] = set()
        while todo:
            node = todo.pop()
            for o in node.output:
                if o and o not in out:
                    out.add(o)
                    todo += readers.get(o, [])
        return out

    def scale_ops(self) -> list[ScaleOp]:
        """See :meth:`FixTarget.scale_ops` (worked out once: the prepared graph never changes)."""
        if self._scale_ops is None:
            self._scale_ops = tuple(onnx_pass.scale_ops(self.prepared))
        return list(self._scale_ops)

    def graph_io(self) -> tuple[list[str], list[str]]:
        """See :meth:`FixTarget.graph_io`."""
        g = self.prepared.graph
        return [i.name for i in g.input], [o.name for o in g.output]

    def flushed_constants(self) -> list[tuple[str, list[str], float, int]]:
        """See :meth:`FixTarget.flushed_constants` (worked out once)."""
        if self._flushed_constants is None:
            self._flushed_constants = self._find_flushed_constants()
        return [(name, list(readers), amax, n) for name, readers, amax, n in self._flushed_constants]

    def _find_flushed_constants(self) -> list[tuple[str, list[str], float, int]]:
        """:meth:`flushed_constants` of the prepared graph."""
        readers = consumers(self.prepared.graph)
        values = {i.name: i for i in self.prepared.graph.initializer}
        out = []
        for u in unfit_constants(self.prepared):
            init = values.get(u.name)
            if u.flushed and init is not None and u.flushed == int(np.count_nonzero(onnx.numpy_helper.to_array(init))):
                out.append((u.name, list(dict.fromkeys(n.name for n in readers.get(u.name, []))), u.amax, u.flushed))
        return out

    def fallback_graph(self) -> tuple[list[NodeIO], set[str]]:
        """See :meth:`FixTarget.fallback_graph`."""
        graph = self.base.graph  # the nodes inside subgraphs too, with the outer values they read
        nodes = [(n.name, node_reads(n), list(n.output)) for n in control_flow.all_nodes(graph)]
        return nodes, {u.name for u in unfit_constants(self.base) if u.overflow}

    def rewrite(self, solution: ScaleSolution, raises: Sequence[tuple[str, float]]):
        """See :meth:`FixTarget.rewrite`."""
        scaled, notes = onnx_pass.apply_exponents(self.prepared, solution, self.scale_ops())
        if raises:
            scaled, n = onnx_pass.raise_constants(scaled, raises)
            notes += n
        return scaled, [*self.control_notes, *notes]

    def convert(self, graph: onnx.ModelProto, fp32_nodes: Sequence[str], *,
                islands: str = "fp32") -> tuple[onnx.ModelProto, Fp16Conversion]:
        """See :meth:`FixTarget.convert` (:func:`~fp16guard.fp16_onnx.to_typed_fp16`); rescales that
        restore values only for FP32 readers or graph outputs run in FP32 with them
        (:func:`~fp16guard.fixing.onnx_pass.restoring_rescales`), or in BF16 with BF16 islands."""
        nodes = [*fp32_nodes, *onnx_pass.restoring_rescales(graph, fp32_nodes)]
        merged = onnx_pass.merge_fp32_rescale_chains(graph, nodes)  # one FP32 Mul where a chain runs in FP32
        gone = {n.name for n in graph.graph.node} - {n.name for n in merged.graph.node}
        graph, nodes = merged, [n for n in nodes if n not in gone]
        fixed, conversion = to_typed_fp16(graph, node_block_list=nodes, island_dtype=ISLAND_DTYPES[islands])
        if self._checked:  # the FP32 model passes onnx.checker, so a typed FP16 model that does not is a bug
            onnx.checker.check_model(skeleton(fixed), full_check=True)
        return fixed, conversion

    def references(self, inputs: Sequence[NamedInput]) -> list[list[np.ndarray]]:
        """See :meth:`FixTarget.references` (ONNX Runtime, CPU, the model as given: a float64 model
        is fed and run in float64, its outputs returned as float32; any other as the base graph,
        which computes the same). The inputs the last calibration ran on take their outputs from
        that run (:meth:`_measure`), the others run again."""
        known = [next((o for i, o in self._outputs if i is item), None) for item in inputs]
        if all(k is not None for k in known):  # the calibration's own run gave them (_measure)
            return [list(k) for k in known]
        session = cpu_session(self.original if self._float64 else self.base)
        declared = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                    for i in self.original.graph.input if i.type.tensor_type.elem_type == TensorProto.DOUBLE}
        out = []
        for item, k in zip(inputs, known):
            if k is not None:
                out.append(list(k))
                continue
            feed = {k: v.astype(declared[k]) if k in declared else v for k, v in self.feed(item).items()}
            out.append([o.astype(np.float32) if o.dtype == np.float64 else o for o in session.run(None, feed)])
        return out

    def complete_plan(self, plan: RewritePlan, amax: Mapping[str, float] | None = None) -> RewritePlan:
        """See :meth:`FixTarget.complete_plan`: the islands inside ``If``/``Loop``/``Scan`` subgraphs
        (:func:`~fp16guard.control_flow.inner_islands`: their values are never scaled, so an inner
        node that writes or reads a value beyond FP16 in calibration runs in FP32), as ``unfixable``
        entries."""
        islands = control_flow.inner_islands(self.prepared, amax or {})
        known = {n for entry in plan.unfixable for n in entry["nodes"]}
        islands = [e for e in islands if not set(e["nodes"]) <= known]
        return replace(plan, unfixable=[*plan.unfixable, *islands]) if islands else plan

    def runner(self, fixed: onnx.ModelProto, backend: str | Backend) -> tuple[str, Runner]:
        """See :meth:`FixTarget.runner`: ``backend`` builds an engine of ``fixed`` (a typed FP16 ONNX)."""
        be = get_backend(backend) if isinstance(backend, str) else backend
        engine = be.build(fixed)
        return engine.description or be.describe(), lambda item: engine.run(self.feed(item))

    def save(self, fixed: onnx.ModelProto, path: str | Path) -> str:
        """See :meth:`FixTarget.save` (``onnx.save``)."""
        onnx.save(fixed, str(path))
        return str(path)


class TorchFixTarget:
    """A PyTorch module to fix, captured once with ``torch.export``.

    The module is calibrated, rewritten and verified as deployed, in eval mode, on a copy
    (:func:`~fp16guard.torch_graph.inference_copy`; ``model`` is that copy): a module in train or
    mixed mode gets the eval-mode plan, and the caller's module (parameters, BatchNorm statistics,
    training flags) is never changed.

    Args:
        model: ``torch.nn.Module``.
        inputs: every input the command will run (calibration and validation): input dimensions
            that differ between them are captured as dynamic.
        source: display name (default: the class name).

    Raises:
        ExportError: ``torch.export`` cannot capture the module.
        ModelLoadError: the module cannot be deep-copied.
        RewriteError: a BatchNorm in training mode inside a graph ``torch.export`` made in train mode.
    """

    framework = "torch"

    def __init__(self, model, inputs: Sequence[NamedInput], *, source: str | None = None):
        self.model = inference_copy(model)
        self.source = source or type(model).__name__
        self.model_sha256 = state_dict_sha256(self.model)
        self.examples = [torch_args(i) for i in inputs]
        self.base = torch_pass.annotate(capture(self.model, self.examples), self.examples[0])
        masked, self.prepared_notes = torch_masks.saturate_masks(self.base)
        masked, notes = torch_masks.guard_bool_masks(masked)
        self.prepared, more = torch_pass.fold_batchnorms(masked)
        self.prepared_notes += notes + more
        torch_pass.annotate(self.prepared, self.examples[0])
        self._flushed: tuple = (None, set())

    def check_feeds(self, items: Sequence[NamedInput], what: str) -> None:
        """Refuse, before any long run, an item the module does not take: the one check of inputs
        against a model (:func:`fp16guard.inputs.check_feeds`), with its eval-mode copy run once in
        FP32 on each item (one plain forward each).

        Raises:
            InputError: ``<what> <label> of shape [...]: the model rejects it: <the model's first error line>``.
        """
        check_feeds(self.model, items, framework=self.framework, what=what, run=True)

    def activation_amax(self, inputs: Sequence[NamedInput], *, prepared: bool = True) -> dict[str, float]:
        """See :meth:`FixTarget.activation_amax`."""
        flushed: set[str] = set()
        amax = torch_pass.activation_amax(self.prepared if prepared else self.base, [torch_args(i) for i in inputs],
                                          flushed)
        if prepared:
            self._flushed = ((True, list(inputs)), flushed)
        return amax

    def flushed_values(self, inputs: Sequence[NamedInput]) -> set[str]:
        """See :meth:`FixTarget.flushed_values`."""
        if not _same_inputs(self._flushed[0], (True, list(inputs))):
            self.activation_amax(inputs)
        return self._flushed[1]

    def scale_ops(self) -> list[ScaleOp]:
        """See :meth:`FixTarget.scale_ops`."""
        return torch_pass.scale_ops(self.prepared)

    def graph_io(self) -> tuple[list[str], list[str]]:
        """See :meth:`FixTarget.graph_io`."""
        return torch_pass.graph_io(self.prepared)

    def flushed_constants(self) -> list[tuple[str, list[str], float, int]]:
        """See :meth:`FixTarget.flushed_constants`."""
        out = []
        for target, (value, readers) in torch_pass.constants(self.prepared).items():
            nonzero = int(np.count_nonzero(value))
            flushed = int(np.count_nonzero((value != 0) & (np.abs(value) <= FP16_MIN_SUBNORMAL / 2)))
            if flushed and flushed == nonzero:
                out.append((target, readers, float(np.abs(value).max()), flushed))
        return out

    def fallback_graph(self) -> tuple[list[NodeIO], set[str]]:
        """See :meth:`FixTarget.fallback_graph`."""
        gm = self.base
        nodes = [(n.name, [a.name for a in tree_flatten((n.args, n.kwargs))[0] if isinstance(a, fx.Node)], [n.name])
                 for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
        over = set()
        for n in gm.graph.nodes:
            t = get_attr(gm, n.target) if n.op == "get_attr" else None
            if isinstance(t, torch.Tensor) and t.is_floating_point() and bool((t.detach().double().abs() > FP16_MAX).any()):
                over.add(n.name)
        return nodes, over

    def rewrite(self, solution: ScaleSolution, raises: Sequence[tuple[str, float]]):
        """See :meth:`FixTarget.rewrite`."""
        scaled, notes = torch_pass.apply_exponents(self.prepared, solution)
        if raises:
            scaled, n = torch_pass.raise_constants(scaled, raises)
            notes += n
        return torch_pass.annotate(scaled, self.examples[0]), notes

    def convert(self, graph, fp32_nodes: Sequence[str], *, islands: str = "fp32") -> tuple[object, Fp16Conversion]:
        """See :meth:`FixTarget.convert` (:func:`~fp16guard.fixing.torch_pass.to_fp16_program`); rescales
        that restore values only for FP32 users or the output run in FP32 with them
        (:func:`~fp16guard.fixing.torch_pass.restoring_rescales`), or in BF16 with BF16 islands."""
        nodes = [*fp32_nodes, *torch_pass.restoring_rescales(graph, fp32_nodes)]
        bf16 = islands == "bf16"
        program = torch_pass.to_fp16_program(graph, nodes, torch.bfloat16 if bf16 else torch.float32)
        casts = sum(1 for n in program.graph.nodes
                    if n.op == "call_function" and n.target is torch.ops.aten._to_copy.default)
        refused = torch_pass.bf16_unfit_readers(graph) & set(nodes) if bf16 else set()
        reasons = {n: "reads a constant beyond BF16's range" for n in nodes if n in refused}
        if not bf16:
            return program, Fp16Conversion(fp32_nodes=nodes, casts=casts)
        return program, Fp16Conversion(fp32_nodes=[n for n in nodes if n in refused], casts=casts,
                                       bf16_nodes=[n for n in nodes if n not in refused], bf16_refused=reasons)

    def references(self, inputs: Sequence[NamedInput]) -> list[list[np.ndarray]]:
        """See :meth:`FixTarget.references` (the module itself, FP32, CPU, eval mode)."""
        with torch.no_grad():
            return [[t.float().numpy() for t in tree_flatten(self.model(*torch_args(i)))[0] if isinstance(t, torch.Tensor)]
                    for i in inputs]

    def complete_plan(self, plan: RewritePlan, amax: Mapping[str, float] | None = None) -> RewritePlan:
        """See :meth:`FixTarget.complete_plan`: the exponents at each module's boundary
        (:func:`~fp16guard.fixing.module_scales.module_scales`), from the graph captured here."""
        scales = module_scales(self.model, plan, self.examples, captured=self.base, amax=amax)
        return replace(plan, modules=[m.to_json() for m in scales])

    def runner(self, fixed, backend: str | Backend) -> tuple[str, Runner]:
        """See :meth:`FixTarget.runner`: a backend that takes PyTorch programs (``emulate``: strict FP16
        emulation on the CPU; ``torch``: PyTorch's FP16 kernels on CUDA) builds an engine of ``fixed``.
        Every output comes back as FP32 numpy, as :meth:`references` gives them.

        Raises:
            BackendError: a backend that takes no PyTorch programs, or ``torch`` without a CUDA device.
        """
        be = get_backend(backend) if isinstance(backend, str) else backend
        engine = be.build(fixed)

        def run(item: NamedInput) -> list[np.ndarray]:
            """The program on one input (its tensors fed by placeholder, in order)."""
            feeds = dict(zip(engine.input_names, (a.numpy() for a in torch_args(item))))
            return [np.asarray(o, dtype=np.float32) for o in engine.run(feeds)]
        return engine.description or be.describe(), run

    def save(self, fixed, path: str | Path) -> str:
        """See :meth:`FixTarget.save`: a ``.pt2`` ``ExportedProgram``
        (:func:`~fp16guard.fixing.torch_pass.save_program`), input dimensions that differ between the
        inputs the target was captured with dynamic."""
        return torch_pass.save_program(fixed, self.examples, path)


def _passes_checker(model: onnx.ModelProto) -> bool:
    """Whether ``onnx.checker.check_model(model, full_check=True)`` accepts ``model``'s
    :func:`~fp16guard.onnx_graph.skeleton` (its nodes and small constants, every weight's type and shape)."""
    try:
        onnx.checker.check_model(skeleton(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError):  # ValueError: > 2 GB
        return False
    return True


def check_plan(target: FixTarget, plan, *, check_hash: bool = True) -> None:
    """Refuse a plan made for another framework or another model.

    Raises:
        PlanError: the plan names another framework's graph, or (``check_hash``) was calibrated on
            another model.
    """
    if plan.framework != target.framework:
        raise PlanError(f"this plan names the values of a {plan.framework} graph, but the model is fixed as a "
                        f"{target.framework} graph; calibrate again for {target.framework}")
    if check_hash and plan.model_sha256 != target.model_sha256:
        raise PlanError(f"the plan was calibrated on another model ({plan.source}, sha256 {plan.model_sha256[:12]}...); "
                        f"calibrate this one, or pass --force (force=True) if only metadata changed")
