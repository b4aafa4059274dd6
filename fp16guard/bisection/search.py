"""``fp16guard.bisection.search``: name the first module whose FP16 execution breaks the model's output.

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

Prefix reuse. Within a round every cut after a good cut ``g`` lies after ``g``. For an ONNX graph
on ``emulate`` the FP16 values crossing the last good cut are kept (per input), and a later cut
runs only the nodes between the two, fed those values: the same numbers as the whole prefix, bit
for bit (:class:`~fp16guard.bisection.targets.OnnxSplitTarget`). PP-OCRv4 det on its three
photos: 4,017 prefix node evaluations instead of 16,161.

A cut is **bad** when a hybrid output has a non-finite value where the reference is finite, or
the metric exceeds the tolerance. The default metric is the relative L2 error of each output,
``||y - y_ref||_2 / ||y_ref||_2``, worst over outputs and inputs. A task metric
``metric(outputs, reference) -> float`` (lists of numpy arrays, in the model's output order)
replaces it.

Tolerance from the data. Bisect blames overflow, not precision, so unless the caller passes
``tolerance`` the threshold is set from the model's own FP16 rounding noise before the search:

1. ``L``, the longest cut whose FP16 prefix is entirely in FP16 range, is found from FP32 runs
   (every value each prefix op reads or writes, activations and weights, is finite with
   ``|x| <= 65504`` on every input; ``in_range_limit`` of the targets). Such a prefix cannot
   overflow: its error is rounding (or an underflow, which shows up as a non-finite output).
2. The **noise** is the metric at cut ``L`` (the largest in-range prefix: the most rounding an
   in-range cut carries).
3. ``tolerance = max(DEFAULT_TOLERANCE, min(NOISE_CAP, NOISE_FACTOR * noise))``
   (:func:`noise_tolerance`): at least the calibrated floor, ``NOISE_FACTOR`` = 4 times the noise
   (shorter in-range prefixes can show more error than cut ``L``: rounding amplified by a
   sensitive suffix differs from cut to cut, by up to 2.5x on the chaotic 40-layer stack of the
   tests), and never above ``NOISE_CAP`` = 0.5, half the output's norm, which no amount of rounding
   excuses. A non-finite noise (cut ``L`` already breaks, e.g. an epsilon that flushes to zero) is
   breakage, not noise: the floor is used. ``L = 0`` (the first candidate is out of range): floor.

The rule is deterministic and monotone: the tolerance never decreases as the noise grows, and
never drops below the floor, so it only ever turns verdicts of the fixed default from bad to good
where the error is within ``NOISE_FACTOR`` times measured rounding; non-finite outputs stay bad.
Cost: the FP32 runs of step 1 (one per input; ONNX: one run per input of the graph with every
activation's range statistics inside it, scalars out) and one cut, ``L``, evaluated like any other (one build, one prefix run per input).
When the first offender is candidate ``L + 1``, as it is for an overflow, the search verifies cut
``L`` anyway, and when ``L = N`` the cut is the all-FP16 cut the search starts with: then it costs
no extra build. ``BisectResult`` reports ``noise``, ``noise_cut`` (``L``) and
``tolerance_source``.

Mode. A PyTorch module is bisected as it is deployed, in eval mode, on a deep copy: the caller's
model, in whatever mode, is never changed, and a model in train mode is blamed where the eval-mode
model is (BatchNorm on its running statistics, not on the batch's).

Monotonicity. Binary search assumes that once a prefix is bad, longer prefixes stay bad. The
result says whether every evaluated cut agreed with that (``BisectResult.monotonic``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from fp16guard import progress
from fp16guard.backends import Backend, get_backend
from fp16guard.bisection.targets import OnnxSplitTarget, TorchSplitTarget
from fp16guard.compare import DEFAULT_TOLERANCE, Metric, checked_metric, load_metric, relative_l2
from fp16guard.errors import BisectError, UsageError
from fp16guard.fp16_onnx import UnfitConstant
from fp16guard.inputs import as_inputs, check_inputs
from fp16guard.jsonio import strict, write
from fp16guard.loading import Framework, open_model, refuse_fp16_module
from fp16guard.onnx_graph import float64_as_float32, load_onnx, refuse_fp16_model

SCHEMA = "fp16guard.bisect/1"

#: k of the tolerance from the data: a cut is bad when its error exceeds ``NOISE_FACTOR`` times the
#: rounding noise of the longest in-range prefix (and the floor :data:`DEFAULT_TOLERANCE`).
NOISE_FACTOR = 4.0
#: The most the tolerance from the data may reach (relative L2: half the output's norm is broken,
#: whatever the rounding).
NOISE_CAP = 0.5


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


@dataclass(frozen=True)
class BisectResult:
    """What :func:`bisect` found. Immutable, built once at the end of the search; its sequences are
    tuples (lists given are converted).

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
        noise: the metric at :attr:`noise_cut`, the FP16 rounding noise the tolerance was set from;
            None when not measured (an explicit tolerance, or no in-range cut).
        noise_cut: the longest cut whose prefix stays in FP16 range in FP32 (0: none); None when
            the tolerance was explicit.
        tolerance_source: ``explicit`` (the caller's), ``floor`` (:data:`DEFAULT_TOLERANCE`: the
            noise is small, not finite, or not measured), ``noise`` (``NOISE_FACTOR * noise``) or
            ``cap`` (:data:`NOISE_CAP`).
    """

    source: str
    backend: str
    metric: str
    tolerance: float
    candidates: tuple[str, ...]
    trials: tuple[Trial, ...] = ()
    offenders: tuple[Offender, ...] = ()
    builds: int = 0
    runs: int = 0
    seconds: float = 0.0
    monotonic: bool = True
    unfit: tuple[UnfitConstant, ...] = ()
    notes: tuple[str, ...] = ()
    noise: float | None = None
    noise_cut: int | None = None
    tolerance_source: str = "explicit"

    def __post_init__(self):
        for name in ("candidates", "trials", "offenders", "unfit", "notes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def found(self) -> bool:
        """Whether any offender was found."""
        return bool(self.offenders)

    @property
    def build_bound(self) -> int:
        """``ceil(log2 N) + 2`` for N candidates: the most module/node-level builds one round needs."""
        return math.ceil(math.log2(max(len(self.candidates), 1))) + 2

    def to_json(self) -> dict:
        """Plain-JSON form (schema ``fp16guard.bisect/1``, documented in docs/bisect-schema.md; non-finite
        floats as the strings of :mod:`fp16guard.jsonio`)."""
        return strict(dict(
            schema=SCHEMA, source=self.source, backend=self.backend, metric=self.metric,
            tolerance=self.tolerance, tolerance_source=self.tolerance_source, noise=self.noise,
            noise_cut=self.noise_cut, found=self.found, candidates=self.candidates,
            offenders=[asdict(o) for o in self.offenders], trials=[asdict(t) for t in self.trials],
            builds=self.builds, runs=self.runs, seconds=self.seconds, monotonic=self.monotonic,
            build_bound=self.build_bound, unfit=[u.to_json() for u in self.unfit], notes=self.notes))

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``."""
        return write(self.to_json(), path)


