"""What ``fp16guard fix`` costs next to NVIDIA ModelOpt AutoCast: wall time and peak memory per
step, on the same ONNX models and the same calibration inputs, each tool in its own subprocess
pinned to ``--cores`` CPU cores (issue 28, item 5).

Models:

* ``ppocr-det``: the bundled PP-OCRv4 detector (``fp16guard.examples``), its ONNX file and its two
  calibration photos as ``.npz`` files. It is also run as users run it (``fix --example``, which
  also verifies on the three validation photos): tool ``fp16guard-ex``.
* ``bert``: BERT encoders from ``BertConfig(num_hidden_layers=L)`` (bert-base width: hidden 768,
  12 heads, FFN 3072, vocabulary 30522; random weights, seed 0), sequence 128, batch 1, exported
  with ``torch.onnx.export(opset_version=17, dynamo=False)``, inputs ``input_ids`` and
  ``attention_mask``. The first layer's attention output projection (``encoder.layer.0.attention.
  output.dense``, weight and bias) is multiplied by ``--growth`` (default 2e5) so that its output
  and the residual sum reach ~1.2e5 in FP32, past FP16's 65504, at every depth. Calibration: 4
  random token sequences (numpy seed 0..3, mask all ones), one ``.npz`` each.

Both tools get the same folder of ``.npz`` files: ``fp16guard fix MODEL.onnx --input DIR -o OUT``
(default backend, the CPU emulation) and ``python -m modelopt.onnx.autocast --onnx_path MODEL.onnx
--calibration_data DIR --providers cpu --low_precision_type fp16 --log_level INFO`` (its defaults
otherwise: ``data_max`` 512, ``init_max`` 65504), run by ``--autocast-python``. Built models and
inputs are cached under ``--cache`` (default ``$TMPDIR/fp16guard_fix_cost``), never in the repo.

Measurement: the tool's resident memory (its process and its children, ``/proc/<pid>/status``
``VmRSS``) is sampled at 20 Hz; each stderr and stdout line is time-stamped as it arrives. fp16guard writes
one line per finished step on a pipe (``done  <description> (<count>)  <seconds> s``,
:mod:`fp16guard.progress`); a step spans ``[arrival - seconds, arrival]`` and its peak is the
largest sample in that span (for the calibration steps the count is the number of ONNX Runtime
runs). Time before the first step is ``startup``, time between steps ``(between steps)``, time
after the last one ``(after last step)``. AutoCast logs phases; a phase runs from one of its log
lines to the next (``load, sanitize, infer types``, ``reference runs``, ``aggregate, classify``,
``convert``, ``save``). ``TOTAL`` rows give the wall time and the sampled peak; ``maxrss`` in the
note is the kernel's peak of the largest single process (``wait4``), ``cpu`` its user+system
seconds, ``load`` the 1-minute load average before and after (another job on the cores shows
there). Each run's time-stamped output is kept in ``--cache``/<model>/<tool>.log.

Without a working ``--autocast-python`` the AutoCast rows are taken from ``--stored`` (a results
file this script wrote before) and marked ``stored``.

Side venv for AutoCast (ModelOpt 0.47.0 with its ONNX extras; torch 2.13.0 CPU; on a machine
without CUDA its ``onnxruntime-gpu`` runs on ``CPUExecutionProvider``)::

    python3 -m venv /tmp/movenv
    /tmp/movenv/bin/pip install torch==2.13.0 'nvidia-modelopt[onnx]'
    /tmp/movenv/bin/python -m modelopt.onnx.autocast --help   # check

Run (in the project's venv; output for this machine ``benchmarks/results_fix_cost_cpu.txt``, where
the 48-layer model passes 16 GiB in both tools and is killed)::

    python benchmarks/fix_cost.py --autocast-python /tmp/movenv/bin/python --max-rss-gib 16 \\
        --out benchmarks/results_fix_cost_cpu.txt
    python benchmarks/fix_cost.py --models bert --depths 4,12 --autocast-python /tmp/movenv/bin/python

To measure a commit rather than the working tree (the header names the fp16guard it ran)::

    mkdir -p /tmp/head && git archive HEAD fp16guard | tar -x -C /tmp/head
    PYTHONPATH=/tmp/head python benchmarks/fix_cost.py --autocast-python /tmp/movenv/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_STORED = HERE / "results_fix_cost_cpu.txt"
SEQ = 128
N_CALIB = 4

#: ``done  <description> (<count>)  <seconds> s`` (the count is optional).
DONE = re.compile(r"^done  (?P<desc>.*?)(?: \((?P<count>\d+(?:/\d+)?)\))?  (?P<sec>\d+(?:\.\d+)?) s$")
#: AutoCast's log lines that open a phase (first match wins; each phase once), in order.
AUTOCAST_PHASES = [
    (re.compile(r"Running ONNX Runtime to obtain reference outputs"), "reference runs"),
    (re.compile(r"Aggregating statistics|Skipping node|Converted \d+/\d+ nodes"), "aggregate, classify, convert"),
    (re.compile(r"Converted \d+/\d+ nodes"), "save"),
    (re.compile(r"Converted model saved to"), "(exit)"),
]


# ---------------------------------------------------------------------------------------- parsing


@dataclass
class Step:
    """One row: a step's name, its wall seconds, its peak RSS (MiB; None: no sample) and a note."""

    name: str
    seconds: float
    peak_mib: float | None = None
    note: str = ""


