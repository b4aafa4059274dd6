"""Inference latency of fp16guard's fixed FP16 model against naive FP16, FP32 fallback and FP32, on ONNX Runtime.

    python benchmarks/fixed_speed.py --out benchmarks/results_fixed_speed_h100.txt
    python benchmarks/fixed_speed.py --models resnet50 --batch 32 --iters 200
    python benchmarks/fixed_speed.py --provider cpu --iters 3 --warmup 1      # smoke run on a CPU

**Target (issue requirement): on the GPU (CUDA EP), fixed / naive <= 1.02** for each model: the
scale rewrites fold into the weights, so the fixed model must cost no more than the plain FP16
conversion. The script prints whether each model meets it; on the CPU EP it says the target is not
judged there (ONNX Runtime's CPU EP has no FP16 kernel for most ops and runs them in FP32 between
inserted Casts, so FP16 timings there say nothing about a GPU).

Four variants of each model, built and timed in one run:

* ``fp32``: the original FP32 ONNX graph.
* ``naive``: ``fp16guard.fp16_onnx.to_typed_fp16(original)``, the plain typed FP16 conversion
  (FP32 graph inputs and outputs, everything else FP16; overflow left as it is).
* ``fixed``: ``fix_model(model, calibration, compare_naive=False, force=True, backend="emulate").fixed``:
  BatchNorms and bias Adds folded, power-of-two scale regions folded into the weights, typed FP16
  with only the plan's unfixable nodes in FP32 (verified on the CPU ``emulate`` backend).
* ``fallback``: the same with ``fallback="fp32"`` (the original graph, the nodes that overflow kept
  in FP32 with Casts around them, as Polygraphy / AutoCast / onnxconverter-common would do). It
  reuses the ``fixed`` run's plan (``plan=``): calibration is deterministic, so this only skips
  calibrating twice.

Models:

* ``ppocr``: the bundled PP-OCRv4 text detector (``fp16guard.examples.get_example("ppocr-det")``),
  batch 1, input ``skimage.data.page()`` through ``fp16guard.examples.ppocr.preprocess`` (short
  side scaled to 736, BGR, ``(x/255 - 0.5)/0.5``; 736x1472) and centre-cropped to ``[1, 3, 736,
  736]``. Calibrated on the example's ``.calibration()`` inputs (``text``, ``chelsea``). Needs the
  example's weights in the cache
  (``$FP16GUARD_CACHE``, ``fp16guard fetch-examples``) on a machine without network.
* ``resnet50``: torchvision's ``resnet50()`` when torchvision imports, else
  ``benchmarks/_resnet50.py`` (same layout), random weights from ``torch.manual_seed(--seed)``,
  eval mode, exported with ``fp16guard.torch_onnx.export_onnx`` at ``[--batch, 3, 224, 224]`` (static
  shape). Calibrated on ``--calib`` standard normal inputs (numpy ``default_rng(--seed)``); timed on
  one more draw. With random weights nothing overflows, the plan is empty and fixed is naive's
  graph byte for byte (the report says so): its fixed/naive ratio is the measurement's noise floor.

Sessions: ``onnxruntime.InferenceSession`` with default ``SessionOptions`` (graph optimizations
``ORT_ENABLE_ALL``, as deployed). ``--provider cuda`` (default) needs onnxruntime-gpu's
``CUDAExecutionProvider``, with ``cudnn_conv_algo_search`` ``HEURISTIC`` (``--conv-algo``) as in
``fp16guard/backends/onnxruntime.py``; a session that silently fell back to the CPU is refused.
``--io binding`` (default on CUDA) binds the input once on the device and the outputs on the
device (IOBinding), so only the model is timed; ``--io numpy`` times ``session.run`` with numpy
arrays, host<->device copies included (alike in every variant: all four take and return FP32).

Timing: ``--warmup`` untimed rounds, then ``--iters`` timed rounds; each round runs every variant
once, in turn, so drift hits all alike. Per variant the table gives median and mean ms per run
(``time.perf_counter`` around one run, which returns once the outputs are ready), and the ratios
fixed/naive, fallback/naive (medians) and naive/fp32. ``err`` is each variant's worst relative L2
error against the fp32 variant's outputs on the timed input, on the same provider, and ``nonfin``
its count of inf/NaN outputs. Node counts are of the ONNX graphs as built (before ORT's optimizer):
``compute`` is nodes other than Cast and Constant (the fixed graph holds its constants as
initializers); fixed should have no more compute nodes than naive.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp16guard.compare import compare_outputs  # noqa: E402
from fp16guard.fixing import FixResult, fix_model  # noqa: E402
from fp16guard.fp16_onnx import to_typed_fp16  # noqa: E402
from fp16guard.inputs import NamedInput  # noqa: E402
from fp16guard.torch_onnx import export_onnx  # noqa: E402

#: The issue's requirement: fixed / naive median latency on the GPU.
TARGET_RATIO = 1.02
VARIANTS = ("fp32", "naive", "fixed", "fallback")
PPOCR_SIDE = 736


class Log:
    """Print lines and keep them for ``--out``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


