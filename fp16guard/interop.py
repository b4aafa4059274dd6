"""What ``fix`` writes for other tools besides the fixed model: TensorRT 10 precision constraints
(:mod:`fp16guard.trt.precisions`), the rewritten FP32 ONNX they apply to, and the verification's
outputs as Polygraphy run results (:mod:`fp16guard.polygraphy_io`)."""

from __future__ import annotations

from fp16guard.errors import UsageError


def check_interop_options(output: str, *, layer_precisions: str | None = None, save_fp32: str | None = None,
                          save_outputs: str | None = None, bf16: bool = False) -> None:
    """Refuse, before any work, what cannot be written for this output.

    Args:
        output: ``"onnx"`` or ``"torch"`` (a ``.pt2`` program).
        bf16: islands (or the fallback's nodes) run in BF16.

    Raises:
        UsageError: ``--layer-precisions`` or ``--save-fp32`` with a ``.pt2`` (TensorRT layers are
            named after ONNX nodes); ``--layer-precisions`` with BF16 islands (the constraints pin
            FP32 layers of a weakly typed build; BF16 islands need the typed ONNX).
        MissingDependencyError: ``--save-outputs`` without polygraphy.
    """
    if output == "torch":
        for flag, given in (("--layer-precisions", layer_precisions), ("--save-fp32", save_fp32)):
            if given:
                raise UsageError(f"{flag} names ONNX nodes, which a .pt2 program has not; write an .onnx (-o OUT.onnx)")
    if bf16 and layer_precisions:
        raise UsageError("--layer-precisions pins FP32 islands for a weakly typed TensorRT 10 build; BF16 islands "
                         "run from the typed ONNX itself (a strongly typed network): drop one of them")
    if save_outputs:
        from fp16guard.deps import import_polygraphy

        import_polygraphy("--save-outputs (Polygraphy run results)")


def write_interop(result, *, source: str, layer_precisions: str | None = None, save_fp32: str | None = None,
                  save_outputs: str | None = None) -> list[str]:
    """Write the files asked for and say what each holds.

    Args:
        result: a :class:`~fp16guard.fixing.pipeline.FixResult` (ONNX output for the first two files;
            ``keep_outputs=True`` for ``save_outputs``).
        source: the model's name, for the precision file's header.
        layer_precisions: path of the precision constraints (text, or JSON for ``.json``).
        save_fp32: path of the rewritten FP32 ONNX.
        save_outputs: path of the Polygraphy ``RunResults`` (runners ``fp16guard-fp32`` and
            ``fp16guard-fixed-fp16``, one iteration per input).

    Returns:
        One line per file written.
    """
    lines = []
    if save_fp32:
        import onnx

        onnx.save(result.rewritten_fp32, save_fp32)
        lines.append(f"rewritten FP32 model: {save_fp32} (for a weakly typed TensorRT 10 build)")
    if layer_precisions:
        from fp16guard.trt.precisions import layer_precisions as make

        lp = make(result.fixed, result.conversion)
        lp.save(layer_precisions, source=source)
        n = len(lp.fp32_layers)
        lines.append(f"TensorRT precision constraints: {layer_precisions} ({n} FP32 layer(s))" if n else
                     f"TensorRT precision constraints: {layer_precisions} (no FP32 island: nothing to constrain)")
    if save_outputs:
        from fp16guard.polygraphy_io import RUNNER_FIXED, RUNNER_FP32, save_run_results

        kept = result.outputs
        save_run_results(save_outputs, {RUNNER_FP32: kept.fp32, RUNNER_FIXED: kept.fixed}, kept.names)
        lines.append(f"Polygraphy run results: {save_outputs} (runners {RUNNER_FP32}, {RUNNER_FIXED}; "
                     f"{len(kept.labels)} iteration(s): {', '.join(kept.labels)})")
    return lines

