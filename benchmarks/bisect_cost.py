"""Cost of finding the FP16 offender: fp16guard's bisect against onnxconverter-common's auto mixed precision.

    python benchmarks/bisect_cost.py | tee benchmarks/results_bisect_cpu.txt
    python benchmarks/bisect_cost.py --skip-amp
    python benchmarks/bisect_cost.py --amp-timeout 300 --no-named
    python benchmarks/bisect_cost.py --prefix-reuse 2

``--prefix-reuse R`` measures something else, alone: ``bisect --example ppocr-det`` (its three
photos, ``emulate``, tolerance from the data, as the command line runs it) with each FP16 prefix
run whole and started from the cached values of the last good cut
(``fp16guard.bisection.targets.OnnxSplitTarget.reuse_prefix`` False / True), alternating, ``R``
times each, in one process. ``wall s`` is ``time.perf_counter`` around ``bisect``, ``prefix s`` the
time inside the FP16 prefix engines' ``run``, ``prefix nodes`` the model nodes those runs
evaluated (summed over inputs), ``cache MB`` the most prefix outputs held at once; the last line
says whether both give the same numbers (every trial's error, noise, tolerance, offender, amax).

Model: the bundled PP-OCRv4 text detector (``fp16guard.examples.EXAMPLES["ppocr-det"]``, ONNX).
Input: one image, ``skimage.data.coffee()`` resized to 736x736 with Pillow (bilinear), then
``fp16guard.examples.ppocr.preprocess`` (BGR, ``(x/255 - 0.5)/0.5``, NCHW float32 [1, 3, 736, 736]).
Both tools run on the CPU, in one run, and judge a candidate model with the same criterion: the
worst relative L2 error of the outputs against the FP32 reference must be at most
``fp16guard.bisection.DEFAULT_TOLERANCE`` (0.07; the committed results were measured at 0.05,
before its calibration on real FP16 kernels: fp16guard's errors are 0.006 good and 1.0 bad, so
the outcome is the same).

* fp16guard: ``bisect(path, [input], backend="emulate")`` (strict FP16 emulation on ONNX Runtime
  CPU). ``builds`` / ``runs`` are the result's own counts (FP16 prefix engines built, prefix
  runs); ``wall s`` is ``time.perf_counter`` around the call.
* onnxconverter-common: ``auto_mixed_precision.auto_convert_mixed_precision(model, feed,
  validate_fn=..., rtol=None, atol=None, keep_io_types=True)``. ``rtol``/``atol`` are left None so
  that ``validate_fn`` (the relative L2 test above) is the only criterion. It runs in a child
  process (spawn) so that it can be stopped after ``--amp-timeout`` seconds (default 900). Its
  ``builds`` / ``runs`` are counted by a subclass of ``onnxruntime.InferenceSession`` assigned to
  ``onnxruntime.InferenceSession`` while it runs (``__init__`` calls are builds, ``run`` calls are
  runs); this includes the sessions of its dtype pass (``add_missing_dtypes_using_ort``). Its
  progress log (stdout) goes to a temporary file; the FP32 nodes it keeps are the ``Done: [...]``
  node list of that log (it does not return its block list).
* onnxconverter-common again, on a copy of the model whose unnamed nodes (the ``Constant`` nodes
  of this paddle2onnx export) get unique names (skip with ``--no-named``). The converter keys
  nodes by name; on the model as shipped every unnamed node is ``''`` to it, and blocking them
  gives Cast nodes with duplicate names that ONNX Runtime refuses to load.

The columns ``sessions`` / ``sess runs`` count every ``InferenceSession`` built and every ``run``
call with the same subclass, for both tools (for fp16guard this adds the FP32 reference, suffix
and amax sessions to the FP16 prefix engines). The ratio lines divide onnxconverter-common's
counts and wall time by fp16guard's; the target line is fp16guard's own (``result.build_bound``,
120 s). Lines after the table are notes: fp16guard's all-FP16 error; onnxconverter-common's
attempt count, the error of its converter with every node blocked (the best any attempt can
reach), its final model re-checked with fp16guard's emulation (strict FP16 storage, ORT graph
optimizations off) when it returns one, and the constants its converter clamped.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from fp16guard.bisection import DEFAULT_TOLERANCE, bisect
from fp16guard.compare import relative_l2  # noqa: E402
from fp16guard.examples import EXAMPLES, ppocr
from fp16guard.inputs import NamedInput

SIDE = 736
#: ``auto_convert_mixed_precision`` is stopped after this many seconds (``--amp-timeout``).
AMP_TIMEOUT_S = 900.0
#: The target for fp16guard's bisect on this model: wall time, seconds.
WALL_TARGET_S = 120.0


# -- instrumentation -------------------------------------------------------------------------------

class SessionCounter:
    """Shared counters of ONNX Runtime sessions built and ``run`` calls (safe across processes)."""

    def __init__(self, ctx: Any) -> None:
        self.builds = ctx.Value("i", 0)
        self.runs = ctx.Value("i", 0)

    @staticmethod
    def _bump(value: Any) -> None:
        with value.get_lock():
            value.value += 1


@contextlib.contextmanager
def counting_sessions(counter: SessionCounter) -> Iterator[None]:
    """Replace ``onnxruntime.InferenceSession`` with a counting subclass for the duration.

    Code that looks the class up at call time (``ort.InferenceSession(...)``), as both tools do,
    gets the subclass. A build is counted on entry, so failed builds count too.
    """
    original = ort.InferenceSession

    class CountingSession(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            counter._bump(counter.builds)
            super().__init__(*args, **kwargs)

        def run(self, *args: Any, **kwargs: Any) -> Any:
            counter._bump(counter.runs)
            return super().run(*args, **kwargs)

    ort.InferenceSession = CountingSession
    try:
        yield
    finally:
        ort.InferenceSession = original


# -- model and input -------------------------------------------------------------------------------

def coffee_input(side: int = SIDE) -> NamedInput:
    """``skimage.data.coffee()`` resized to ``side`` x ``side``, preprocessed as ppocr-det expects."""
    from PIL import Image
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.coffee()).resize((side, side), Image.BILINEAR))
    # preprocess() leaves a side x side image at its size (short side already `side`, multiple of 32)
    x = ppocr.preprocess(rgb, limit_side_len=side)
    assert x.shape == (1, 3, side, side) and x.dtype == np.float32, x.shape
    return NamedInput(f"skimage.data.coffee() {side}x{side}", (x,))


# -- the two tools -----------------------------------------------------------------------------------

@dataclass
class Row:
    """One tool's line of the table, plus notes printed under it."""

    tool: str
    builds: int | None
    runs: int | None
    seconds: float | None
    sessions: int
    session_runs: int
    verdict: str
    notes: list[str] = field(default_factory=list)