@dataclass
class Variant:
    """One model variant: its graph, what built it, and its timings."""

    name: str
    model: onnx.ModelProto
    note: str = ""
    times: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)


# -- models ------------------------------------------------------------------------------------------

def ppocr_case(side: int, log: Log) -> tuple[str, onnx.ModelProto, NamedInput, list[NamedInput]]:
    """``(label, fp32 model, timed input, calibration inputs)`` for PP-OCRv4 det."""
    from fp16guard.examples import get_example, ppocr

    ex = get_example("ppocr-det")
    model = onnx.load(str(ex.load()))
    x = ppocr.preprocess(ppocr.photos(("page",))["page"], limit_side_len=side)  # short side -> side, long side alike
    h, w = x.shape[2:]
    if h < side or w < side:
        raise SystemExit(f"ppocr: preprocessed page is {h}x{w}, smaller than {side}")
    top, left = (h - side) // 2, (w - side) // 2
    x = np.ascontiguousarray(x[:, :, top:top + side, left:left + side])
    assert x.shape == (1, 3, side, side) and x.dtype == np.float32, x.shape
    label = f"PP-OCRv4 det, skimage.data.page() preprocessed to {h}x{w}, centre-cropped to 1x3x{side}x{side}"
    return label, model, NamedInput(f"skimage.data.page() {side}x{side}", (x,)), ex.calibration()


def make_resnet50():
    try:
        from torchvision.models import resnet50

        return resnet50(), "torchvision"
    except Exception:  # noqa: BLE001 - torchvision missing or not loadable beside this torch
        from _resnet50 import resnet50

        return resnet50(), "benchmarks/_resnet50.py"


def resnet50_case(batch: int, seed: int, n_calib: int) -> tuple[str, onnx.ModelProto, NamedInput, list[NamedInput]]:
    """``(label, fp32 model, timed input, calibration inputs)`` for a random-weight ResNet-50."""
    import torch

    torch.manual_seed(seed)
    net, source = make_resnet50()
    net.eval()
    rng = np.random.default_rng(seed)
    draws = [rng.standard_normal((batch, 3, 224, 224), dtype=np.float32) for _ in range(n_calib + 1)]
    with torch.no_grad():
        model = export_onnx(net, (torch.from_numpy(draws[0]),), what="ResNet-50")
    calib = [NamedInput(f"randn #{i}", (a,)) for i, a in enumerate(draws[:n_calib])]
    timed = NamedInput(f"randn #{n_calib}", (draws[n_calib],))
    label = f"ResNet-50 ({source}, random weights, seed {seed}), input {batch}x3x224x224 standard normal"
    return label, model, timed, calib


# -- variants ----------------------------------------------------------------------------------------

def _finite(result: FixResult) -> str:
    v = result.verification
    return "finite" if v.finite else f"NON-FINITE ({max(r.nonfinite for r in v.rows)} values)"


def build_variants(model: onnx.ModelProto, calib: list[NamedInput], log: Log) -> list[Variant]:
    naive, naive_conv = to_typed_fp16(model)
    t0 = time.perf_counter()
    fixed = fix_model(model, calib, compare_naive=False, force=True, backend="emulate")
    t_fix = time.perf_counter() - t0
    t0 = time.perf_counter()
    fallback = fix_model(model, calib, plan=fixed.plan, fallback="fp32", compare_naive=False, force=True,
                         backend="emulate")
    t_fb = time.perf_counter() - t0
    plan = fixed.plan
    exps = collections.Counter(r.exponent for r in plan.regions)
    log(f"  plan: {len(plan.regions)} scale region(s)"
        + (f" (exponents {', '.join(f'{e:+d} x{n}' for e, n in sorted(exps.items()))})" if exps else "")
        + f", {len(plan.rescale_ops)} rescale op(s), {len(plan.unfixable)} unfixable, "
        f"{len(plan.fallback_fp32)} node(s) the fp32 fallback keeps in FP32")
    log(f"  fix_model: fixed {t_fix:.1f} s (calibration + emulate verification, {_finite(fixed)}); "
        f"fallback {t_fb:.1f} s (plan reused, {_finite(fallback)})")
    return [
        Variant("fp32", model, "original"),
        Variant("naive", naive, f"to_typed_fp16, {len(naive_conv.fp32_nodes)} FP32 node(s)"),
        Variant("fixed", fixed.fixed, f"fix_model, {len(fixed.conversion.fp32_nodes)} FP32 node(s)"),
        Variant("fallback", fallback.fixed, f"fix_model fallback=fp32, {len(fallback.conversion.fp32_nodes)} "
                                            f"FP32 node(s)"),
    ]


