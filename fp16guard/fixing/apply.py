"""Steps 2 and 3 of the fix: a plan applied to a target and converted to typed FP16
(:func:`apply_plan`), and an FP16 model verified against the FP32 original (:func:`verify`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fp16guard.backends import Backend
from fp16guard.compare import Metric, Verification, VerifyRow
from fp16guard.errors import PlanError
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.solver import DERIVED_ROLES, ScaleOp, Unfixable, complete
from fp16guard.fixing.targets import FixTarget, check_plan
from fp16guard.fp16_onnx import Fp16Conversion
from fp16guard.inputs import NamedInput
from fp16guard.plan import RewritePlan
from fp16guard.progress import step


@dataclass
class Applied:
    """A plan applied to a target.

    Attributes:
        fixed: the typed FP16 model (an ``onnx.ModelProto`` with FP32 graph inputs and outputs, or
            a ``torch.fx.GraphModule`` that takes and returns FP32 tensors).
        rewritten: the rewritten FP32 graph before conversion (equal to the original in real
            arithmetic; the unrewritten graph for the FP32 fallback).
        notes: what changed; ``conversion``: nodes left in FP32 and casts inserted.
    """

    fixed: object
    rewritten: object
    notes: list[RewriteNote]
    conversion: Fp16Conversion


def plan_shifts(ops: Sequence[ScaleOp], plan: RewritePlan) -> dict[str, int]:
    """The input shift of every product and power as the plan's rescale ops give it (``{op: s}``,
    0 where the plan rescales nothing before it): the solver chose it with calibration ranges the
    plan does not keep (``sqrt`` of a value beyond FP16 reads it scaled and is rescaled after)."""
    given = {(r["tensor"], r["consumer"]): r["exponent"] for r in plan.rescale_ops if r["consumer"]}
    return {op.name: -given.get((op.inputs[0], op.name), 0) for op in ops
            if op.role in DERIVED_ROLES and op.inputs and op.outputs}


def apply_plan(target: FixTarget, plan: RewritePlan, *, fallback: str | None = None, islands: str = "fp32",
               check_hash: bool = True) -> Applied:
    """Apply a plan to a target and convert it to typed FP16.

    Args:
        target: the model the plan was calibrated on.
        plan: from :func:`~fp16guard.fixing.calibration.calibrate_target` (or a file, edited or not).
        fallback: ``None`` (scale rewrites, pure FP16 except the plan's unfixable nodes), ``"fp32"``
            (no rewrite: the unrewritten graph with the plan's ``fallback_fp32`` nodes in FP32, as
            Polygraphy / AutoCast / onnxconverter-common would) or ``"bf16"`` (the same nodes in BF16).
        islands: precision of the plan's unfixable nodes in the fixed model, ``"fp32"`` (default)
            or ``"bf16"`` (an op with no BF16 form stays FP32: ``conversion.bf16_refused``).
        check_hash: refuse a plan calibrated on another model.

    Raises:
        PlanError: the plan is for another model or framework, names a value the model does not
            have, or breaks a tie (two values of one scale-equivariant op with different exponents).
        RewriteError: a rescaled constant does not fit FP16.
        ValueError: an unknown ``fallback`` or ``islands``.
    """
    check_plan(target, plan, check_hash=check_hash)
    if fallback not in (None, "fp32", "bf16") or islands not in ("fp32", "bf16"):
        raise ValueError(f"fallback must be None, 'fp32' or 'bf16' and islands 'fp32' or 'bf16', "
                         f"got {fallback!r} and {islands!r}")
    if fallback is not None:
        nodes = [entry["node"] for entry in plan.fallback_fp32]
        fixed, conversion = target.convert(target.base, nodes, islands=fallback)
        note = RewriteNote(f"fallback_{fallback}", ", ".join(nodes[:5]) + (" ..." if len(nodes) > 5 else ""),
                           f"{len(nodes)} node(s) kept in {fallback.upper()} with casts around them"
                           + (f" ({len(conversion.bf16_refused)} without a BF16 form stay FP32)"
                              if conversion.bf16_refused else ""))
        return Applied(fixed, target.base, [note], conversion)
    ops = target.scale_ops()
    known = {t for op in ops for t in (*op.inputs, *op.outputs)}
    missing = sorted(set(plan.exponents) - known)
    if missing:
        raise PlanError(f"the plan scales {missing[0]!r} (and {len(missing) - 1} more), which the model does not have")
    try:
        sol = complete(ops, plan.exponents, graph_outputs=target.graph_io()[1], shifts=plan_shifts(ops, plan))
    except ValueError as e:
        raise PlanError(str(e)) from None
    sol.unfixable = [Unfixable(u["tensor"], tuple(u["nodes"]), u["amax"], u["reason"]) for u in plan.unfixable]
    raises = [(u.tensor, u.raise_to) for u in plan.underflow if u.consent]
    rewritten, notes = target.rewrite(sol, raises)
    fixed, conversion = target.convert(rewritten, plan.unfixable_nodes, islands=islands)
    return Applied(fixed, rewritten, list(target.prepared_notes) + notes, conversion)


# ---------------------------------------------------------------- 3. verify


def verify(target: FixTarget, fixed, inputs: Sequence[NamedInput], splits: Sequence[str], *,
           backend: str | Backend = "emulate", variant: str = "fixed", metrics: Mapping[str, Metric] | None = None,
           references: list[list[np.ndarray]] | None = None,
           outputs_into: list[list[np.ndarray]] | None = None) -> tuple[Verification, list[list[np.ndarray]]]:
    """Run an FP16 model on an FP16 backend and compare it with the FP32 original on every input.

    Args:
        target: the original model.
        fixed: an FP16 model of it (:func:`apply_plan`).
        inputs: preprocessed inputs; ``splits`` says for each whether it is a ``calibration`` or a
            ``validation`` input.
        backend: FP16 backend name or instance (``emulate`` on CPU; ``onnxruntime``,
            ``tensorrt`` (ONNX) or ``torch`` (PyTorch) on a GPU).
        variant: the row label (``fixed``, ``fixed_bf16``, ``naive``, ``fallback``, ``fallback_bf16``).
        metrics: task metrics (higher is better) by name.
        references: FP32 outputs already computed (as returned by an earlier call).
        outputs_into: a list that receives the FP16 model's outputs on each input (None: not kept).

    Returns:
        ``(verification, references)``.

    Raises:
        BackendError: the backend cannot run here, or cannot run this kind of model.
    """
    if references is None:
        with step(f"verify: FP32 reference outputs on {len(inputs)} input(s)"):
            references = target.references(inputs)
    with step(f"verify: the {variant} model, building on {getattr(backend, 'name', backend)}"):
        what, run = target.runner(fixed, backend)
    out = Verification(variant, what)
    with step(f"verify: the {variant} model on {what}", total=len(inputs)) as advance:
        for item, split, ref in zip(inputs, splits, references):
            try:
                outputs = run(item)
            except RuntimeError:
                if variant.startswith("fixed"):
                    raise
                # the naive model's finfo.min in a CUDA kernel: "cannot be converted to Half without
                # overflow"; every output counts as non-finite
                outputs = [np.full(np.shape(r), np.nan, np.float32) for r in ref]
            out.rows.append(VerifyRow.measure(item.label, split, outputs, ref, metrics))
            if outputs_into is not None:
                outputs_into.append(list(outputs))
            advance()
    return out, references