# -- the search ----------------------------------------------------------------------------------

class CutSearch:
    """The search for the first bad cut, as a pure object: it proposes cuts and takes verdicts;
    it runs nothing, so the same object drives module cuts, op refinement and tests alike.

    Binary search over cuts ``start+1..n``, cut ``start`` known good: the all-FP16 cut ``n`` first
    (good: nothing to blame), then the middle of the (good, bad) bracket until the two are
    adjacent, so the boundary is verified on both sides in at most ``1 + ceil(log2(n - start))``
    verdicts::

        search = CutSearch(n, start)
        while (cut := search.propose()) is not None:
            search.take(cut, bad=evaluate(cut))
        search.first_bad  # None when cut n is good

    Args:
        n: the last cut (everything in FP16).
        start: a cut known to be good (0: all FP32, the reference itself).
    """

    def __init__(self, n: int, start: int = 0):
        self.n, self.good, self.bad = n, start, None
        self.verdicts: dict[int, bool] = {}
        self._over = n <= start

    def propose(self) -> int | None:
        """The next cut to evaluate, or None when the search is over."""
        if self._over:
            return None
        if self.bad is None:
            return self.n
        return (self.good + self.bad) // 2 if self.bad - self.good > 1 else None

    def take(self, cut: int, bad: bool) -> None:
        """Record the verdict on ``cut`` (True: the hybrid output is broken)."""
        self.verdicts[cut] = bad
        if bad:
            self.bad = min(cut, self.bad or cut)
        elif self.bad is None:
            self._over = True  # the all-FP16 cut is good
        else:
            self.good = max(cut, self.good)

    @property
    def first_bad(self) -> int | None:
        """The first bad cut once :meth:`propose` returns None (None: cut ``n`` is good)."""
        return self.bad

    @property
    def monotonic(self) -> bool:
        """Every good verdict lies before every bad one."""
        goods = [c for c, b in self.verdicts.items() if not b]
        bads = [c for c, b in self.verdicts.items() if b]
        return not goods or not bads or max(goods) < min(bads)

    def run(self, bad: Callable[[int], bool]) -> int | None:
        """Drive the search with ``bad(cut) -> bool`` and return :attr:`first_bad`."""
        while (cut := self.propose()) is not None:
            self.take(cut, bad(cut))
        return self.first_bad


