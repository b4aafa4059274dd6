"""``fp16guard.bisect``: name the first module whose FP16 execution breaks the model's output.

The model is split in execution order into an FP16 **prefix** (run by a backend: TensorRT, ONNX
Runtime CUDA, PyTorch FP16 on CUDA, or the CPU emulation) and an FP32 **suffix** (PyTorch for
PyTorch models, ONNX Runtime CPU for ONNX models). A *cut* ``c`` puts the first ``c`` candidates
(module segments of a PyTorch model, float-producing nodes of an ONNX graph) in FP16.

Search. The reference is the whole model in FP32. Cut ``N`` (all in FP16) is tried first; if it
is good, nothing is blamed. Otherwise a binary search keeps ``lo`` good and ``hi`` bad until they
are adjacent: candidate ``hi`` is the offender, and both sides of the boundary have been run
(``lo`` = 0, the all-FP32 model, is the reference itself). That is at most ``1 + ceil(log2 N)``
builds. For a PyTorch model the offending segment is then refined to the single op inside it
(``ceil(log2 ops)`` more builds). With ``all_offenders`` the offender is kept in FP32 (its ONNX
nodes go on the FP16 converter's block list) and the search runs again from it, until the all-FP16
cut is good or ``max_offenders`` are found. An offender whose *outputs* are out of FP16 range
makes its consumers the next offenders (they receive inf), so ``all_offenders`` lists the whole
region that needs FP32 (or a scale rewrite); one whose overflow is internal (a BatchNorm variance,
x * 1e5 * 1e-5 inside one forward) is listed alone.

A cut is **bad** when a hybrid output has a non-finite value where the reference is finite, or
the metric exceeds the tolerance. The default metric is the relative L2 error of each output,
``||y - y_ref||_2 / ||y_ref||_2``, worst over outputs and inputs; :data:`DEFAULT_TOLERANCE` and
how it was calibrated are documented there. A task metric ``metric(outputs, reference) -> float``
(lists of numpy arrays, in the model's output order) replaces it.

Monotonicity. Binary search assumes that once a prefix is bad, longer prefixes stay bad. The
result says whether every evaluated cut agreed with that (``BisectResult.monotonic``).
"""

from __future__ import annotations

import ast
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from .backends import Backend, get_backend
from .fp16_onnx import UnfitConstant, to_typed_fp16
from .inputs import InputError, NamedInput
from .stats import array_stats

SCHEMA = "fp16guard.bisect/1"

#: Default bound on the relative L2 error of a hybrid output. Calibrated on the bundled examples
#: (the trial tables of ``fp16guard bisect --example NAME``): ordinary FP16 rounding in the good
#: cuts gives up to 0.017 on ppocr-det (emulate; 0.024 with real FP16 kernels on ONNX Runtime's
#: CUDA EP, H100) and 1.3e-4 on crepe-full, while the first bad cuts give 1.0 (ppocr-det) and
#: 0.215 (crepe-full). 0.07 sits about 3x above the worst rounding and 3x below the smallest
#: failure. Pass ``tolerance`` (``--tolerance``) or a task metric for your model.
DEFAULT_TOLERANCE = 0.07

Metric = Callable[[list[np.ndarray], list[np.ndarray]], float]


class BisectError(ValueError):
    """The bisect cannot run as asked (no inputs, an input the model rejects, a prefix that
    cannot be exported); the message says what to do."""


