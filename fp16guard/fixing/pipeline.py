"""``fp16guard.fixing.pipeline``: one pipeline, calibrate -> plan -> apply -> convert -> verify, for any model.

Every step runs through a :class:`~fp16guard.fixing.targets.FixTarget`, so an ONNX graph
(:class:`~fp16guard.fixing.targets.OnnxFixTarget`) and a PyTorch module
(:class:`~fp16guard.fixing.targets.TorchFixTarget`) share all of them. This module runs them on one
target (:func:`fix_target`) and holds the public entry points; each step is a module of its own:

1. **Calibrate** (:func:`calibrate_target`, :mod:`fp16guard.fixing.calibration`): activation amax
   of the prepared graph (BatchNorms and bias constants folded in float64) over the calibration
   inputs, the scale solver (:func:`fp16guard.fixing.solver.solve`), the constants FP16 would flush
   entirely, and the nodes the FP32 fallback would keep (measured on the unfolded graph): a
   :class:`~fp16guard.plan.RewritePlan`.
2. **Apply** (:func:`apply_plan`, :mod:`fp16guard.fixing.apply`): the plan's exponents folded into
   the constants, its consented constant raises, then the typed FP16 conversion with only the
   plan's unfixable nodes in FP32 (``islands="bf16"``: in BF16, FP32's range at 8 significant
   bits). ``fallback="fp32"`` (or ``"bf16"``) instead converts the unrewritten graph with the
   offending nodes in FP32 (BF16), what other tools do, for comparison.
3. **Verify** (:func:`verify`, :mod:`fp16guard.fixing.apply`), always: the FP16 model on an FP16
   backend against the FP32 original on the calibration inputs and on validation inputs not used
   for calibration. A fixed model that still produces inf/NaN is refused
   (:class:`~fp16guard.errors.StillOverflowsError`) unless ``force``.
4. **Deliver** (:mod:`fp16guard.fixing.delivery`): the fixed model when it meets the bar, else the
   fewest islands that do, else the fallback; the comparison rows beside it. The result is a
   :class:`FixResult` (:mod:`fp16guard.fixing.result`).

The public entry points (:func:`fix`, :func:`fix_model`, :func:`calibrate`) pick the target from
the model: an ``.onnx`` path or ``ModelProto`` is an ONNX target; a ``torch.nn.Module`` a PyTorch
target, or (``output="onnx"``) its ONNX export as an ONNX target whose plans carry the module's
state_dict hash. A module is always measured in eval mode, as deployed, on a deep copy
(:func:`fp16guard.torch_graph.inference_copy`): one in train or mixed mode gets the eval-mode plan
and fix, and the caller's module is never changed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from fp16guard.backends import Backend
from fp16guard.compare import DEFAULT_TOLERANCE, Metric
from fp16guard.errors import ExportError, FixError, PlanError, RewriteError, StillOverflowsError, first_line
from fp16guard.fixing.apply import Applied, apply_plan, verify
from fp16guard.fixing.calibration import calibrate_target, fallback_nodes
from fp16guard.fixing.delivery import comparisons, deliver, variant_label
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.result import FixResult, KeptOutputs
from fp16guard.fixing.targets import FixTarget, OnnxFixTarget, TorchFixTarget
from fp16guard.inputs import NamedInput, as_inputs, check_inputs, torch_args
from fp16guard.loading import Framework, open_model, refuse_fp16_module
from fp16guard.plan import DEFAULT_TARGET_LOG2, RewritePlan
from fp16guard.progress import step
from fp16guard.torch_graph import dynamic_dims, inference_copy, state_dict_sha256
from fp16guard.torch_onnx import ONNX_ROUTES, export_onnx_routes

logger = logging.getLogger("fp16guard")

#: A task metric: ``metric(outputs, reference) -> score`` on lists of numpy arrays in the model's
#: output order (higher is better, e.g. mask IoU).
TaskMetric = Metric

__all__ = ["Applied", "FixResult", "TaskMetric", "apply_plan", "calibrate", "calibrate_target", "fallback_nodes", "fix",
           "fix_model", "fix_target", "make_target", "verify"]


def fix_target(target: FixTarget, calibration: Sequence[NamedInput] = (), *, plan: RewritePlan | None = None,
               validation: Sequence[NamedInput] = (), target_log2: int = DEFAULT_TARGET_LOG2,
               raise_underflow: bool = False, fallback: str | None = None, islands: str = "fp32",
               backend: str | Backend = "emulate",
               metrics: Mapping[str, Metric] | None = None, compare_naive: bool = True,
               compare_fallback: bool = True, tolerance: float = DEFAULT_TOLERANCE,
               force: bool = False, keep_outputs: bool = False) -> FixResult:
    """Calibrate (unless ``plan`` is given), apply, convert and verify one target.

    Args:
        target: the model.
        calibration: calibration inputs (needed unless ``plan`` is given; also verified).
        plan: a plan to apply instead of calibrating.
        validation: inputs not used for calibration, verified too.
        target_log2, raise_underflow: see :func:`calibrate_target`.
        fallback, islands: see :func:`apply_plan`.
        backend: FP16 backend for verification (default ``emulate``: strict FP16 emulation on CPU).
        metrics: task metrics reported per input (higher is better).
        compare_naive: also verify the plain FP16 conversion, for comparison.
        compare_fallback: also verify the fallback in the other precision than the islands' and the
            fixed model with its islands in the other precision; the fallback in the islands' precision,
            the bar's reference, is verified either way (:func:`~fp16guard.fixing.delivery.comparisons`).
        tolerance: the largest relative L2 error against FP32 accepted on any input (default
            :data:`~fp16guard.compare.DEFAULT_TOLERANCE`; not applied when the plan raises flushed
            constants, which changes the model's math by consent).
        force: skip the plan's model-hash check, and return the fixed model even if it is refused.
        keep_outputs: keep the FP32 and fixed outputs in ``FixResult.outputs`` (``fix --save-outputs``).

    Raises:
        FixError: nothing to verify on. StillOverflowsError: the fixed model still produces inf/NaN;
            InaccurateFixError: it is finite but an input's error exceeds ``tolerance`` or is
            clearly worse than the naive conversion's or the fallback's with islands in the same
            precision (:func:`~fp16guard.compare.misses_bar`); both unless ``force``.
        PlanError, RewriteError, BackendError: see :func:`apply_plan` and :func:`verify`.
    """
    if plan is None:
        plan = calibrate_target(target, calibration, target_log2=target_log2, raise_underflow=raise_underflow)
    inputs = [*calibration, *validation]
    if not inputs:
        raise FixError("verification needs inputs: give calibration or validation inputs")
    splits = ["calibration"] * len(calibration) + ["validation"] * len(validation)
    rewrite_failed = None
    with step("rewrite: fold BatchNorms and scale regions, convert to typed FP16"):
        try:
            applied = apply_plan(target, plan, fallback=fallback, islands=islands, check_hash=not force)
        except RewriteError as e:  # a rewrite that cannot be applied: the fallback is still a model to deliver
            if fallback is not None or force:
                raise
            rewrite_failed = f"the rewrite cannot be applied ({first_line(e)})"
            logger.warning("%s; writing the %s fallback instead", rewrite_failed, islands.upper())
            fallback = islands
            applied = apply_plan(target, plan, fallback=fallback, check_hash=False)
    kept: list[list[np.ndarray]] | None = [] if keep_outputs else None
    verification, refs = verify(target, applied.fixed, inputs, splits, backend=backend,
                                variant=variant_label(fallback, islands), metrics=metrics, outputs_into=kept)
    others = comparisons(target, plan, inputs, splits, refs, fallback=fallback, islands=islands, backend=backend,
                          metrics=metrics, compare_naive=compare_naive, compare_fallback=compare_fallback)
    outputs = None
    if kept is not None:
        names = target.graph_io()[1]
        width = len(refs[0]) if refs else 0
        outputs = KeptOutputs([i.label for i in inputs],
                              names if len(names) == width else [f"output_{k}" for k in range(width)], refs, kept)
    result = FixResult(applied.fixed, applied.rewritten, plan, applied.notes, applied.conversion, verification,
                       others["naive"], others["fallback"], outputs=outputs, fallback_bf16=others["fallback_bf16"],
                       other_islands=others["other_islands"], islands=fallback or islands, tolerance=tolerance,
                       delivered="fallback" if rewrite_failed else "fixed", refusal=rewrite_failed, target=target)
    if force:
        return result
    if fallback is None:
        result = deliver(result, target, plan, applied, inputs, splits, refs, backend=backend, metrics=metrics,
                         same=others["fallback" if islands == "fp32" else "fallback_bf16"], naive=others["naive"])
    if not result.verification.finite:
        worst = max(result.verification.rows, key=lambda r: r.nonfinite)
        raise StillOverflowsError(
            f"the {result.verification.variant} model still produces {worst.nonfinite} inf/NaN output value(s) on "
            f"{worst.label} in FP16, and so does the FP32 fallback; see the plan's unfixable entries, or --force to "
            f"write the fixed model anyway")
    return result


# ---------------------------------------------------------------- the public entry points


def make_target(model, inputs: Sequence[NamedInput], *, graph: str | None = None, source: str | None = None) -> FixTarget:
    """The :class:`FixTarget` of a model.

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto``, ``torch.nn.Module`` or ``.pt2`` path
            (:func:`~fp16guard.loading.open_model`; never modified: a module is captured, or
            exported, from an eval-mode deep copy, whatever mode it is in).
        inputs: every input the command runs (a module is captured, or exported, once for them).
        graph: for a module, ``"torch"`` (default: its ``torch.export`` graph) or ``"onnx"`` (its ONNX
            export, input dimensions that differ between ``inputs`` dynamic; plans still carry the
            module's state_dict hash). An ONNX model is always ``"onnx"``.
        source: display name.

    Raises:
        ValueError: ``graph="torch"`` for an ONNX model, or an unknown ``graph``.
        FixError: a module without inputs; ExportError: it cannot be captured or exported (every
            ONNX export route failed: :func:`~fp16guard.torch_onnx.export_onnx_routes`); when
            ``torch.export`` fails and an ONNX export works, the message says to write an ``.onnx``.
        ModelLoadError: an unreadable ONNX file, or a model already converted to FP16 (a ``.half()``
            module, an FP16 ONNX model).

    The ONNX export of a module tries the dynamo exporter, the TorchScript exporter, then the
    dynamo exporter on a ``torch.export`` program, and takes the first that ONNX Runtime loads
    (bfloat16 computation widened to float32 where it has no bfloat16 kernel) and, for a trace
    that fixed a Python value computed from tensors, that gives the module's outputs on ``inputs``;
    a route other than the first is an ``onnx_export`` note of the fix.
    """
    model, framework, name = open_model(model)
    return _make_target(model, framework, inputs, graph=graph, source=source or name, hint=True)


def _onnx_hint(model, examples) -> str:
    """For a module ``torch.export`` cannot capture: ``; its ONNX export works ...: write an
    .onnx`` when one of the ONNX routes exports it (tried here), else ``""``."""
    try:
        export = export_onnx_routes(inference_copy(model), examples[0], dynamic_shapes=dynamic_dims(examples),
                                    what=type(model).__name__, checks=examples[:8])
    except ExportError:
        return ""
    traced = (f", whose trace fixes {len(export.traced)} Python value(s) computed from tensors to the example "
              f"input's ({export.traced[0][:120]})" if export.traced else "")
    return (f"; its ONNX export works with {ONNX_ROUTES[export.route]}{traced}: write an .onnx (-o MODEL.onnx, "
            f"output='onnx')")


def _make_target(model, framework: Framework, inputs: Sequence[NamedInput], *, graph: str | None,
                 source: str | None, hint: bool) -> FixTarget:
    """:func:`make_target` of an opened model (:func:`~fp16guard.loading.open_model`); ``hint``:
    check whether an ONNX export works when ``torch.export`` fails, and say so in the error."""
    is_torch = framework is Framework.TORCH
    if graph not in (None, "torch", "onnx") or (graph == "torch" and not is_torch):
        raise ValueError(f"graph must be 'torch' (PyTorch modules only) or 'onnx', got {graph!r}")
    if not is_torch:
        return OnnxFixTarget(model, source=source)
    refuse_fp16_module(model, "calibrate and fix")
    if not inputs:
        raise FixError("a PyTorch model needs inputs to be captured")
    examples = [torch_args(i) for i in inputs]
    if graph != "onnx":
        try:
            return TorchFixTarget(model, inputs, source=source)
        except ExportError as e:
            if not hint:
                raise
            raise ExportError(f"{e}{_onnx_hint(model, examples)}") from None
    export = export_onnx_routes(inference_copy(model), examples[0], dynamic_shapes=dynamic_dims(examples),
                                what=type(model).__name__, checks=examples[:8])
    target = OnnxFixTarget(export.model, source=source or type(model).__name__, model_sha256=state_dict_sha256(model))
    target.export_note = (RewriteNote("onnx_export", "graph", export.describe())  # fix_model puts it first
                          if export.fell_back or export.traced else None)
    return target


def _capture(model, framework: Framework, calibration: Sequence[NamedInput], validation: Sequence[NamedInput], *,
             graph: str | None, source: str | None, submodule: str | None):
    """``(target, split)`` of an opened model (:func:`~fp16guard.loading.open_model`, which gave
    ``framework``): the target of the whole model (``split`` None), or of one submodule
    (``split`` a :class:`~fp16guard.fixing.submodule.SubmoduleFix`): the one named, or, when a
    PyTorch module cannot be captured (or exported) whole, the largest that can
    (:func:`fp16guard.fixing.submodule.choose`).

    Raises:
        UsageError: ``submodule`` for an ONNX model, or a name the module does not have.
        ExportError: neither the model nor any submodule can be captured (when ``torch.export``
            fails, the message says whether an ONNX export works).
    """
    from fp16guard.errors import UsageError
    from fp16guard.fixing import submodule as parts

    items = [*calibration, *validation]
    if framework is Framework.ONNX:
        if submodule is not None:
            raise UsageError(f"submodule {submodule!r}: only a PyTorch module is fixed by parts; an ONNX model is "
                             f"fixed whole")
        with step("capture: the model's graph"):
            return _make_target(model, framework, items, graph=graph, source=source, hint=False), None
    refuse_fp16_module(model, "calibrate and fix")
    if not items:
        raise FixError("a PyTorch model needs inputs to be captured")
    name = source or type(model).__name__
    splits = ["calibration"] * len(calibration) + ["validation"] * len(validation)

    def make(module, inputs, src):
        """The target of one submodule."""
        return _make_target(module, Framework.TORCH, inputs, graph=graph, source=src, hint=False)
    if submodule is not None:
        with step(f"capture: submodule {submodule}, on the inputs it gets in the whole FP32 model"):
            split = parts.given(model, items, splits, submodule, make=make, source=f"{name}.{submodule}")
        return split.target, split
    with step("capture: the model's graph"):
        try:
            return _make_target(model, framework, items, graph=graph, source=source, hint=False), None
        except ExportError as e:
            whole = e
    with step("capture: the largest submodule that can be captured"):
        split = parts.choose(model, items, splits, make=make, source=name, whole=whole)
    if split is None:
        hint = _onnx_hint(model, [torch_args(i) for i in items]) if graph != "onnx" else ""
        raise ExportError(f"{whole}{hint}") from None
    return split.target, split


def calibrate(model, calib_inputs, *, target_log2: int = DEFAULT_TARGET_LOG2, raise_underflow: bool = False,
              source: str | None = None, graph: str | None = None, submodule: str | None = None,
              early_stop: int | None = None) -> RewritePlan:
    """Calibrate a rewrite plan for an ONNX model or a PyTorch module.

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto``, ``torch.nn.Module`` or ``.pt2`` path
            (:func:`~fp16guard.loading.open_model`). A module is calibrated in eval mode, as
            deployed, on a deep copy (:func:`~fp16guard.torch_graph.inference_copy`): a module in
            train or mixed mode gets the eval-mode plan, and the caller's module
            (state_dict, BatchNorm statistics, training flags, hooks) is never changed.
        calib_inputs: :class:`~fp16guard.inputs.NamedInput` items, arrays, or tuples of arrays; or a
            data set streamed in bounded memory (:func:`fp16guard.datasets.streamed`: paths, folders,
            patterns, ``.npz`` shards, a generator, a DataLoader; under ``torch.distributed`` each
            rank reads its shard and the ranges are merged: :mod:`fp16guard.fixing.streaming`).
        target_log2, raise_underflow: see :func:`calibrate_target`.
        source: the model's name in the plan.
        graph: for a PyTorch module, which graph the plan names: ``"torch"`` (default) or ``"onnx"``
            (see :func:`make_target`). Either way ``model_sha256`` hashes the module's state_dict.
        submodule: for a PyTorch module, calibrate only this submodule (dotted name, e.g.
            ``"backbone"``), on the inputs it receives when the whole model runs in FP32 on
            ``calib_inputs`` (see :func:`fix_model`); the plan is the submodule's. Without it, a
            module that cannot be captured whole gets the plan of its largest submodule that can
            (a warning names it).
        early_stop: stream, and stop once no value's power of two moved for this many inputs.

    Raises:
        FixError, ExportError, ModelLoadError; InputError for an input with inf/NaN, no elements,
            or a shape the model does not take; ValueError for an unknown ``graph``
        or ``graph="torch"`` with an ONNX model, or a ``submodule`` the model does not have (UsageError).
    """
    from fp16guard.datasets import streamed

    if early_stop is not None or streamed(calib_inputs):
        from fp16guard.fixing.streaming import calibrate_stream

        return calibrate_stream(lambda head: make_target(model, head, graph=graph, source=source), calib_inputs,
                                target_log2=target_log2, raise_underflow=raise_underflow, submodule=submodule,
                                early_stop=early_stop)
    inputs = as_inputs(calib_inputs, what="calibration input")
    check_inputs(inputs, what="calibration input")
    model, framework, name = open_model(model)
    if graph not in (None, "torch", "onnx") or (graph == "torch" and framework is not Framework.TORCH):
        raise ValueError(f"graph must be 'torch' (PyTorch modules only) or 'onnx', got {graph!r}")
    target, split = _capture(model, framework, inputs, [], graph=graph, source=source or name, submodule=submodule)
    if split is None:
        target.check_feeds(inputs, "calibration input")  # before any long run
    else:
        inputs = split.calibration
        if split.auto:
            logger.warning("%s", "; ".join(split.lines("calibrated")))
    return calibrate_target(target, inputs, target_log2=target_log2, raise_underflow=raise_underflow)


def fix_model(model, calib_inputs=(), *, plan: RewritePlan | None = None, validation=(), output: str | None = None,
              source: str | None = None, submodule: str | None = None, **options) -> FixResult:
    """Fix an ONNX model or a PyTorch module (:func:`fix_target`, whose keyword arguments
    ``options`` are).

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto``, ``torch.nn.Module`` or ``.pt2`` path
            (:func:`~fp16guard.loading.open_model`: the run's one ONNX-or-PyTorch decision). A
            module is calibrated, rewritten and verified in eval mode, as deployed, on a deep copy
            (:func:`~fp16guard.torch_graph.inference_copy`): a module in train or mixed mode gets the
            eval-mode result, and the caller's module (state_dict, BatchNorm statistics, training
            flags, hooks) is never changed.
        calib_inputs, validation: arrays, tuples of arrays or ``NamedInput`` items.
        plan: apply this plan instead of calibrating; its ``framework`` picks the graph.
        output: for a PyTorch module, ``"torch"`` (an FP16 program; default) or ``"onnx"`` (a
            typed FP16 ONNX model).
        source: the model's name in the plan.
        submodule: for a PyTorch module, fix only this submodule (dotted name, e.g. ``"backbone"``):
            it is captured with the inputs it receives when the whole model runs in FP32 on the
            calibration (and validation) inputs, and fixed as its own model (``result.fixed`` is
            its program, taking and returning what it does); ``result.model`` is a copy of the whole
            model with the submodule replaced by the fixed program, verified end to end against
            FP32 (``result.submodule``: what stays FP32, the errors per input). Without it, a module
            that cannot be captured whole (data-dependent post-processing) gets its largest
            submodule that can be captured fixed this way (children by parameters, then their
            children), and the result says which.

    Raises:
        PlanError: ``plan`` was calibrated on another model, or names another graph than ``output``.
        UsageError: a ``submodule`` the model does not have (the message names its children).
        FixError, StillOverflowsError, ExportError, ModelLoadError, InputError, RewriteError: see
            :func:`fix_target`.
    """
    calibration = as_inputs(calib_inputs, what="calibration input")
    validation = as_inputs(validation, what="validation input")
    model, framework, name = open_model(model)  # the one ONNX-or-PyTorch decision of the run
    graph = output or (plan.framework if plan is not None else framework.value)
    if graph not in ("torch", "onnx") or (graph == "torch" and framework is not Framework.TORCH):
        raise ValueError(f"output must be 'torch' (PyTorch modules only) or 'onnx', got {graph!r}")
    if plan is not None and plan.framework != graph:
        raise PlanError(f"the plan names the values of a {plan.framework} graph, but the output asked for is "
                        f"{graph}; calibrate again for {graph}")
    check_inputs(calibration, what="calibration input")
    check_inputs(validation, what="validation input")
    target, split = _capture(model, framework, calibration, validation, graph=graph, source=source or name,
                             submodule=submodule)
    del model  # the target holds what it needs (an ONNX target: its base graph, not a loaded copy)
    if split is None:
        target.check_feeds(calibration, "calibration input")  # before any long run
        target.check_feeds(validation, "validation input")
        result = fix_target(target, calibration, plan=plan, validation=validation, **options)
    else:
        from fp16guard.fixing.submodule import finish

        result = fix_target(target, split.calibration, plan=plan, validation=split.validation, **options)
        with step(f"verify: the whole model with the fixed {split.name}, end to end against FP32"):
            result = finish(split, result, options.get("backend", "emulate"))
    note = getattr(target, "export_note", None)
    if note is not None and note not in result.notes:
        result = replace(result, notes=(note, *result.notes))
    return result


def fix(model, calib_inputs, **options):
    """Rewrite a model so it runs entirely in FP16, exact in real arithmetic; verify it.

    ``result = fp16guard.fix(model, calib_inputs)``: calibrates a plan on ``calib_inputs``,
    folds BatchNorms, folds power-of-two scale regions into the weights, converts to typed FP16
    (FP32 graph inputs and outputs), and verifies it against the FP32 model on the ``emulate``
    backend. ``options`` are :func:`fix_model`'s and :func:`fix_target`'s (``validation``,
    ``target_log2``, ``backend``, ``fallback``, ``metrics``, ``force``, ``output``, ...).

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto`` or ``torch.nn.Module`` (never modified; a module
            is fixed in eval mode, on a deep copy, whatever mode it is in: see :func:`fix_model`).
        calib_inputs: calibration inputs (arrays, tuples of arrays, or ``NamedInput``).

    Returns:
        A :class:`FixResult` that unpacks as ``fixed, plan = fp16guard.fix(...)``: ``fixed`` for
        an ONNX model the typed FP16 ``onnx.ModelProto``, for a PyTorch module the FP16 program, a
        ``torch.fx.GraphModule`` that takes and returns FP32 tensors (``output="onnx"`` gives a
        ``ModelProto`` instead); ``plan`` the :class:`~fp16guard.plan.RewritePlan` applied. The
        verification is ``result.verification`` (beside ``naive`` and ``fallback``), and
        ``print(result)`` summarizes it.

    Raises:
        StillOverflowsError: the fixed model still produces inf/NaN in FP16 (pass ``force=True`` to get it).
    """
    return fix_model(model, calib_inputs, **options)