def noise_tolerance(noise: float | None, floor: float = DEFAULT_TOLERANCE) -> tuple[float, str]:
    """The tolerance the data gives: ``max(floor, min(NOISE_CAP, NOISE_FACTOR * noise))``.

    Args:
        noise: the metric of the longest in-range prefix (dimensionless, relative L2 by default);
            None (not measured) or non-finite (that prefix already breaks) give the floor.
        floor: the least tolerance (default :data:`DEFAULT_TOLERANCE`).

    Returns:
        ``(tolerance, source)``, ``source`` naming the term that decided: ``floor``, ``noise`` or
        ``cap``. Non-decreasing in ``noise`` over the finite values.
    """
    if noise is None or not math.isfinite(noise):
        return floor, "floor"
    tolerance, source = (NOISE_CAP, "cap") if NOISE_FACTOR * noise >= NOISE_CAP else (NOISE_FACTOR * noise, "noise")
    return (floor, "floor") if tolerance <= floor else (tolerance, source)


class _Session:
    """One bisect run: evaluates cuts of a target (each at most once per stage, round and position),
    records them as :class:`Trial` s, and turns a bad cut into an :class:`Offender`. It gathers what
    the :class:`BisectResult` reports (trials, runs, notes, the tolerance and where it came from,
    monotonicity); :func:`bisect` builds the result from it once, at the end.
    ``tolerance`` None: :meth:`calibrate` sets it from the data before the search."""

    def __init__(self, target, metric: Metric, tolerance: float | None, on_trial: Callable[[Trial], None] | None,
                 notes: list[str]):
        self.target, self.metric, self.tolerance = target, metric, tolerance
        self.on_trial = on_trial
        self.cache: dict[tuple, Trial] = {}
        self.trials: list[Trial] = []
        self.notes = list(notes)
        self.runs = 0
        self.monotonic = True
        self.noise: float | None = None
        self.noise_cut: int | None = None
        self.tolerance_source = "explicit"

    def set_tolerance(self, noise: float | None) -> None:
        """Set the tolerance from the measured rounding ``noise`` (:func:`noise_tolerance`), and
        keep both for the result."""
        self.tolerance, self.tolerance_source = noise_tolerance(noise)
        self.noise = noise
        if noise is not None and not math.isfinite(noise):
            self.notes.append(
                f"the longest prefix whose FP32 values fit FP16 (cut {self.noise_cut}) already gives a "
                f"non-finite output in FP16: not rounding noise; tolerance left at the floor {self.tolerance:g}")
        elif self.tolerance_source == "cap":
            self.notes.append(
                f"the FP16 rounding noise {noise:.3g} of the in-range prefix is so large that the tolerance "
                f"{NOISE_FACTOR:g} x noise was capped at {NOISE_CAP:g}; pass --tolerance or a task metric")

    def calibrate(self, n: int) -> None:
        """Measure the rounding noise at the longest in-range cut ``L <= n`` and set the tolerance
        from it (round 0's trial of cut ``L`` is kept for the search). ``L = 0``: the floor."""
        target = self.target
        last = target.in_range_limit(n)
        self.noise_cut = last
        if last == 0:
            self.set_tolerance(None)
            return
        self.is_bad(target.stage, 0, last, target.cut_position(last), target.names[last - 1], last == n)

    def is_bad(self, stage: str, rnd: int, cut: int, position: int, label: str, full: bool = False) -> bool:
        """Evaluate (once per stage, round and position) and record a cut; True when it is bad. The
        first cut evaluated without a tolerance (:meth:`calibrate`'s) sets it from its error."""
        key = (stage, rnd, position)
        if key not in self.cache:
            t = time.perf_counter()
            err, built, runs = self.target.evaluate(position, self.metric, full)
            if self.tolerance is None:
                self.set_tolerance(err)
            trial = Trial(stage, rnd, cut, label, err, not (err <= self.tolerance), time.perf_counter() - t, built)
            if not trial.bad:
                self.target.accept(position)  # later cuts of the search lie after it: they start there
            self.cache[key] = trial
            self.trials.append(trial)
            self.runs += runs
            if self.on_trial is not None:
                self.on_trial(trial)
        return self.cache[key].bad

    def searchable(self, n: int) -> int:
        """The last cut whose prefix a PyTorch target can export (``n`` for ONNX); notes what is left out.

        Raises:
            BisectError: not even the first segment exports.
        """
        target = self.target
        last = target.exportable_limit(n) if isinstance(target, TorchSplitTarget) else n
        if last == 0:
            raise BisectError(f"{target.export_error(1)}. Nothing before it can be exported either; "
                              "export the model to ONNX yourself and bisect the .onnx file")
        if last < n:
            self.notes.append(
                f"cuts after {target.names[last - 1]!r} cannot be exported to ONNX ({target.export_error(last + 1)}); "
                f"those {n - last} segment(s) always run in the FP32 PyTorch suffix and were not searched")
        progress.set_total(math.ceil(math.log2(last)) + 2)  # the enclosing step counts cuts, of their bound
        return last

    def offender(self, rnd: int, n: int, start: int, refine: bool) -> Offender | None:
        """Round ``rnd``: the first bad cut after ``start`` as an offender (None: cut ``n`` is good);
        the offender is then kept in FP32 for later rounds."""
        target = self.target
        search = CutSearch(n, start)
        hit = search.run(lambda c: self.is_bad(target.stage, rnd, c, target.cut_position(c), target.names[c - 1],
                                               c == n))
        if hit is None:
            return None
        self.monotonic &= search.monotonic
        name, kind = target.names[hit - 1], target.kinds[hit - 1]
        err = self.cache[(target.stage, rnd, target.cut_position(hit))].error
        nodes, amax = target.describe(hit)
        op = self.refine(rnd, hit) if refine and isinstance(target, TorchSplitTarget) else None
        target.block(nodes, name)
        return Offender(name=name, kind=kind, op=op, onnx_nodes=tuple(nodes), cut=hit, error=err, amax=amax, round=rnd)

    def result(self, source: str, backend: Backend, metric: str, offenders: list[Offender],
               seconds: float) -> BisectResult:
        """The :class:`BisectResult` of the search, built once, at its end (a note added when the
        search was not monotonic)."""
        notes = self.notes + ([] if self.monotonic else [
            "the search was not monotonic: a longer FP16 prefix was good after a shorter one was bad; the verdict "
            "is the first bad cut found, check the trial table"])
        return BisectResult(
            source, backend.describe(), metric, DEFAULT_TOLERANCE if self.tolerance is None else self.tolerance,
            self.target.names, trials=self.trials, offenders=offenders, builds=backend.builds, runs=self.runs,
            seconds=seconds, monotonic=self.monotonic, unfit=self.target.unfit, notes=notes, noise=self.noise,
            noise_cut=self.noise_cut, tolerance_source=self.tolerance_source)

    def refine(self, rnd: int, hit: int) -> str:
        """The op inside offending segment ``hit`` (PyTorch targets) after which the output breaks."""
        splitter = self.target.splitter
        ops = splitter.op_positions(hit - 1)
        if len(ops) == 1:
            return splitter.op_name(ops[0])
        # cut 0 of the refinement = the previous segment's cut (good); len(ops) = this one (bad, known)
        self.cache[("op", rnd, ops[-1])] = self.cache[(self.target.stage, rnd, self.target.cut_position(hit))]
        j = CutSearch(len(ops)).run(lambda j: self.is_bad("op", rnd, j, ops[j - 1], splitter.op_name(ops[j - 1])))
        return splitter.op_name(ops[(j or len(ops)) - 1])