def relative_l2(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Worst relative L2 error over outputs: ``max_i ||y_i - r_i||_2 / ||r_i||_2``.

    Float outputs are compared in float64; integer/bool outputs must match exactly (else inf).
    A non-finite value where the reference is finite gives inf. Shapes must match (else inf).
    """
    worst = 0.0
    for y, r in zip(outputs, reference):
        y, r = np.asarray(y), np.asarray(r)
        if y.shape != r.shape:
            return math.inf
        if not np.issubdtype(r.dtype, np.floating):
            if not np.array_equal(y, r):
                return math.inf
            continue
        y64, r64 = y.astype(np.float64), r.astype(np.float64)
        finite_ref = np.isfinite(r64)
        if np.any(~np.isfinite(y64) & finite_ref):
            return math.inf
        diff = np.where(finite_ref, y64 - r64, 0.0)
        norm = float(np.linalg.norm(np.where(finite_ref, r64, 0.0)))
        err = float(np.linalg.norm(diff)) / max(norm, 1e-30)
        worst = max(worst, err)
    return worst


def load_metric(spec: str) -> Metric:
    """``package.module:function`` -> the function (``metric(outputs, reference) -> float``).

    Raises:
        BisectError: the spec is malformed, or the module/function cannot be imported.
    """
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise BisectError(f"--metric {spec!r}: give package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise BisectError(f"--metric {spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise BisectError(f"--metric {spec!r} is not callable")
    return fn


@dataclass(frozen=True)
class Trial:
    """One evaluated cut.

    Attributes:
        stage: ``module`` (module-level search), ``op`` (refinement inside the offender) or
            ``node`` (ONNX graphs).
        round: 0 for the first offender, 1 for the second (``all_offenders``), ...
        cut: how many candidates of this stage ran in FP16.
        last: name of the last candidate in the FP16 prefix.
        error: the metric (inf when an output went non-finite).
        bad: error > tolerance or non-finite output.
        seconds: wall time of export + build + runs for this cut.
        built: whether an engine was built (False: served from the cache).
    """

    stage: str
    round: int
    cut: int
    last: str
    error: float
    bad: bool
    seconds: float
    built: bool


@dataclass(frozen=True)
class Offender:
    """A module (or node) whose FP16 execution breaks the output.

    Attributes:
        name: qualified module name (``conv2_BN``) or ONNX node name.
        kind: module class (``BatchNorm2d``) or ONNX op type.
        op: for PyTorch models, the op inside the module found by refinement
            (``batch_norm_1 (aten.batch_norm.default)``), else None.
        onnx_nodes: names of the ONNX nodes of this module in the exported prefix.
        cut: the first bad cut (module/node level).
        error: metric at that cut.
        amax: largest finite |x| of the FP32 values crossing the cut (the offender's outputs and
            anything else live there), from an FP32 run of the prefix; None if not measured.
        round: which search found it (``all_offenders``).
    """

    name: str
    kind: str
    op: str | None
    onnx_nodes: tuple[str, ...]
    cut: int
    error: float
    amax: float | None
    round: int


@dataclass
class BisectResult:
    """What :func:`bisect` found.

    Attributes:
        source: the model (file name or class).
        backend: the backend's one-line description.
        metric: ``relative_l2`` or the task metric's ``module:function``.
        tolerance: the threshold used.
        candidates: names of the candidate cuts (modules or ONNX nodes), in execution order.
        trials: every evaluated cut, in order.
        offenders: what was blamed, in the order found (empty: the all-FP16 model is good).
        builds: engines built (real builds, cache hits excluded).
        runs: prefix executions.
        seconds: total wall time.
        monotonic: every evaluated cut of every round agreed with "good below the boundary, bad
            from it on".
        unfit: constants of the model that FP16 cannot hold (from the all-FP16 prefix).
        notes: anything the user should know (unexportable tail, non-monotonic search ...).
    """

    source: str
    backend: str
    metric: str
    tolerance: float
    candidates: list[str]
    trials: list[Trial] = field(default_factory=list)
    offenders: list[Offender] = field(default_factory=list)
    builds: int = 0
    runs: int = 0
    seconds: float = 0.0
    monotonic: bool = True
    unfit: list[UnfitConstant] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """Whether any offender was found."""
        return bool(self.offenders)

    @property
    def build_bound(self) -> int:
        """``ceil(log2 N) + 2`` for N candidates: the most module/node-level builds one round needs."""
        return math.ceil(math.log2(max(len(self.candidates), 1))) + 2

    def to_json(self) -> dict:
        """Plain-JSON form (schema ``fp16guard.bisect/1``, documented in docs/bisect-schema.md)."""

        def clean(x):
            """Non-finite floats as strings (JSON has no inf), recursively."""
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean(dict(
            schema=SCHEMA, source=self.source, backend=self.backend, metric=self.metric,
            tolerance=self.tolerance, found=self.found, candidates=self.candidates,
            offenders=[asdict(o) for o in self.offenders], trials=[asdict(t) for t in self.trials],
            builds=self.builds, runs=self.runs, seconds=self.seconds, monotonic=self.monotonic,
            build_bound=self.build_bound, unfit=[u.to_json() for u in self.unfit], notes=self.notes))

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``."""
        import json

        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


# -- the two kinds of target: ONNX graphs and PyTorch modules --------------------------------------

def _onnx_feeds(input_names: Sequence[str], item: NamedInput) -> dict[str, np.ndarray]:
    if len(item.arrays) != len(input_names):
        raise InputError(f"{item.label}: the model takes {len(input_names)} input(s) "
                         f"({', '.join(input_names)}), got {len(item.arrays)}")
    return {n: np.ascontiguousarray(a) for n, a in zip(input_names, item.arrays)}


def _amax(arrays: Sequence[np.ndarray]) -> float:
    """Largest finite |x| over the floating arrays (integer outputs are shapes and indices)."""
    return max((array_stats(a).amax for a in arrays if np.issubdtype(np.asarray(a).dtype, np.floating)),
               default=0.0)


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
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.name)
    return {n.name for n in model.graph.node
            if n.op_type == "Constant" and n.name and readers.get(n.output[0], set()) and readers[n.output[0]] <= nodes}