def run_fp16guard(model_path: Path, item: NamedInput, ctx: Any) -> tuple[Row, Any]:
    """fp16guard's bisect with the emulate backend; returns its row and the ``BisectResult``."""
    counter = SessionCounter(ctx)
    with counting_sessions(counter):
        t0 = time.perf_counter()
        result = bisect(model_path, [item], backend="emulate")
        seconds = time.perf_counter() - t0
    if result.offenders:
        o = result.offenders[0]
        verdict = f"blames {o.name} ({o.kind}), error {o.error:.3g} at cut {o.cut}/{len(result.candidates)}"
    else:
        verdict = "all-FP16 model good, nothing blamed"
    full = next((t for t in result.trials if t.cut == len(result.candidates)), None)
    notes = []
    if full is not None:
        notes.append(f"fp16guard: all-FP16 cut (emulate) error {full.error:.3g}; "
                     f"{len(result.trials)} cuts evaluated; monotonic={result.monotonic}")
    notes += [f"fp16guard: {n}" for n in result.notes]
    return Row("fp16guard bisect (emulate)", result.builds, result.runs, seconds,
               counter.builds.value, counter.runs.value, verdict, notes), result


def _validate(reference: list[np.ndarray], outputs: list[np.ndarray]) -> bool:
    """onnxconverter-common calls ``validate_fn(fp32_results, candidate_results)``."""
    return relative_l2(outputs, reference) <= DEFAULT_TOLERANCE