def node_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


# -- sessions and timing ------------------------------------------------------------------------------

def providers_for(args) -> list:
    if args.provider == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"--provider cuda: this onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                         f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                         f"(fp16guard[gpu]) or pass --provider cpu")
    options = {"device_id": args.device_id, "cudnn_conv_algo_search": args.conv_algo}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


class Runner:
    """One variant's session, fed the timed input by ``session.run`` or by IOBinding."""

    def __init__(self, model: onnx.ModelProto, providers: list, args, feed: dict[str, np.ndarray]):
        so = ort.SessionOptions()  # graph_optimization_level stays ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=providers)
        if args.provider == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise SystemExit(f"the CUDA EP did not load (session providers: {self.session.get_providers()}); "
                             f"check CUDA / cuDNN libraries for onnxruntime-gpu {ort.__version__}")
        self.feed = {i.name: feed[i.name] for i in self.session.get_inputs()}
        self.binding = None
        if args.io == "binding":
            device = "cuda" if args.provider == "cuda" else "cpu"
            self.binding = self.session.io_binding()
            self._inputs = {k: ort.OrtValue.ortvalue_from_numpy(v, device, args.device_id) for k, v in self.feed.items()}
            for k, v in self._inputs.items():
                self.binding.bind_ortvalue_input(k, v)
            for o in self.session.get_outputs():
                self.binding.bind_output(o.name, device, args.device_id)

    def run(self) -> None:
        if self.binding is None:
            self.session.run(None, self.feed)
        else:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()

    def outputs(self) -> list[np.ndarray]:
        if self.binding is None:
            return self.session.run(None, self.feed)
        self.run()
        return self.binding.copy_outputs_to_cpu()


def time_variants(variants: list[Variant], feed: dict[str, np.ndarray], args) -> None:
    providers = providers_for(args)
    runners = {v.name: Runner(v.model, providers, args, feed) for v in variants}
    for v in variants:
        v.outputs = runners[v.name].outputs()  # also the first (untimed) run: session warm-up
    for r in range(args.warmup + args.iters):
        for v in variants:
            t0 = time.perf_counter()
            runners[v.name].run()
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                v.times.append(dt)


# -- report ------------------------------------------------------------------------------------------