class _OnnxTarget:
    """An ONNX graph: node-level cuts, FP32 suffix in ONNX Runtime CPU."""

    stage = "node"

    def __init__(self, model: onnx.ModelProto, inputs: Sequence[NamedInput], backend: Backend):
        import onnxruntime as ort

        from .onnx_split import OnnxSplitter

        self.model = model
        self.splitter = OnnxSplitter(model)
        self.backend = backend
        self.names = [c.name for c in self.splitter.candidates]
        self.kinds = [c.op_type for c in self.splitter.candidates]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self._so = so
        self._ort = ort
        self.feeds = [_onnx_feeds(self.splitter.graph_inputs, item) for item in inputs]
        full = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
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

    def cut_position(self, cut: int) -> int:
        """Node index (in ``graph.node``) of the last node in the FP16 prefix of ``cut``."""
        return self.splitter.candidates[cut - 1].position

    def block(self, offender_nodes: Sequence[str], name: str) -> None:
        """Keep these nodes (and the Constants only they read) in FP32 from now on."""
        self.fp32_nodes |= set(offender_nodes)
        self.fp32_nodes |= _constant_feeders(self.model, self.fp32_nodes)

    def evaluate(self, position: int, metric: Metric, full: bool) -> tuple[float, bool, int]:
        """``(worst error over inputs, engine built?, prefix runs)`` for the hybrid whose FP16
        prefix ends at node ``position``; ``full`` marks the all-FP16 cut (its unfit constants
        are kept for the result)."""
        prefix, suffix, live = self.splitter.split(position)
        fp16, conversion = to_typed_fp16(prefix, node_block_list=sorted(self.fp32_nodes))
        if full and not self.unfit:
            self.unfit = conversion.unfit
        before = self.backend.builds
        engine = self.backend.build(fp16)
        built = self.backend.builds > before
        suffix_session = None
        if suffix is not None:
            suffix_session = self._suffixes.get(position)
            if suffix_session is None:
                suffix_session = self._ort.InferenceSession(suffix.SerializeToString(), self._so,
                                                            providers=["CPUExecutionProvider"])
                self._suffixes[position] = suffix_session

        def errors():
            """The metric on each input: FP16 prefix, then the FP32 ONNX Runtime suffix."""
            for feed, ref in zip(self.feeds, self.reference):
                mid = dict(zip(engine.output_names, engine.run(feed)))
                values = dict(feed)
                values.update({name: mid[name] for name in live})
                if suffix_session is not None:
                    names = [i.name for i in suffix_session.get_inputs()]
                    outs = suffix_session.run(None, {n: values[n] for n in names})
                    values.update(dict(zip([o.name for o in suffix_session.get_outputs()], outs)))
                yield metric([values[o] for o in self.splitter.graph_outputs], ref)

        worst, runs = _worst(errors())
        return worst, built, runs

    def describe(self, cut: int) -> tuple[tuple[str, ...], float]:
        """``(ONNX nodes, amax)`` of the offender at ``cut``: the node itself, and the largest
        finite |x| of the FP32 values crossing that cut (an FP32 run of the prefix)."""
        c = self.splitter.candidates[cut - 1]
        prefix, _, _ = self.splitter.split(c.position)
        session = self._ort.InferenceSession(prefix.SerializeToString(), self._so, providers=["CPUExecutionProvider"])
        return (c.name,), max(_amax(session.run(None, feed)) for feed in self.feeds)