def _emulated_error(model: onnx.ModelProto, feed: dict[str, np.ndarray], reference: list[np.ndarray]) -> float:
    """Relative L2 error of a mixed-precision model under fp16guard's strict FP16 emulation."""
    from fp16guard.fp16_onnx import emulation_model, emulation_session_options

    session = ort.InferenceSession(emulation_model(model).SerializeToString(), emulation_session_options(),
                                   providers=["CPUExecutionProvider"])
    return relative_l2(session.run(None, feed), reference)


def _block_all_error(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float | str:
    """Error of the converter's model with every node on its block list (nothing meant to be FP16).

    This is the best any of its attempts can do; above the tolerance, no attempt can pass.
    """
    import copy

    from onnxconverter_common import float16

    inferred = onnx.shape_inference.infer_shapes(model)
    ref = ort.InferenceSession(inferred.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            blocked = float16.convert_float_to_float16(copy.deepcopy(inferred), keep_io_types=True,
                                                       node_block_list=[n.name for n in inferred.graph.node])
            session = ort.InferenceSession(blocked.SerializeToString(), providers=["CPUExecutionProvider"])
            return relative_l2(session.run(None, feed), ref)
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"


def _magnitude(warning: str) -> float:
    """|X| of the converter's "the float32 number X will be truncated to Y" warning (0 if unparsable)."""
    try:
        return abs(float(warning.split()[3]))
    except (IndexError, ValueError):
        return 0.0


def _amp_child(model_path: str, feed: dict[str, np.ndarray], counter: SessionCounter, log_path: str,
               results: Any) -> None:
    """Child process: run ``auto_convert_mixed_precision`` and put a summary dict on ``results``."""
    from onnxconverter_common import auto_mixed_precision

    ort.set_default_logger_severity(3)  # its models make ORT warn about every duplicate Cast name
    model = onnx.load(model_path)
    block_all = _block_all_error(model, feed)
    out: dict[str, Any] = {"error": None}
    with open(log_path, "w", buffering=1) as log, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with counting_sessions(counter), contextlib.redirect_stdout(log):
                results.put({"block_all_error": block_all})  # "started": the parent's timeout starts now
                t0 = time.perf_counter()
                try:
                    fp16 = auto_mixed_precision.auto_convert_mixed_precision(
                        model, feed, validate_fn=_validate, rtol=None, atol=None, keep_io_types=True)
                finally:
                    out["seconds"] = time.perf_counter() - t0
                    results.put({"finished": True})  # before the re-check below, which is not timed
        except Exception as e:  # noqa: BLE001 - report whatever it raises
            fp16 = None
            out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    out["clamped"] = sorted({str(w.message) for w in caught if "truncated" in str(w.message)},
                            key=lambda msg: -_magnitude(msg))
    if fp16 is not None:  # after the counted region: re-check its model
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        plain = ort.InferenceSession(fp16.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
        out["ort_error"] = relative_l2(plain, ref)
        try:
            out["emulated_error"] = _emulated_error(fp16, feed, ref)
        except Exception as e:  # noqa: BLE001
            out["emulated_error"] = f"{type(e).__name__}: {e}"
        cast = lambda m: sum(n.op_type == "Cast" for n in m.graph.node)  # noqa: E731
        out["casts_added"] = cast(fp16) - cast(model)
    results.put(out)


def _parse_log(log_path: str) -> tuple[int, bool | None, list[str] | None]:
    """(attempts, all-FP16 attempt valid?, final ``Done:`` node list) from the converter's stdout."""
    attempts, first_valid, done = 0, None, None
    try:
        lines = Path(log_path).read_text().splitlines()
    except OSError:
        return 0, None, None
    for i, line in enumerate(lines):
        if line.startswith("Running attempt"):
            attempts += 1
            if attempts == 1:
                first_valid = next((ln == "True" for ln in lines[i + 1:i + 3] if ln in ("True", "False")), None)
        elif line.startswith("Done:"):
            with contextlib.suppress(ValueError, SyntaxError):
                done = ast.literal_eval(line[len("Done:"):].strip())
    return attempts, first_valid, done


def name_unnamed_nodes(model_path: Path, directory: str) -> tuple[Path, int]:
    """Copy of the model where every unnamed node is named ``<op>_unnamed_<index>``.

    onnxconverter-common identifies nodes by name: every unnamed node is ``''`` in its node list
    and block list, and the Casts it adds after a blocked node are named after that node, so two
    blocked unnamed nodes give two Casts of the same name, which ONNX Runtime rejects.
    """
    model = onnx.load(str(model_path))
    unnamed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_unnamed_{i}"
            unnamed += 1
    out = Path(directory) / "ppocr_det_named.onnx"
    onnx.save(model, str(out))
    return out, unnamed


def run_amp(model_path: Path, item: NamedInput, ctx: Any, timeout_s: float, tool: str, tag: str) -> Row:
    """onnxconverter-common's ``auto_convert_mixed_precision`` in a child process, stopped after ``timeout_s``."""
    model = onnx.load(str(model_path))
    op_of = {n.name: n.op_type for n in model.graph.node}
    feed = {model.graph.input[0].name: item.arrays[0]}
    counter = SessionCounter(ctx)
    results = ctx.Queue()
    fd, log_path = tempfile.mkstemp(prefix="amp_", suffix=".log")
    os.close(fd)
    proc = ctx.Process(target=_amp_child, args=(str(model_path), feed, counter, log_path, results))
    proc.start()
    out: dict[str, Any] | None = None
    started: dict[str, Any] = {}
    with contextlib.suppress(queue.Empty):
        started = results.get(timeout=300)  # the child has loaded the model and calls the converter
        results.get(timeout=timeout_s)  # "finished": the converter returned or raised
        out = results.get(timeout=300)  # the summary, after the child re-checked the model
    if out is None:
        proc.terminate()
    proc.join(30)
    builds, runs = counter.builds.value, counter.runs.value
    attempts, first_valid, done = _parse_log(log_path)
    first = {True: "passed", False: "failed", None: "not seen"}[first_valid]
    notes = [f"{tag}: {attempts} conversion attempts; the all-FP16 attempt (ORT CPU, default optimizations) {first}"]
    if "block_all_error" in started:
        block_all = started["block_all_error"]
        notes.append(f"{tag}: its converter with every node blocked (no node meant to be FP16): error "
                     + (f"{block_all:.3g}" if isinstance(block_all, float) else block_all))
    if not started:
        return Row(tool, None, None, None, builds, runs, f"child process failed (exit code {proc.exitcode})", notes)
    if out is None:
        verdict = f"did not finish in {timeout_s:.0f} s"
        return Row(tool, builds, runs, None, builds, runs, verdict, notes + [f"{tag}: log kept in {log_path}"])
    os.unlink(log_path)
    if out["error"] is not None:
        verdict = f"error: {out['error']}"
    else:
        kept = done or []
        ops: dict[str, int] = {}
        for name in kept:
            ops[op_of.get(name, "?")] = ops.get(op_of.get(name, "?"), 0) + 1
        other = builds - attempts - 1  # dtype pass + FP32 reference (+1 final validation is the -1)
        verdict = f"keeps {len(kept)} nodes FP32 (its Done: list), +{out['casts_added']} Cast nodes"
        emulated = out["emulated_error"]
        emulated = f"{emulated:.3g}" if isinstance(emulated, float) else emulated
        notes += [f"{tag}: FP32 nodes by op: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])),
                  f"{tag}: sessions = {attempts} attempts + 1 final validation + {other} others (dtype pass, FP32 reference)",
                  f"{tag}: its model's error: {out['ort_error']:.3g} under ORT CPU (what it validated), "
                  f"{emulated} under fp16guard emulate (strict FP16 storage)"]
    if out["clamped"]:
        notes.append(f"{tag}: its converter clamped {len(out['clamped'])} distinct constants to the FP16 range, "
                     f"largest: {out['clamped'][0]!r}")
    return Row(tool, builds, runs, out["seconds"], builds, runs, verdict, notes)


# -- prefix reuse -----------------------------------------------------------------------------------------

def run_prefix_reuse(repeats: int) -> list[str]:
    """The ``--prefix-reuse`` table (module docstring), as lines."""
    from fp16guard.backends.emulate import EmulateBackend
    from fp16guard.bisection.targets import OnnxSplitTarget

    class Timed(EmulateBackend):
        """``emulate``, timing every prefix engine run."""

        seconds = 0.0

        def build(self, model):
            engine = super().build(model)
            run = engine.run

            def timed(feeds):
                t = time.perf_counter()
                try:
                    return run(feeds)
                finally:
                    self.seconds += time.perf_counter() - t

            engine.run = timed  # the instance attribute shadows Engine.run for this engine only
            return engine

    targets: list[OnnxSplitTarget] = []
    init = OnnxSplitTarget.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        targets.append(self)

    example = EXAMPLES["ppocr-det"]
    path, items = example.load(), example.inputs()
    rows: dict[bool, list] = {False: [], True: []}
    OnnxSplitTarget.__init__ = keep
    try:
        for _ in range(repeats):
            for reuse in (False, True):
                OnnxSplitTarget.reuse_prefix = reuse
                backend = Timed()
                t0 = time.perf_counter()
                result = bisect(path, items, backend=backend)
                rows[reuse].append((time.perf_counter() - t0, backend.seconds, targets[-1], result))
    finally:
        OnnxSplitTarget.__init__ = init
        OnnxSplitTarget.reuse_prefix = True
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"bisect --example ppocr-det ({len(items)} photos, emulate, tolerance from the data), FP16 prefixes run "
             f"whole vs from the last good cut, alternating, {repeats} x each; CPU x{cpus}, onnxruntime {ort.__version__}",
             f"{'prefix':24} {'wall s':>7} {'prefix s':>8} {'prefix nodes':>12} {'cuts':>4} {'runs':>4} "
             f"{'builds':>6} {'cache MB':>8}  verdict"]
    numbers = []
    for reuse, label in ((False, "whole (reuse_prefix off)"), (True, "from the last good cut")):
        for wall, prefix_s, target, result in rows[reuse]:
            o = result.offenders[0] if result.offenders else None
            verdict = f"{o.name} at cut {o.cut}, error {o.error:.3g}, amax {o.amax:.4g}" if o else "nothing blamed"
            lines.append(f"{label:24} {wall:7.1f} {prefix_s:8.1f} {target.prefix_nodes:12d} {len(result.trials):4d} "
                         f"{result.runs:4d} {result.builds:6d} {target.cache_peak / 1e6:8.1f}  {verdict}")
            numbers.append(([(t.cut, t.error, t.bad) for t in result.trials], result.offenders, result.noise,
                            result.tolerance, result.noise_cut))
    same = all(n == numbers[0] for n in numbers)
    lines.append(f"same numbers (every trial's cut, error and verdict; noise, tolerance, offender, amax): "
                 f"{'yes' if same else 'NO'}")
    return lines


# -- report --------------------------------------------------------------------------------------------

def _fmt(v: float | int | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: float | int | None, b: float | int | None) -> str:
    return "n/a" if a is None or not b else f"x{a / b:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-amp", action="store_true", help="run only fp16guard's bisect")
    ap.add_argument("--no-named", action="store_true",
                    help="run onnxconverter-common only on the model as shipped, not on the named-nodes copy")
    ap.add_argument("--amp-timeout", type=float, default=AMP_TIMEOUT_S,
                    help=f"stop each onnxconverter-common run after this many seconds (default {AMP_TIMEOUT_S:.0f})")
    ap.add_argument("--prefix-reuse", type=int, default=0, metavar="R",
                    help="only compare bisect --example ppocr-det with prefixes run whole and from the last good "
                         "cut, R times each (module docstring)")
    args = ap.parse_args()
    if args.prefix_reuse:
        print("\n".join(run_prefix_reuse(args.prefix_reuse)))
        return

    ctx = mp.get_context("spawn")
    model_path = Path(EXAMPLES["ppocr-det"].load())
    item = coffee_input()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        from importlib.metadata import version

        occ = version("onnxconverter-common")
    except Exception:  # noqa: BLE001
        occ = "?"

    fg_row, result = run_fp16guard(model_path, item, ctx)
    rows = [fg_row]
    preamble = []
    if not args.skip_amp:
        rows.append(run_amp(model_path, item, ctx, args.amp_timeout, "onnxconverter-common auto_mixed_prec", "amp"))
        if not args.no_named:
            with tempfile.TemporaryDirectory() as tmp:
                named, unnamed = name_unnamed_nodes(model_path, tmp)
                rows.append(run_amp(named, item, ctx, args.amp_timeout, "  same, unnamed nodes named", "amp-named"))
            preamble.append(f"(\"same, unnamed nodes named\": a copy of the model where its {unnamed} unnamed "
                            f"nodes get unique names, see name_unnamed_nodes)")

    n = len(result.candidates)
    print(f"fp16guard bisect cost: PP-OCRv4 det ({n} candidate cuts), input 1x3x{SIDE}x{SIDE} "
          f"({item.label}), CPU x{cpus}, onnxruntime {ort.__version__}, onnxconverter-common {occ}, "
          f"tolerance: relative L2 <= {DEFAULT_TOLERANCE}")
    print(f"{'tool':37} {'builds':>6} {'runs':>5} {'wall s':>7} {'sessions':>8} {'sess runs':>9}  verdict")
    for r in rows:
        print(f"{r.tool:37} {_fmt(r.builds, 'd'):>6} {_fmt(r.runs, 'd'):>5} {_fmt(r.seconds, '.1f'):>7} "
              f"{r.sessions:>8d} {r.session_runs:>9d}  {r.verdict}")
    for amp, label in zip(rows[1:], ("onnxconverter-common", "onnxconverter-common, nodes named")):
        failed = " (it failed)" if amp.verdict.startswith("error") else ""
        unfinished = " (it did not finish)" if amp.seconds is None else ""
        print(f"ratio ({label} / fp16guard)  builds {_ratio(amp.builds, fg_row.builds)}, "
              f"sessions {_ratio(amp.sessions, fg_row.sessions)}, wall {_ratio(amp.seconds, fg_row.seconds)}"
              f"{failed}{unfinished}")
    met = result.builds <= result.build_bound and fg_row.seconds is not None and fg_row.seconds <= WALL_TARGET_S
    print(f"target: builds <= ceil(log2 {n}) + 2 = {result.build_bound}, wall <= {WALL_TARGET_S:.0f} s: "
          f"{'met' if met else 'not met'} (builds {result.builds}, wall {fg_row.seconds:.1f} s)")
    for line in preamble:
        print(f"  {line}")
    for r in rows:
        for note in r.notes:
            print(f"  {note}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