def parse_done(line: str) -> tuple[str, str | None, float] | None:
    """``(description, count, seconds)`` of an fp16guard ``done`` line, None for any other line."""
    m = DONE.match(line.rstrip("\n"))
    if m is None:
        return None
    return m["desc"], m["count"], float(m["sec"])


def short(desc: str) -> str:
    """A step description without its detail after a second ``": "`` (``verify: the fixed model on
    emulate: FP16 storage emulated ...`` -> ``verify: the fixed model on emulate``)."""
    head, sep, rest = desc.partition(": ")
    return head + sep + rest.split(": ")[0] if sep else desc


def fp16guard_steps(lines: list[tuple[float, str]], end: float) -> list[tuple[str, float, float, str]]:
    """``(name, start, stop, note)`` spans from time-stamped stderr lines (seconds since the
    process started): each ``done`` line's step, ``startup`` before the first, ``(between steps)``
    for the gaps (summed into one span list entry each), ``(after last step)`` up to ``end``."""
    spans = []
    for t, line in lines:
        parsed = parse_done(line)
        if parsed is None:
            continue
        desc, count, sec = parsed
        spans.append((short(desc), max(0.0, t - sec), t, f"count {count}" if count else ""))
    out, cursor = [], 0.0
    for i, (desc, start, stop, note) in enumerate(spans):
        if i == 0:
            out.append(("startup", 0.0, start, "imports, load, inputs"))
        elif start - cursor > 0.05:
            out.append(("(between steps)", cursor, start, ""))
        out.append((desc, start, stop, note))
        cursor = max(cursor, stop)
    if spans:
        out.append(("(after last step)", cursor, end, "report, write"))
    return out


def autocast_steps(lines: list[tuple[float, str]], end: float) -> list[tuple[str, float, float, str]]:
    """``(name, start, stop, note)`` spans of AutoCast's phases from its log lines."""
    marks = [(0.0, "load, sanitize, infer types")]
    todo = list(AUTOCAST_PHASES)
    for t, line in lines:
        while todo and todo[0][0].search(line):
            marks.append((t, todo.pop(0)[1]))
    out = []
    for (t0, name), (t1, _) in zip(marks, marks[1:] + [(end, "")]):
        out.append((name, t0, t1, ""))
    return [s for s in out if s[0] != "(exit)" or s[2] - s[1] > 0.05]


# ---------------------------------------------------------------------------------------- measuring


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MiB."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_kib(p)
        todo += _children(p)
    return total / 1024


@dataclass
class Run:
    """One tool's run: return code, wall seconds, RSS samples, time-stamped stderr lines."""

    rc: int | None
    wall: float
    samples: list[tuple[float, float]]
    lines: list[tuple[float, str]]  # stderr and stdout, in order of arrival
    maxrss_mib: float
    timed_out: bool = False
    stdout: str = ""
    memory_out: bool = False
    cpu_s: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)

    def peak(self, t0: float = 0.0, t1: float = float("inf")) -> float | None:
        """Largest RSS sample in ``[t0, t1]`` (the nearest sample if none falls inside)."""
        inside = [r for t, r in self.samples if t0 - 0.025 <= t <= t1 + 0.025]
        if inside:
            return max(inside)
        if not self.samples:
            return None
        return min(self.samples, key=lambda s: abs(s[0] - (t0 + t1) / 2))[1]