class _TorchTarget:
    """A PyTorch module: module-level cuts, refined to ops; FP32 suffix in PyTorch."""

    stage = "module"

    def __init__(self, model, inputs: Sequence[NamedInput], backend: Backend):
        import torch

        from .loading import to_tensors
        from .torch_split import TorchSplitter

        self.torch = torch
        self.backend = backend
        self.inputs = [to_tensors(item) for item in inputs]
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

    def cut_position(self, cut: int) -> int:
        """Op position (execution order) of the last op of segment ``cut - 1``."""
        return self.splitter.end_of(cut - 1)

    def block(self, offender_nodes: Sequence[str], name: str) -> None:
        """Keep module ``name``'s ops in FP32 in later prefixes (ONNX backends only)."""
        self.fp32_modules.add(name)

    def _export(self, position: int, prefix) -> onnx.ModelProto:
        if position in self._exports:
            model, error = self._exports[position]
            if error:
                raise BisectError(error)
            return model
        from .export import ExportError, export_onnx

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
        """Largest cut ``<= n`` whose prefix exports to ONNX (``n`` when the backend runs PyTorch
        modules itself). Post-processing the exporter cannot handle stays in the FP32 suffix;
        found by binary search over exports only (exportability shrinks with the prefix)."""
        if type(self.backend).build_module is not Backend.build_module:
            return n  # the torch backend runs GraphModules: no export needed
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
        from .onnx_inspector import scope_of

        def inside(fqn: str) -> bool:
            """Whether module path ``fqn`` is one of ``modules`` or inside one."""
            return bool(fqn) and any(fqn == m or fqn.startswith(m + ".") for m in modules)

        out = []
        for n in model.graph.node:
            meta = {p.key: p.value for p in n.metadata_props}
            try:
                parts = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            except (KeyError, ValueError, SyntaxError):
                parts = None
            if parts and len(parts) >= 2:
                # cumulative (['', 'first', 'first.0', 'mul']) or one name per level
                fqns = (parts[-2], ".".join(p for p in parts[1:-1] if p))
            else:
                fqns = (scope_of(n.name),)
            if any(inside(f) for f in fqns):
                out.append(n.name)
        return out

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
        engine = self.backend.build_module(prefix, self.inputs[0])
        if engine is None:
            model = self._export(position, prefix)
            blocked = self._module_nodes(model, self.fp32_modules) if self.fp32_modules else []
            if blocked:
                blocked += sorted(_constant_feeders(model, set(blocked)))
            fp16, conversion = to_typed_fp16(model, node_block_list=blocked)
            if full and not self.unfit:
                self.unfit = conversion.unfit
            engine = self.backend.build(fp16)
        elif self.fp32_modules:
            raise BisectError("all_offenders needs an ONNX backend (emulate, onnxruntime, tensorrt): the torch "
                              "backend cannot keep a module in FP32 inside its FP16 prefix")
        built = self.backend.builds > before

        def errors():
            """The metric on each input: FP16 prefix engine, then the FP32 PyTorch suffix."""
            for args, ref in zip(self.inputs, self.reference):
                mid = engine.run({name: t.numpy() for name, t in zip(engine.input_names, args)})
                with torch.no_grad():
                    out = suffix(*(torch.from_numpy(np.ascontiguousarray(a)) for a in mid), *args)
                yield metric([t.numpy() for t in out if isinstance(t, torch.Tensor)], ref)

        worst, runs = _worst(errors())
        return worst, built, runs

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