def _metric(metric: Metric | str | None) -> tuple[str, Metric]:
    """``(name, function)`` of bisect's ``metric`` argument (default :func:`relative_l2`)."""
    if isinstance(metric, str):
        return metric, checked_metric(metric, load_metric(metric))
    if metric is not None:
        name = getattr(metric, "__name__", "custom")
        return name, checked_metric(name, metric)
    return "relative_l2", relative_l2


def _check_metric(name: str, metric: Metric, reference: list) -> None:
    """A task metric must score the FP32 outputs against themselves as a finite number.

    Raises:
        UsageError: it raises, returns no number, or returns NaN or inf there.
    """
    score = metric(list(reference), list(reference))
    if not math.isfinite(score):
        raise UsageError(f"--metric {name} returned a NaN or inf score on the FP32 outputs compared with "
                         f"themselves; it must return a finite float (0 for identical outputs, larger = worse)")


def _split_target(model, items, backend: Backend, source: str | None) -> tuple[Any, str, list[str]]:
    """``(split target, display name, notes)`` of bisect's model, by its framework
    (:func:`~fp16guard.loading.open_model`: a path by its format): an ONNX target, float64 computed
    in float32 (a note says so), or a PyTorch one.

    Raises:
        ModelLoadError: the model is already converted to FP16 (ONNX or PyTorch), an unreadable
            file, or not a model.
    """
    model, framework, path = open_model(model)
    if framework is Framework.ONNX:
        proto = load_onnx(model)
        refuse_fp16_model(proto, "bisect")
        name = source or path or proto.graph.name or "model.onnx"
        proto, converted = float64_as_float32(proto)
        notes = ["the float64 model is bisected in float32 (its reference too): the FP16 backends have no "
                 "float64"] if converted else []
        return OnnxSplitTarget(proto, items, backend), name, notes
    refuse_fp16_module(model, "bisect")
    return TorchSplitTarget(model, items, backend), source or path or type(model).__name__, []