def measure(cmd: list[str], cores: int, timeout: float, max_rss_mib: float = float("inf"), cwd: Path | None = None
            ) -> Run:
    """Run ``cmd`` in ``cwd`` pinned to the first ``cores`` CPUs, sampling RSS at 20 Hz and
    time-stamping stderr; killed past ``timeout`` seconds or ``max_rss_mib`` of resident memory."""
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.pop("COLUMNS", None)
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus), start_new_session=True)
    samples: list[tuple[float, float]] = []
    lines: list[tuple[float, str]] = []
    out_chunks: list[str] = []
    done = threading.Event()
    over = []

    def sample() -> None:
        while not done.is_set():
            rss = tree_rss_mib(proc.pid)
            samples.append((time.perf_counter() - t_start, rss))
            if rss > max_rss_mib and not over:
                over.append(rss)
                os.killpg(proc.pid, signal.SIGKILL)
            done.wait(0.05)

    def read_err() -> None:
        for line in proc.stderr:
            lines.append((time.perf_counter() - t_start, line.rstrip("\n")))

    def read_out() -> None:  # AutoCast logs to stdout once its handler is set up
        for line in proc.stdout:
            out_chunks.append(line)
            lines.append((time.perf_counter() - t_start, line.rstrip("\n")))

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, read_err, read_out)]
    for th in threads:
        th.start()
    timed_out = False
    killer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    load0 = os.getloadavg()[0]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t_start
    killer.cancel()
    done.set()
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and wall >= timeout - 1:
        timed_out = True
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines.sort(key=lambda x: x[0])
    for th in threads:
        th.join(timeout=5)
    return Run(proc.returncode, wall, samples, lines, usage.ru_maxrss / 1024, timed_out, "".join(out_chunks),
               bool(over), usage.ru_utime + usage.ru_stime, (load0, os.getloadavg()[0]))


# ---------------------------------------------------------------------------------------- models


@dataclass
class Model:
    """A benchmark model: its name, its FP32 ONNX file, its folder of calibration ``.npz`` files,
    and for bundled examples the ``--example`` name."""

    name: str
    onnx: Path
    calib: Path
    example: str | None = None
    info: str = ""


