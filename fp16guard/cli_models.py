"""A model and its inputs as a command line names them: ``MODEL``/``--example``, ``--input``,
``--validate``, and OpenMMLab's ``--deploy-cfg``/``--model-cfg``/``--img``; checked against the model
before any long run (:func:`fit_inputs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fp16guard.cli_stream import stream_inputs, wants_stream
from fp16guard.errors import UsageError
from fp16guard.loading import Framework

if TYPE_CHECKING:
    from rich.console import Console


def model_words(args) -> str | None:
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


def model_and_inputs(args, console: Console, *, require_inputs: bool = True):
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
    name = Path(args.model).name if framework is Framework.ONNX else args.model
    if wants_stream(args):  # read one file at a time, checked as it is read
        return model, stream_inputs(args, model, framework), framework, name
    inputs = load_inputs(args.input)
    if not inputs and require_inputs:
        raise UsageError(f"{args.model} needs at least one --input")
    return model, fit_inputs(model, inputs, framework), framework, name


def fit_inputs(model, inputs, framework: str, what: str = "input"):
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


def calibration_sets(args, console: Console):
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
    model, calibration, framework, name = model_and_inputs(args, console,
                                                            require_inputs=not getattr(args, "plan", None))
    # a PyTorch model takes images and waveforms as inspect and bisect give them; an ONNX model arrays
    validation = fit_inputs(model, load_inputs(getattr(args, "validate", [])), framework, what="validation input")
    return model, calibration, validation, framework, name, {}


def openmmlab_sets(args, console: Console):
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