def environment(args) -> list[str]:
    lines = [f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
             f"python {platform.python_version()}, onnxruntime {ort.__version__} ({ort.get_device()}), "
             f"onnx {onnx.__version__}, available providers: {', '.join(ort.get_available_providers())}"]
    if args.provider == "cuda":
        prov = f"CUDAExecutionProvider (device_id {args.device_id}, cudnn_conv_algo_search {args.conv_algo})"
    else:
        prov = "CPUExecutionProvider (FP16 timings NOT representative of a GPU)"
    lines.append(f"provider: {prov}; graph optimizations ORT_ENABLE_ALL (default SessionOptions); io: "
                 + ("IOBinding, input bound once on the device, outputs on the device"
                    if args.io == "binding" else "session.run with numpy arrays: host<->device copies included in "
                                                 "every variant alike (all take and return FP32)"))
    try:
        import torch

        dev = (f"GPU: {torch.cuda.get_device_name(args.device_id)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
               if torch.cuda.is_available() else f"no CUDA device visible to torch {torch.__version__}")
    except Exception as e:  # noqa: BLE001
        dev = f"torch unavailable ({type(e).__name__})"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"{dev}; CPU: {_cpu_name()} x{cpus}")
    lines.append(f"timing: {args.warmup} warm-up round(s) + {args.iters} timed round(s), variants interleaved "
                 f"in each round; ms per run")
    return lines


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def report(variants: list[Variant], args, log: Log) -> bool | None:
    """Print one model's table; return whether fixed/naive meets the target (None on the CPU EP)."""
    by = {v.name: v for v in variants}
    med = {v.name: statistics.median(v.times) * 1e3 for v in variants}
    mean = {v.name: statistics.fmean(v.times) * 1e3 for v in variants}
    counts = {v.name: node_counts(v.model) for v in variants}
    ref = by["fp32"].outputs
    log(f"{'variant':9} {'median ms':>10} {'mean ms':>9} {'min ms':>8} {'x naive':>8} {'x fp32':>7} "
        f"{'nodes':>6} {'Cast':>5} {'Const':>5} {'compute':>7} {'err':>9} {'nonfin':>7}  built by")
    for v in variants:
        c = counts[v.name]
        total = sum(c.values())
        rel, _, nonfinite = compare_outputs(v.outputs, ref)
        log(f"{v.name:9} {med[v.name]:10.3f} {mean[v.name]:9.3f} {min(v.times) * 1e3:8.3f} "
            f"{med[v.name] / med['naive']:8.3f} {med[v.name] / med['fp32']:7.3f} {total:6d} {c['Cast']:5d} "
            f"{c['Constant']:5d} {total - c['Cast'] - c['Constant']:7d} {rel:9.3g} {nonfinite:7d}  {v.note}")
    r_fixed, r_fb, r_naive = med["fixed"] / med["naive"], med["fallback"] / med["naive"], med["naive"] / med["fp32"]
    log(f"ratios (medians): fixed/naive {r_fixed:.3f}, fallback/naive {r_fb:.3f}, naive/fp32 {r_naive:.3f}; "
        f"means: fixed/naive {mean['fixed'] / mean['naive']:.3f}, fallback/naive {mean['fallback'] / mean['naive']:.3f}, "
        f"naive/fp32 {mean['naive'] / mean['fp32']:.3f}")
    compute = {k: sum(c.values()) - c["Cast"] - c["Constant"] for k, c in counts.items()}
    diff = counts["fixed"] - counts["naive"], counts["naive"] - counts["fixed"]
    delta = ", ".join([f"{k} +{n}" for k, n in sorted(diff[0].items())] + [f"{k} -{n}" for k, n in sorted(diff[1].items())])
    ok_nodes = compute["fixed"] <= compute["naive"]
    log(f"nodes: fixed {compute['fixed']} compute vs naive {compute['naive']}: "
        f"{'ok (no more than naive)' if ok_nodes else 'MORE than naive'}; op counts fixed - naive: {delta or 'none'}")
    if by["fixed"].model.graph.SerializeToString() == by["naive"].model.graph.SerializeToString():
        log("  (fixed and naive are the same graph, byte for byte: the plan changes nothing on these inputs, so "
            "fixed/naive here is the measurement's noise)")
    if args.provider != "cuda":
        log(f"target fixed/naive <= {TARGET_RATIO}: not judged on the CPU EP (run with --provider cuda)")
        return None
    met = r_fixed <= TARGET_RATIO
    log(f"target fixed/naive <= {TARGET_RATIO} (GPU): {'met' if met else 'NOT MET'} ({r_fixed:.3f})")
    return met


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocr,resnet50", help="comma-separated: ppocr, resnet50")
    ap.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--iters", type=int, default=100, help="timed rounds (default 100)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
    ap.add_argument("--batch", type=int, default=1, help="ResNet-50 batch (default 1; ppocr is batch 1)")
    ap.add_argument("--calib", type=int, default=3, help="ResNet-50 calibration inputs (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppocr-side", type=int, default=PPOCR_SIDE, help=f"ppocr input side (default {PPOCR_SIDE})")
    ap.add_argument("--io", choices=("binding", "numpy"), default=None,
                    help="binding: IOBinding on the device (default on CUDA); numpy: session.run with numpy "
                         "arrays, host<->device copies included (default on CPU)")
    ap.add_argument("--conv-algo", default="HEURISTIC", choices=("HEURISTIC", "EXHAUSTIVE", "DEFAULT"),
                    help="CUDA EP cudnn_conv_algo_search (default HEURISTIC, as fp16guard's onnxruntime backend)")
    ap.add_argument("--device-id", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the printed report to this file")
    args = ap.parse_args()
    if args.io is None:
        args.io = "binding" if args.provider == "cuda" else "numpy"
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"ppocr", "resnet50"})
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: ppocr, resnet50")
    providers_for(args)  # fail early, before minutes of calibration

    log = Log()
    log("fp16guard fixed-model speed: fp32 / naive FP16 / fixed FP16 / fp32-fallback FP16 on ONNX Runtime")
    for line in environment(args):
        log(line)
    verdicts = {}
    for name in models:
        log()
        log(f"== {name}")
        if name == "ppocr":
            label, model, timed, calib = ppocr_case(args.ppocr_side, log)
        else:
            label, model, timed, calib = resnet50_case(args.batch, args.seed, args.calib)
        log(f"  model: {label}")
        log(f"  calibration: {', '.join(f'{i.label} {list(i.arrays[0].shape)}' for i in calib)}")
        variants = build_variants(model, calib, log)
        feed_names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        feed = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in zip(feed_names, timed.arrays)}
        time_variants(variants, feed, args)
        verdicts[name] = report(variants, args, log)
    if args.provider == "cuda":
        log()
        log(f"target fixed/naive <= {TARGET_RATIO}: " + ", ".join(
            f"{k} {'met' if v else 'NOT MET'}" for k, v in verdicts.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(log.lines) + "\n")
        print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