def bisect(model, inputs, *, backend: str | Backend = "auto", metric: Metric | str | None = None,
           tolerance: float | None = None, all_offenders: bool = False, max_offenders: int = 8,
           refine: bool = True, on_trial: Callable[[Trial], None] | None = None,
           source: str | None = None) -> BisectResult:
    """Find the first module (PyTorch) or node (ONNX) whose FP16 execution breaks the output.

    Args:
        model: a ``torch.nn.Module`` (FP32), a ``torch.export`` ``ExportedProgram``, an
            ``onnx.ModelProto``, or the path of a model file (:data:`~fp16guard.loading.MODEL_FORMATS`:
            an ``.onnx`` file, a ``.pt2`` program; any other path is read as ONNX). A module is
            measured in eval mode, as deployed, on a deep copy
            (:func:`~fp16guard.torch_graph.inference_copy`): BatchNorm on its running statistics,
            dropout off, whatever mode the module is in, so a module in
            train or mixed mode gets the eval-mode result. The caller's model is never changed
            (state_dict bit-identical, BatchNorm statistics included; training flags and hooks as
            they were), also when its forward raises.
        inputs: one or more inputs: :class:`~fp16guard.inputs.NamedInput` s, or tensors/arrays,
            or tuples of them for multi-input models. FP32, in the shapes the model takes (e.g.
            ``float32 [1, 3, H, W]`` for an image model). A cut is bad if it is bad on any input.
        backend: ``auto`` (tensorrt, else onnxruntime CUDA, else emulate), a name, or a
            :class:`~fp16guard.backends.Backend`.
        metric: ``metric(outputs, reference) -> float`` on lists of numpy arrays, or
            ``"module:function"``; default :func:`~fp16guard.compare.relative_l2`.
        tolerance: a cut is bad when the metric exceeds this. None (default): set from the data,
            ``max(DEFAULT_TOLERANCE, min(NOISE_CAP, NOISE_FACTOR * noise))`` with ``noise`` the
            metric of the longest prefix whose FP32 values fit FP16 (module docstring); costs FP32
            runs (one per input) and at most one more build and prefix run per input.
        all_offenders: after each offender, keep it in FP32 and search again.
        max_offenders: stop after this many offenders (``all_offenders``).
        refine: for PyTorch models, refine the offending module to the op inside it.
        on_trial: called after every evaluated cut (progress display).
        source: a display name for the model.

    Returns:
        a :class:`BisectResult`.

    Raises:
        BisectError: no inputs, or a model with no op to cut or none that exports.
        InputError: an input the model rejects (wrong shape or count), one with no elements, or
            one holding inf/NaN (:func:`~fp16guard.inputs.check_inputs`).
        SplitError: the model cannot be captured or split; the message says what to try.
        ModelLoadError: an unreadable model file, an object that is no model, or a model already
            converted to FP16 (an FP16 ONNX model, a ``.half()`` module): bisect needs the FP32 model.
        BackendError, MissingDependencyError: the backend cannot run here.
        UsageError: a ``metric`` spec that cannot be imported; a metric that raises, returns no
            number, or scores the FP32 outputs against themselves as NaN/inf. ValueError: unknown
            backend name.
    """
    t0 = time.perf_counter()
    items = as_inputs(inputs)
    if not items:
        raise BisectError("bisect needs at least one input")
    check_inputs(items)  # no inf/NaN: FP16 cannot be judged where FP32 says nothing
    metric_name, metric_fn = _metric(metric)
    engine_backend = get_backend(backend) if isinstance(backend, str) else backend
    target, src, notes = _split_target(model, items, engine_backend, source)
    if not target.names:
        raise BisectError(f"{src} has no operation to cut")
    if metric is not None:
        _check_metric(metric_name, metric_fn, target.reference[0])
    session = _Session(target, metric_fn, tolerance, on_trial, notes)
    n = session.searchable(len(target.names))
    if tolerance is None:
        session.calibrate(n)
    offenders: list[Offender] = []
    start = 0
    for rnd in range(max_offenders if all_offenders else 1):
        offender = session.offender(rnd, n, start, refine)
        if offender is None:
            break
        offenders.append(offender)
        start = offender.cut  # later offenders come after this one
        if start >= n:
            break
    if all_offenders and len(offenders) == max_offenders:
        session.notes.append(f"stopped after {max_offenders} offenders (max_offenders)")
    return session.result(src, engine_backend, metric_name, offenders, time.perf_counter() - t0)