# -- the search ----------------------------------------------------------------------------------

def _binary_search(n: int, bad: Callable[[int], bool], start: int = 0) -> int | None:
    """Smallest cut in ``start+1..n`` that is bad, given cut ``start`` good; None if ``n`` is good."""
    if n <= start or not bad(n):
        return None
    lo, hi = start, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bad(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _as_inputs(inputs) -> list[NamedInput]:
    if isinstance(inputs, NamedInput):
        return [inputs]
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, NamedInput):
            out.append(item)
        else:
            arrays = item if isinstance(item, (tuple, list)) else (item,)
            out.append(NamedInput(f"input {i}", tuple(np.asarray(a.detach().cpu() if hasattr(a, "detach") else a)
                                                      for a in arrays)))
    if not out:
        raise BisectError("bisect needs at least one input")
    return out


def bisect(model, inputs, *, backend: str | Backend = "auto", metric: Metric | str | None = None,
           tolerance: float = DEFAULT_TOLERANCE, all_offenders: bool = False, max_offenders: int = 8,
           refine: bool = True, on_trial: Callable[[Trial], None] | None = None,
           source: str | None = None) -> BisectResult:
    """Find the first module (PyTorch) or node (ONNX) whose FP16 execution breaks the output.

    Args:
        model: a ``torch.nn.Module`` (FP32, eval mode; not modified), a ``torch.export``
            ``ExportedProgram``, an ``onnx.ModelProto``, or a path to an ``.onnx`` file.
        inputs: one or more inputs: :class:`~fp16guard.inputs.NamedInput` s, or tensors/arrays,
            or tuples of them for multi-input models. FP32, in the shapes the model takes (e.g.
            ``float32 [1, 3, H, W]`` for an image model). A cut is bad if it is bad on any input.
        backend: ``auto`` (tensorrt, else onnxruntime CUDA, else emulate), a name, or a
            :class:`~fp16guard.backends.Backend`.
        metric: ``metric(outputs, reference) -> float`` on lists of numpy arrays, or
            ``"module:function"``; default :func:`relative_l2`.
        tolerance: a cut is bad when the metric exceeds this (default :data:`DEFAULT_TOLERANCE`).
        all_offenders: after each offender, keep it in FP32 and search again.
        max_offenders: stop after this many offenders (``all_offenders``).
        refine: for PyTorch models, refine the offending module to the op inside it.
        on_trial: called after every evaluated cut (progress display).
        source: a display name for the model.

    Returns:
        a :class:`BisectResult`.

    Raises:
        BisectError: no inputs, or a PyTorch model with no op to cut.
        fp16guard.inputs.InputError: an input the model rejects (wrong shape or count).
        fp16guard.torch_split.SplitError / fp16guard.onnx_split.OnnxSplitError: the model
            cannot be captured or split; the message says what to try.
        fp16guard.backends.BackendError / fp16guard._optional.MissingDependencyError: the
            backend cannot run here.
        ValueError: unknown backend name.
    """
    t0 = time.perf_counter()
    items = _as_inputs(inputs)
    metric_name = "relative_l2"
    if isinstance(metric, str):
        metric_name, metric = metric, load_metric(metric)
    elif metric is not None:
        metric_name = getattr(metric, "__name__", "custom")
    metric = metric or relative_l2
    engine_backend = get_backend(backend) if isinstance(backend, str) else backend

    if isinstance(model, (str, Path)) or isinstance(model, onnx.ModelProto):
        from .onnx_inspector import load_onnx

        proto = load_onnx(model)
        target: Any = _OnnxTarget(proto, items, engine_backend)
        src = source or (Path(model).name if isinstance(model, (str, Path)) else proto.graph.name or "model.onnx")
    else:
        target = _TorchTarget(model, items, engine_backend)
        src = source or type(model).__name__
    n = len(target.names)
    if n == 0:
        raise BisectError(f"{src} has no operation to cut")
    result = BisectResult(src, engine_backend.describe(), metric_name, tolerance, list(target.names))
    cache: dict[tuple, Trial] = {}

    def run_cut(stage: str, rnd: int, cut: int, position: int, label: str, full: bool = False) -> bool:
        """Evaluate (once per stage, round and position) and record a cut; True when it is bad."""
        key = (stage, rnd, position)
        if key in cache:
            return cache[key].bad
        t = time.perf_counter()
        err, built, runs = target.evaluate(position, metric, full)
        trial = Trial(stage, rnd, cut, label, err, not (err <= tolerance), time.perf_counter() - t, built)
        cache[key] = trial
        result.trials.append(trial)
        result.runs += runs
        if on_trial is not None:
            on_trial(trial)
        return trial.bad

    if isinstance(target, _TorchTarget):
        last = target.exportable_limit(n)
        if last < n:
            if last == 0:
                raise BisectError(f"{target.export_error(1)}. Nothing before it can be exported either; "
                                  "export the model to ONNX yourself and bisect the .onnx file")
            result.notes.append(
                f"cuts after {target.names[last - 1]!r} cannot be exported to ONNX ({target.export_error(last + 1)}); "
                f"those {n - last} segment(s) always run in the FP32 PyTorch suffix and were not searched")
            n = last
    start = 0
    for rnd in range(max_offenders if all_offenders else 1):
        def bad(c, rnd=rnd):
            """Whether cut ``c`` of this round is bad."""
            return run_cut(target.stage, rnd, c, target.cut_position(c), target.names[c - 1], c == n)

        hit = _binary_search(n, bad, start)
        if hit is None:
            break
        stage_trials = [t for t in result.trials if t.round == rnd and t.stage in ("module", "node")]
        good_max = max((t.cut for t in stage_trials if not t.bad), default=start)
        bad_min = min((t.cut for t in stage_trials if t.bad), default=hit)
        if good_max >= bad_min:
            result.monotonic = False
        name, kind = target.names[hit - 1], target.kinds[hit - 1]
        err = next(t.error for t in stage_trials if t.cut == hit)
        nodes, amax = target.describe(hit)
        op = None
        if refine and isinstance(target, _TorchTarget):
            ops = target.splitter.op_positions(hit - 1)
            if len(ops) > 1:
                def bad_op(j, rnd=rnd, ops=ops):
                    """Whether the cut after op ``j`` of the offending segment is bad."""
                    return run_cut("op", rnd, j, ops[j - 1], target.splitter.op_name(ops[j - 1]))
                # cut 0 of the refinement = the previous segment's cut (good); len(ops) = this one (bad)
                cache[("op", rnd, ops[-1])] = cache[(target.stage, rnd, target.cut_position(hit))]
                j = _binary_search(len(ops), bad_op, 0)
                op = target.splitter.op_name(ops[(j or len(ops)) - 1])
            else:
                op = target.splitter.op_name(ops[0])
        target.block(nodes, name)
        result.offenders.append(Offender(name=name, kind=kind, op=op, onnx_nodes=tuple(nodes), cut=hit,
                                         error=err, amax=amax, round=rnd))
        start = hit  # later offenders come after this one
        if start >= n:
            break
    if result.offenders and len(result.offenders) == max_offenders and all_offenders:
        result.notes.append(f"stopped after {max_offenders} offenders (max_offenders)")
    if not result.monotonic:
        result.notes.append("the search was not monotonic: a longer FP16 prefix was good after a shorter one "
                            "was bad; the verdict is the first bad cut found, check the trial table")
    result.unfit = target.unfit
    result.builds = engine_backend.builds
    result.seconds = time.perf_counter() - t0
    return result