def _input_names(path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def example_model(name: str, cache: Path) -> Model:
    """A bundled ONNX example: its file and its calibration inputs as ``.npz``, via fp16guard.examples."""
    from fp16guard.examples import get_example
    from fp16guard.loading import Framework

    ex = get_example(name)
    if ex.framework != Framework.ONNX:
        raise SystemExit(f"fix_cost.py: example {name} is not an ONNX model (AutoCast takes ONNX only)")
    path = Path(ex.load())
    names = _input_names(path)
    calib = cache / name / "calib"
    if calib.exists():
        shutil.rmtree(calib)
    calib.mkdir(parents=True)
    labels = []
    for i, item in enumerate(ex.calibration()):
        np.savez(calib / f"{i:02d}.npz", **{n: np.asarray(a) for n, a in zip(names, item.arrays)})
        labels.append(item.label)
    return Model(name, path, calib, example=name, info=f"{path.name}, calibration {', '.join(labels)}")


def build_bert(layers: int, growth: float, path: Path) -> None:
    """Export the benchmark's BERT encoder with ``layers`` layers to ``path`` (see the docstring)."""
    import warnings

    import torch
    import transformers as tf

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(num_hidden_layers=layers, attn_implementation="eager")).eval()
    with torch.no_grad():
        dense = model.encoder.layer[0].attention.output.dense
        dense.weight.mul_(growth)
        dense.bias.mul_(growth)

    class LastHidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.zeros(1, SEQ, dtype=torch.int64)
    mask = torch.ones(1, SEQ, dtype=torch.int64)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(LastHidden(model).eval(), (ids, mask), str(tmp), opset_version=17, dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    tmp.rename(path)


def bert_model(layers: int, growth: float, cache: Path) -> Model:
    """The ``layers``-layer BERT (built in a subprocess once per growth, then cached) and its inputs."""
    d = cache / f"bert-L{layers}-g{growth:g}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "model.onnx"
    if not path.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-bert", str(layers), "--growth", str(growth), str(path)],
                       check=True, stderr=subprocess.DEVNULL)
        print(f"# built {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    calib = d / "calib"
    calib.mkdir(exist_ok=True)
    for seed in range(N_CALIB):
        rng = np.random.default_rng(seed)
        np.savez(calib / f"{seed:02d}.npz", input_ids=rng.integers(0, 30522, (1, SEQ)).astype(np.int64),
                 attention_mask=np.ones((1, SEQ), np.int64))
    mib = path.stat().st_size / 2**20
    return Model(f"bert-L{layers}", path, calib, info=f"{mib:.0f} MiB ONNX, growth {growth:g}, {N_CALIB} x seq {SEQ}")


# ---------------------------------------------------------------------------------------- tools


def fp16guard_cmd(m: Model, out: Path, example: bool) -> list[str]:
    """``fp16guard fix`` in this interpreter: on the model file and the ``.npz`` folder, or ``--example``."""
    head = [sys.executable, "-c", "import sys; from fp16guard.cli import console_main; sys.argv[0] = 'fp16guard'; "
                                  "console_main()", "fix"]
    if example:
        return head + ["--example", m.example, "-o", str(out)]
    return head + [str(m.onnx), "--input", str(m.calib), "-o", str(out)]


def autocast_cmd(python: str, m: Model, out: Path) -> list[str]:
    """AutoCast's command line on the model file and the ``.npz`` folder, CPU only."""
    return [python, "-m", "modelopt.onnx.autocast", "--onnx_path", str(m.onnx), "--output_path", str(out),
            "--calibration_data", str(m.calib), "--low_precision_type", "fp16", "--providers", "cpu",
            "--log_level", "INFO"]


def autocast_works(python: str | None) -> tuple[bool, str]:
    """Whether ``python`` imports AutoCast; ``(ok, version or reason)``."""
    if not python:
        return False, "no --autocast-python given"
    try:
        r = subprocess.run([python, "-c", "import modelopt, modelopt.onnx.autocast, onnxruntime, torch; "
                                          "print(modelopt.__version__, onnxruntime.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{python}: {e}"
    if r.returncode != 0:
        return False, f"{python} cannot import modelopt.onnx.autocast: {r.stderr.strip().splitlines()[-1:]}"
    return True, r.stdout.strip()


def rows_of(run: Run, spans: list[tuple[str, float, float, str]], tail: str = "") -> list[Step]:
    """The TOTAL row and one row per span (gaps summed into one ``(between steps)`` row)."""
    status = ("timeout" if run.timed_out else "killed at the --max-rss-gib limit (too large for this machine)" if run.memory_out
              else f"rc {run.rc}")
    total = Step("TOTAL", run.wall, run.peak(), f"{status}, cpu {run.cpu_s:.0f} s, load {run.load[0]:.1f}->"
                                                f"{run.load[1]:.1f}, maxrss {run.maxrss_mib:.0f} MiB{tail}")
    rows, between = [], None
    for name, t0, t1, note in spans:
        if name == "(between steps)":
            if between is None:
                between = Step(name, 0.0, None)
                rows.append(between)
            between.seconds += t1 - t0
            p = run.peak(t0, t1)
            between.peak_mib = max(between.peak_mib or 0.0, p or 0.0)
            continue
        if name == "(after last step)" and (run.timed_out or run.memory_out):
            name, note = "(next step, unfinished when killed)", ""
        rows.append(Step(name, t1 - t0, run.peak(t0, t1), note))
    return [total] + rows


def stored_autocast(path: Path) -> dict[str, list[Step]]:
    """AutoCast's rows per model from a results file this script wrote."""
    out: dict[str, list[Step]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split(None, 4)
        if len(parts) == 5 and parts[1] == "autocast":
            model, _, sec, peak, rest = parts
            name, _, note = rest.partition("  | ")
            try:
                out.setdefault(model, []).append(Step(name.strip(), float(sec), None if peak == "-" else float(peak),
                                                      ("stored; " + note.strip()).strip("; ")))
            except ValueError:
                continue
    return out


# ---------------------------------------------------------------------------------------- main


def git_head() -> str:
    """`` (git <sha>[, modified])`` of the checkout the benchmark runs in, read-only; empty if none."""
    try:
        sha = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(HERE), "status", "--porcelain", "--",
                                "../fp16guard"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return f" (checkout at {sha}{', fp16guard/ modified' if dirty else ''})" if sha else ""


def fmt(model: str, tool: str, s: Step, indent: bool) -> str:
    """One table row: ``model tool wall_s peak_MiB step  | note``."""
    peak = "-" if s.peak_mib is None else f"{s.peak_mib:.0f}"
    name = ("  " if indent else "") + s.name
    note = f"  | {s.note}" if s.note else ""
    return f"{model:12s} {tool:13s} {s.seconds:8.1f} {peak:>8s} {name}{note}"


def main(argv: list[str] | None = None) -> None:
    """Build or load the models, run both tools on each, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="ppocr-det,bert", help="comma-separated: bundled ONNX example names, bert")
    p.add_argument("--depths", default="4,12,24,48", help="BERT layer counts (comma-separated)")
    p.add_argument("--growth", type=float, default=2e5, help="factor on layer 0's attention output projection")
    p.add_argument("--autocast-python", default=None, help="interpreter with nvidia-modelopt[onnx] (side venv)")
    p.add_argument("--stored", type=Path, default=DEFAULT_STORED, help="results file to take AutoCast rows from "
                                                                       "when AutoCast cannot run")
    p.add_argument("--tools", default="fp16guard,autocast,fp16guard-ex", help="which tools to run")
    p.add_argument("--cores", type=int, default=2, help="CPU cores each tool is pinned to (default 2)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one tool may run on one model (default 900)")
    p.add_argument("--max-rss-gib", type=float, default=0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                   / 2**30, help="kill a tool whose resident memory passes this (default 85%% of RAM)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fp16guard_fix_cost")
    p.add_argument("--out", type=Path, default=None, help="also write the results here")
    p.add_argument("--build-bert", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_bert is not None:
        build_bert(args.build_bert, args.growth, Path(args.path))
        return

    import onnxruntime
    import torch

    import fp16guard

    tools = args.tools.split(",")
    ac_ok, ac_info = autocast_works(args.autocast_python) if "autocast" in tools else (False, "not asked")
    stored = {} if ac_ok else stored_autocast(args.stored)
    cmdline = "python benchmarks/fix_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out_lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        out_lines.append(line)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    args.cache.mkdir(parents=True, exist_ok=True)  # the tools run there: python -c puts the cwd first on sys.path
    src = Path(subprocess.run([sys.executable, "-c", "import fp16guard; print(fp16guard.__file__)"], cwd=args.cache,
                              capture_output=True, text=True, check=True).stdout.strip()).resolve().parent
    src = f"{src}{git_head()}" if src.parent == HERE.parent else str(src)
    if os.environ.get("PYTHONPATH"):
        cmdline = f"PYTHONPATH={os.environ['PYTHONPATH']} {cmdline}"
    emit(f"# {cmdline}")
    emit(f"# {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {args.cores} cores pinned of "
         f"{os.cpu_count()} ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
         f"fp16guard {getattr(fp16guard, '__version__', '?')} from {src}, torch {torch.__version__}, "
         f"onnxruntime {onnxruntime.__version__} (fp16guard side)")
    emit(f"# AutoCast: {'modelopt, onnxruntime, torch = ' + ac_info if ac_ok else 'NOT RUN (' + ac_info + '); rows from ' + str(args.stored) + ' marked stored'}")
    emit(f"# limits per tool run: {args.timeout:.0f} s, {args.max_rss_gib:.0f} GiB resident (--timeout, --max-rss-gib)")
    emit("# rows: model tool wall_s peak_MiB step | note; TOTAL = whole subprocess; peak = sampled RSS of the "
         "process tree (20 Hz); step rows from fp16guard's 'done' lines / AutoCast's log lines")

    models: list[Model] = []
    for name in args.models.split(","):
        if name == "bert":
            models += [bert_model(int(d), args.growth, args.cache) for d in args.depths.split(",")]
        else:
            models.append(example_model(name, args.cache))

    summary = []
    emit(f"{'model':12s} {'tool':13s} {'wall_s':>8s} {'peak_MiB':>8s} step  | note")
    for m in models:
        emit(f"# {m.name}: {m.info}")
        totals: dict[str, Step] = {}
        work = args.cache / m.name.replace("/", "_")
        work.mkdir(parents=True, exist_ok=True)
        for tool in tools:
            if tool == "fp16guard-ex" and m.example is None:
                continue
            if tool == "autocast" and not ac_ok:
                for i, s in enumerate(stored.get(m.name, [])):
                    emit(fmt(m.name, tool, s, i > 0))
                    if s.name == "TOTAL":
                        totals[tool] = s
                if m.name not in stored:
                    emit(f"{m.name:12s} {tool:13s} {'-':>8s} {'-':>8s} TOTAL  | not run and no stored row")
                continue
            out = work / f"{tool}.onnx"
            if tool == "autocast":
                run_cmd = autocast_cmd(args.autocast_python, m, out)
                run = measure(run_cmd, args.cores, args.timeout, args.max_rss_gib * 1024, cwd=work)
                spans = autocast_steps(run.lines, run.wall)
            else:
                run_cmd = fp16guard_cmd(m, out, tool == "fp16guard-ex")
                run = measure(run_cmd, args.cores, args.timeout, args.max_rss_gib * 1024, cwd=work)
                spans = fp16guard_steps(run.lines, run.wall)
            tail = ""
            if tool == "autocast":
                conv = [ln for _, ln in run.lines if re.search(r"Converted \d+/\d+ nodes", ln)]
                if conv:
                    tail = ", " + conv[0].split(" - ")[-1].split(":")[-1].strip()
            else:
                verdict = [ln for ln in run.stdout.splitlines() if ln.startswith("fixed model runs")]
                if verdict:
                    tail = ", " + verdict[0][:110]
            if run.rc not in (0, 1) or run.timed_out or run.memory_out:
                err = [ln for _, ln in run.lines if ln.strip()][-3:]
                tail += "; stderr tail: " + " / ".join(e[:160] for e in err)
            (work / f"{tool}.log").write_text(f"$ {' '.join(run_cmd)}\n" + "\n".join(f"{t:8.2f} {ln}" for t, ln in run.lines) + "\n")
            rows = rows_of(run, spans, tail)
            for i, s in enumerate(rows):
                emit(fmt(m.name, tool, s, i > 0))
            totals[tool] = rows[0]
            if out.exists():
                out.unlink()
        fix, ac = totals.get("fp16guard"), totals.get("autocast")
        unfinished = [f"{t} {re.search(r'(timeout|killed at[^,]*)', s.note)[1]}" for t, s in
                      (("fix", fix), ("AutoCast", ac)) if s and re.search(r"timeout|killed at", s.note)]
        if unfinished:
            summary.append(f"{m.name:12s} no ratio: {', '.join(unfinished)}")
        elif fix and ac and ac.seconds > 0:
            cpu = [re.search(r"cpu (\d+) s", s.note) for s in (fix, ac)]
            cpu_ratio = (f"  cpu {cpu[0][1]} vs {cpu[1][1]} s ({int(cpu[0][1]) / max(1, int(cpu[1][1])):.2f}x)"
                         if all(cpu) else "")
            summary.append(f"{m.name:12s} fix {fix.seconds:7.1f} s  AutoCast {ac.seconds:7.1f} s  "
                           f"fix/AutoCast {fix.seconds / ac.seconds:5.2f}x   peak {fix.peak_mib or 0:6.0f} vs "
                           f"{ac.peak_mib or 0:6.0f} MiB{cpu_ratio}" + ("  (AutoCast stored)" if not ac_ok else ""))
    emit("# wall-time ratio fp16guard fix / AutoCast (same model file, same .npz inputs); cpu = user+system s")
    for line in summary:
        emit("# " + line)
    if args.out:
        args.out.write_text("\n".join(out_lines) + "\n")


if __name__ == "__main__":
    main()
