"""``fp16guard.fixing.pipeline``: one pipeline, calibrate -> plan -> apply -> convert -> verify, for any model.

Every step runs through a :class:`~fp16guard.fixing.targets.FixTarget`, so an ONNX graph
(:class:`~fp16guard.fixing.targets.OnnxFixTarget`) and a PyTorch module
(:class:`~fp16guard.fixing.targets.TorchFixTarget`) share all of them:

1. **Calibrate** (:func:`calibrate_target`): activation amax of the prepared graph (BatchNorms and
   bias constants folded in float64) over the calibration inputs, the scale solver
   (:func:`fp16guard.fixing.solver.solve`), the constants FP16 would flush entirely, and the nodes
   the FP32 fallback would keep (measured on the unfolded graph): a
   :class:`~fp16guard.plan.RewritePlan`.
2. **Apply** (:func:`apply_plan`): the plan's exponents folded into the constants, its consented
   constant raises, then the typed FP16 conversion with only the plan's unfixable nodes in FP32
   (``islands="bf16"``: in BF16, FP32's range at 8 significant bits). ``fallback="fp32"`` (or
   ``"bf16"``) instead converts the unrewritten graph with the offending nodes in FP32 (BF16), what
   other tools do, for comparison.
3. **Verify** (:func:`verify`), always: the FP16 model on an FP16 backend against the FP32
   original on the calibration inputs and on validation inputs not used for calibration. A fixed
   model that still produces inf/NaN is refused (:class:`~fp16guard.errors.StillOverflowsError`)
   unless ``force``.

The public entry points (:func:`fix`, :func:`fix_model`, :func:`calibrate`) pick the target from
the model: an ``.onnx`` path or ``ModelProto`` is an ONNX target; a ``torch.nn.Module`` a PyTorch
target, or (``output="onnx"``) its ONNX export as an ONNX target whose plans carry the module's
state_dict hash. A module is always measured in eval mode, as deployed, on a deep copy
(:func:`fp16guard.torch_graph.inference_copy`): one in train or mixed mode gets the eval-mode plan
and fix, and the caller's module is never changed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch

from fp16guard.backends import Backend
from fp16guard.compare import DEFAULT_TOLERANCE, Metric, Verification, VerifyRow
from fp16guard.errors import ExportError, FixError, PlanError, RewriteError, StillOverflowsError, first_line
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fixing.solver import DERIVED_ROLES, ScaleOp, ScaleSolution, Unfixable, complete, solve
from fp16guard.fixing.targets import FixTarget, NodeIO, OnnxFixTarget, TorchFixTarget, check_plan
from fp16guard.fp16 import FP16_MAX, FP16_MIN_NORMAL
from fp16guard.fp16_onnx import Fp16Conversion
from fp16guard.inputs import NamedInput, as_inputs, check_inputs, torch_args
from fp16guard.loading import Framework, open_model, refuse_fp16_module
from fp16guard.jsonio import strict
from fp16guard.plan import DEFAULT_TARGET_LOG2, PlanRegion, PlanUnderflow, RewritePlan
from fp16guard.progress import step
from fp16guard.torch_graph import ONNX_ROUTES, dynamic_dims, export_onnx_routes, inference_copy, state_dict_sha256

logger = logging.getLogger("fp16guard")

#: A task metric: ``metric(outputs, reference) -> score`` on lists of numpy arrays in the model's
#: output order (higher is better, e.g. mask IoU).
TaskMetric = Metric

FIX_SCHEMA = "fp16guard.fix/1"

__all__ = ["Applied", "FixResult", "TaskMetric", "apply_plan", "calibrate", "calibrate_target", "fallback_nodes", "fix",
           "fix_model", "fix_target", "make_target", "verify"]


# ---------------------------------------------------------------- 1. calibrate


def fallback_nodes(nodes: Sequence[NodeIO], amax: Mapping[str, float], overflowing_constants: set[str],
                   target_log2: int) -> list[dict]:
    """Nodes the FP32 fallback keeps in FP32: readers of constants that overflow FP16, writers of
    values above ``2**target_log2`` and readers of values above 65504.

    Args:
        nodes: ``(node, inputs, outputs)`` of the unrewritten graph, in graph order.
        amax: calibration amax per value of that graph.
        overflowing_constants: names of its constants beyond 65504.
        target_log2: the plan's headroom target.

    Returns:
        ``[{"node", "reason"}]`` in graph order.
    """
    out = []
    for name, inputs, outputs in nodes:
        reason = ""
        big_in = [t for t in inputs if amax.get(t, 0.0) > FP16_MAX]
        big_out = [t for t in outputs if amax.get(t, 0.0) > 2.0 ** target_log2]
        if any(t in overflowing_constants for t in inputs):
            reason = "reads a constant beyond 65504"
        elif big_out:
            reason = f"writes {big_out[0]} (amax {amax[big_out[0]]:.4g} > 2^{target_log2})"
        elif big_in:
            reason = f"reads {big_in[0]} (amax {amax[big_in[0]]:.4g} > 65504)"
        if reason:
            out.append({"node": name, "reason": reason})
    return out


def underflow_islands(ops: Sequence[ScaleOp], underflow: Sequence[PlanUnderflow], flushed: set[str]) -> list[Unfixable]:
    """FP32 islands for constants FP16 flushes to zero where the values beside them flush too.

    ``log(p + 1e-10)`` on a silent frame (``p = 0``) is -23 in FP32 and ``log(0) = -inf`` in FP16,
    where 1e-10 is 0. Where the constant's reader writes values FP16 flushes (calibration saw
    them), the reader runs in FP32, and so does every op reading a value that still holds flushed
    values (the ``Log``), until the values are back in FP16's range. A reader whose outputs never
    come near the constant (BERT's ``var + 1e-12``, ``var`` ~1) stays in FP16: the constant then
    changes nothing.

    Args:
        ops: the graph (the solver's view), in execution order.
        underflow: flushed constants the plan may not raise (no consent).
        flushed: values with nonzero elements below FP16's smallest subnormal in calibration.

    Returns:
        One :class:`~fp16guard.fixing.solver.Unfixable` per constant that needs an island.
    """
    readers: dict[str, list[ScaleOp]] = {}
    for op in ops:
        for t in dict.fromkeys(op.inputs):
            readers.setdefault(t, []).append(op)
    by_name = {op.name: op for op in ops}
    out = []
    for u in underflow:
        island: list[str] = []
        todo = [by_name[r] for r in u.readers if r in by_name and any(t in flushed for t in by_name[r].outputs)]
        while todo:
            op = todo.pop(0)
            if op.name in island:
                continue
            island.append(op.name)
            todo += [r for t in op.outputs if t in flushed for r in readers.get(t, [])]
        if island:
            out.append(Unfixable(u.tensor, tuple(island), u.amax,
                                 f"{u.tensor} ({u.amax:.3g}) is 0 in FP16 and {island[0]} writes values that small "
                                 f"(calibration): the island keeps them in FP32"))
    return out


#: The share of a scaled graph input's nonzero calibration values its scale may store below FP16's
#: normal range (:func:`input_floors`).
INPUT_FLOOR_QUANTILE = 1e-3


def input_floors(target: FixTarget, inputs: Sequence[NamedInput], names: Sequence[str],
                 amax: Mapping[str, float]) -> dict[str, float]:
    """Per graph input beyond FP16, the magnitude below which only :data:`INPUT_FLOOR_QUANTILE` of its
    nonzero calibration values lie: the solver scales the input no more than keeps that magnitude
    a normal FP16 number (down to the exponent that just fits 65504; ``input_floor`` of
    :func:`~fp16guard.fixing.solver.solve`).

    A power spectrum whose quiet frames are 2^37 below its loud ones loses them to subnormals at
    any scale, and a per-frame LayerNorm after it makes each frame count: scaled at 2^-17 (loud
    frames at 8192) its relative error is 1.4e-2, at 2^-14 (65504) 4.8e-3, against the FP32
    fallback's 4.8e-4, which reads the input in FP32.
    """
    big = [k for k, name in enumerate(names) if amax.get(name, 0.0) > FP16_MAX]
    if not big or not isinstance(target, (OnnxFixTarget, TorchFixTarget)):
        return {}
    values: dict[str, list[np.ndarray]] = {}
    for item in inputs:
        if isinstance(target, OnnxFixTarget):
            feed = target.feed(item)
            arrays = [feed.get(name) for name in names]
        else:
            arrays = [a.numpy() if isinstance(a, torch.Tensor) else None for a in torch_args(item)]
        for k in big:
            a = arrays[k] if k < len(arrays) else None
            if a is not None and np.issubdtype(np.asarray(a).dtype, np.floating):
                a = np.abs(np.asarray(a, dtype=np.float64)).reshape(-1)
                values.setdefault(names[k], []).append(a[(a > 0) & np.isfinite(a)])
    out = {}
    for name, parts in values.items():
        nonzero = np.concatenate(parts)
        if nonzero.size:
            out[name] = float(np.quantile(nonzero, INPUT_FLOOR_QUANTILE))
    return out


def calibrate_target(target: FixTarget, inputs: Sequence[NamedInput], *, target_log2: int = DEFAULT_TARGET_LOG2,
                     raise_underflow: bool = False) -> RewritePlan:
    """Measure a target on calibration inputs and decide its rewrite plan.

    Args:
        target: the model (:class:`OnnxFixTarget` or :class:`TorchFixTarget`).
        inputs: calibration inputs.
        target_log2: headroom target: stored activations at or below ``2**target_log2``
            (default :data:`~fp16guard.plan.DEFAULT_TARGET_LOG2`, 13, i.e. 8192: 3 bits below 65504, room
            for inputs 8x larger than seen).
        raise_underflow: consent to raising constants FP16 flushes to zero (see
            :class:`~fp16guard.plan.PlanUnderflow`).

    Returns:
        The :class:`~fp16guard.plan.RewritePlan` (``framework`` and ``model_sha256`` from the target;
        for a PyTorch target also its per-module scales, ``modules``).

    Raises:
        FixError: no inputs, or the FP32 model itself outputs inf/NaN on them (inf/NaN inside the
            graph, such as a masked ``log(0)``, is allowed: FP16 computes the same).
    """
    if not inputs:
        raise FixError("calibration needs at least one input")
    with step(f"calibration: FP32 activation ranges on {len(inputs)} input(s)", total=len(inputs)):
        amax = target.activation_amax(inputs)
    graph_inputs, graph_outputs = target.graph_io()
    bad = [t for t in graph_outputs if not math.isfinite(amax.get(t, 0.0))]
    if bad:
        raise FixError(f"the FP32 model already outputs inf/NaN at {bad[0]} on the calibration inputs; "
                       f"no rewrite can fix that")
    # Intermediate values that are inf/NaN in FP32 too (T5's relative-position buckets take log(0)
    # and then mask it): FP16 gives the same inf, scaled or not, so only finite values size a region.
    amax = {t: (a if math.isfinite(a) else 0.0) for t, a in amax.items()}
    with step("calibration: scale regions (solver)"):
        sol = solve(target.scale_ops(), amax, graph_inputs=graph_inputs, graph_outputs=graph_outputs,
                    target_log2=target_log2, input_floor=input_floors(target, inputs, graph_inputs, amax))
    underflow = [PlanUnderflow(name, readers, value, flushed, FP16_MIN_NORMAL, raise_underflow)
                 for name, readers, value, flushed in target.flushed_constants()]
    ops = target.scale_ops()
    with step("calibration: values FP16 flushes to zero"):
        islands = underflow_islands(ops, [u for u in underflow if not u.consent], target.flushed_values(inputs))
    sol.unfixable += islands
    nodes, overflowing = target.fallback_graph()
    with step("calibration: the FP32 fallback's ranges", total=len(inputs)):
        fallback = fallback_nodes(nodes, target.activation_amax(inputs, prepared=False), overflowing, target_log2)
    known = {name for name, _, _ in nodes}
    fallback += [{"node": n, "reason": u.reason} for u in islands for n in u.ops if n in known]
    return target.complete_plan(_plan(target, target_log2, [i.label for i in inputs], sol, underflow, fallback), amax)


def _plan(target: FixTarget, target_log2: int, labels: list[str], sol: ScaleSolution,
          underflow: list[PlanUnderflow], fallback: list[dict]) -> RewritePlan:
    """The :class:`RewritePlan` of a solved graph."""
    return RewritePlan(
        framework=target.framework, source=target.source, model_sha256=target.model_sha256,
        target_log2=target_log2, calibration=labels,
        regions=[PlanRegion(r.exponent, list(r.tensors), list(r.ops), list(r.scopes), r.amax, r.amax_after,
                            list(r.opened_by), list(r.closed_by)) for r in sol.regions],
        rescale_ops=[{"tensor": r.tensor, "exponent": r.exponent, "consumer": r.consumer, "reason": r.reason}
                     for r in sol.rescales],
        underflow=underflow,
        unfixable=[{"tensor": u.tensor, "nodes": list(u.ops), "amax": u.amax, "reason": u.reason}
                   for u in sol.unfixable],
        fallback_fp32=fallback,
        tight=[{"tensor": t, "amax": a} for t, a in sol.tight],
    )


# ---------------------------------------------------------------- 2. apply and convert


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
        plan: from :func:`calibrate_target` (or a file, edited or not).
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


@dataclass(frozen=True)
class KeptOutputs:
    """The arrays verification compared, kept on request (``fix_target(..., keep_outputs=True)``).

    Attributes:
        labels: the inputs, calibration then validation; ``names`` the model's output names.
        fp32: the FP32 original's outputs, one list per input; ``fixed`` the fixed model's on the
            FP16 backend.
    """

    labels: list[str]
    names: list[str]
    fp32: list[list[np.ndarray]]
    fixed: list[list[np.ndarray]]


@dataclass(frozen=True)
class FixResult:
    """Everything :func:`fix_target` produced. Immutable: a step that changes it makes a new one
    (``dataclasses.replace``); ``notes`` is a tuple.

    Attributes:
        fixed: the typed FP16 model (FP32 graph inputs/outputs).
        rewritten_fp32: the rewritten FP32 graph (equal to the original in real arithmetic).
        plan: the plan applied.
        notes: every rewrite.
        conversion: what the FP16 conversion did (nodes left in FP32 or run in BF16, Casts).
        verification: the fixed model on the FP16 backend; ``naive`` the plain conversion,
            ``fallback`` the FP32 fallback (the offending nodes in FP32) and ``fallback_bf16`` the
            BF16 fallback (the same nodes in BF16), for comparison (None if not run).
        other_islands: when the plan has unfixable islands, the fixed model with its islands in the
            other precision (BF16 when the written model's are FP32, and the reverse), else None.
        islands: the precision of the written model's islands, ``"fp32"`` or ``"bf16"``.
        outputs: the FP32 and fixed outputs verification compared (``keep_outputs``), else None.
        tolerance: the largest relative L2 error accepted on any input (None: not known).
        delivered: what was written: ``fixed`` (the pure fix), ``islands`` (the fewest islands that
            meet the bar) or ``fallback`` (the FP32 or BF16 fallback).
        refusal: why the pure fix was not written (None: it was).
        island_search: the island search when the pure fix missed the bar
            (:class:`~fp16guard.fixing.islands.IslandSearch`), else None.
        floor: a note when the written model sits at the model's own FP16 floor, else None.
        submodule: when one submodule was fixed (``fix_model(..., submodule=)``, or chosen because the
            whole model cannot be captured), what was fixed, what stays FP32 and the end-to-end
            errors (:class:`~fp16guard.fixing.submodule.SubmoduleFix`); ``fixed`` is then the
            submodule's program, and ``model`` a copy of the whole model with the submodule replaced
            by it (:class:`~fp16guard.fixing.submodule.FixedSubmodule`, FP32 in and out). Else None.

    ``fixed, plan = result`` unpacks it as :func:`fix` returned before; ``print(result)`` gives a
    few lines (verdict with the worst error against the tolerance and the FP32 fallback's, the
    rewrites, the next step), ``rich.print(result)`` the full report of ``fp16guard fix``.
    """

    fixed: object
    rewritten_fp32: object
    plan: RewritePlan
    notes: tuple[RewriteNote, ...]
    conversion: Fp16Conversion
    verification: Verification
    naive: Verification | None = None
    fallback: Verification | None = None
    outputs: KeptOutputs | None = None
    fallback_bf16: Verification | None = None
    other_islands: Verification | None = None
    islands: str = "fp32"
    tolerance: float | None = None
    delivered: str = "fixed"
    refusal: str | None = None
    island_search: object = None
    floor: str | None = None
    submodule: object = None
    model: object = None

    def __post_init__(self):
        object.__setattr__(self, "notes", tuple(self.notes))  # a list given (Applied.notes) is frozen too

    def __iter__(self):
        """``fixed, plan = result``: the two values :func:`fix` used to return."""
        return iter((self.fixed, self.plan))

    def __str__(self) -> str:
        from fp16guard.fixing.render import summary

        return summary(self)

    def __repr__(self) -> str:
        from fp16guard.fixing.render import fix_verdict

        return (f"FixResult(source={self.plan.source!r}, accepted={fix_verdict(self)[0]}, "
                f"finite={self.verification.finite}, rewrites={len(self.notes)}, fixed={type(self.fixed).__name__})")

    def __rich_console__(self, console, options):
        """The full report, as ``fp16guard fix`` prints it (:func:`~fp16guard.fixing.render.print_fix`)."""
        from fp16guard.fixing.render import fix_renderables

        yield from fix_renderables(self)

    def to_json(self) -> dict:
        """The fix report, schema ``fp16guard.fix/1`` (docs/fix-schema.md): strict JSON, non-finite
        errors written as the strings ``"inf"``/``"nan"`` (:mod:`fp16guard.jsonio`)."""
        return strict({
            "schema": FIX_SCHEMA, "source": self.plan.source, "framework": self.plan.framework,
            "rewrites": [n.to_json() for n in self.notes],
            "regions": [{"exponent": r.exponent, "scopes": r.scopes, "amax_before": r.amax,
                         "amax_after": r.amax_after, "tensors": len(r.tensors)} for r in self.plan.regions],
            "fp32_nodes": self.conversion.fp32_nodes, "casts": self.conversion.casts,
            "islands": self.islands, "bf16_nodes": self.conversion.bf16_nodes,
            "bf16_refused": [{"node": n, "reason": r} for n, r in self.conversion.bf16_refused.items()],
            "verification": self.verification.to_json(),
            "other_islands": self.other_islands.to_json() if self.other_islands else None,
            "naive": self.naive.to_json() if self.naive else None,
            "fallback": self.fallback.to_json() if self.fallback else None,
            "fallback_bf16": self.fallback_bf16.to_json() if self.fallback_bf16 else None,
            "delivered": self.delivered, "refusal": self.refusal, "floor": self.floor,
            "island_search": None if self.island_search is None else {
                "candidates": [{"node": n, "amax": a} for n, a in self.island_search.candidates],
                "nodes": self.island_search.nodes,
                "trials": [{"nodes": t.nodes, "met": t.met, "worst": t.worst} for t in self.island_search.trials]},
            **({"submodule": self.submodule.to_json()} if self.submodule is not None else {})})


def _variant(fallback: str | None, islands: str) -> str:
    """The verification row label of a fixed (``fallback=None``) or fallback model with islands in
    ``islands`` (or the fallback's precision): ``fixed``, ``fixed_bf16``, ``fallback``, ``fallback_bf16``."""
    precision = fallback or islands
    return ("fallback" if fallback else "fixed") + ("_bf16" if precision == "bf16" else "")


def _comparisons(target: FixTarget, plan: RewritePlan, inputs: Sequence[NamedInput], splits: Sequence[str],
                 refs: list[list[np.ndarray]], *, fallback: str | None, islands: str, backend: str | Backend,
                 metrics: Mapping[str, Metric] | None, compare_naive: bool,
                 compare_fallback: bool) -> dict[str, Verification | None]:
    """The variants verified beside the written model, on the same inputs and backend: ``naive``
    (the plain FP16 conversion), ``fallback`` and ``fallback_bf16`` (the offending nodes in FP32 or
    BF16, the one not written), and ``other_islands`` (the fixed model with its islands in the other
    precision, when the plan has islands). A BF16 variant the backend cannot build or run (a GPU
    before Ampere, an ONNX Runtime EP without BF16 kernels) is left out with a warning; on
    ``emulate`` every failure is raised."""
    out: dict[str, Verification | None] = dict.fromkeys(("naive", "fallback", "fallback_bf16", "other_islands"))

    def run(variant: str, what: str, make) -> Verification | None:
        """Verify one comparison model, softly for BF16 on a real backend."""
        try:
            with step(f"rewrite: {what}, for comparison"):
                model = make()
            return verify(target, model, inputs, splits, backend=backend, variant=variant, metrics=metrics,
                          references=refs)[0]
        except Exception as e:  # noqa: BLE001 - a comparison row must not stop the fix on a real backend
            if "bf16" not in variant or getattr(backend, "name", backend) == "emulate":
                raise
            logger.warning("%s not verified on %s: %s", variant, getattr(backend, "name", backend),
                           next(iter(str(e).splitlines()), type(e).__name__))
            return None
    if compare_naive:
        out["naive"] = run("naive", "the naive FP16 conversion", lambda: target.convert(target.base, [])[0])
    for precision in ("fp32", "bf16") if compare_fallback else ():
        if precision != fallback:
            variant = _variant(precision, precision)  # fallback, fallback_bf16: the keys of ``out``
            out[variant] = run(variant, f"the {precision.upper()} fallback",
                               lambda p=precision: apply_plan(target, plan, fallback=p, check_hash=False).fixed)
    other = "bf16" if islands == "fp32" else "fp32"
    if compare_fallback and fallback is None and plan.unfixable_nodes:
        out["other_islands"] = run(_variant(None, other), f"the fixed model with {other.upper()} islands",
                                   lambda: apply_plan(target, plan, islands=other, check_hash=False).fixed)
    return out


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
        compare_fallback: also verify the FP32 and BF16 fallbacks (the plan's ``fallback_fp32``
            nodes in FP32, in BF16) and, when the plan has islands, the fixed model with its islands
            in the other precision, for comparison (:func:`_comparisons`).
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
                                variant=_variant(fallback, islands), metrics=metrics, outputs_into=kept)
    others = _comparisons(target, plan, inputs, splits, refs, fallback=fallback, islands=islands, backend=backend,
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
                       delivered="fallback" if rewrite_failed else "fixed", refusal=rewrite_failed)
    if force:
        return result
    if fallback is None:
        result = _deliver(result, target, plan, applied, inputs, splits, refs, backend=backend, metrics=metrics,
                          same=others["fallback" if islands == "fp32" else "fallback_bf16"], naive=others["naive"])
    if not result.verification.finite:
        worst = max(result.verification.rows, key=lambda r: r.nonfinite)
        raise StillOverflowsError(
            f"the {result.verification.variant} model still produces {worst.nonfinite} inf/NaN output value(s) on "
            f"{worst.label} in FP16, and so does the FP32 fallback; see the plan's unfixable entries, or --force to "
            f"write the fixed model anyway")
    return result


def _deliver(result: FixResult, target: FixTarget, plan: RewritePlan, applied: Applied, inputs: Sequence[NamedInput],
             splits: Sequence[str], refs: list[list[np.ndarray]], *, backend: str | Backend,
             metrics: Mapping[str, Metric] | None, same: Verification | None, naive: Verification | None) -> FixResult:
    """``result`` with the best deployable model: the fixed one when it meets the bar
    (:func:`~fp16guard.compare.misses_bar` against the fallback with islands in the same
    precision, else the naive conversion); otherwise the fewest islands on the rewritten graph that
    do (:func:`~fp16guard.fixing.islands.search_islands`); otherwise the fallback itself, which other
    tools would give. The copy returned has ``delivered``, ``refusal`` (why the pure fix was not
    written), ``island_search`` and ``floor`` set.

    A plan that raises flushed constants (with consent) changes the model's math on purpose: its
    fixed model is then judged only for finiteness.
    """
    from fp16guard.compare import floor_note, misses_bar
    from fp16guard.fixing.islands import search_islands

    reference = same or naive
    consented = any(u.consent for u in plan.underflow)
    reason = misses_bar(result.verification, None if consented else reference, None if consented else result.tolerance)
    if consented and result.verification.finite:
        reason = None
    kept = len(result.conversion.fp32_nodes) + len(result.conversion.bf16_nodes)
    fallback_count = len(plan.fallback_fp32)
    if reason is None and kept > fallback_count and same is not None and same.finite and not consented:
        result = _with_fallback(result, target, plan, same, refusal=(
            f"the pure fix keeps {kept} node(s) in {result.islands.upper()} (its islands and their rescales), more "
            f"than the fallback's {fallback_count}, which meets the bar too"))
        return replace(result, floor=floor_note(result.verification, reference, result.tolerance))
    if reason is None:
        floor = None if consented else floor_note(result.verification, reference, result.tolerance)
        return replace(result, floor=floor)
    logger.info("the pure fix misses the bar (%s); searching for the fewest islands", reason)
    variant = result.verification.variant

    def check(fixed):
        """Verify a candidate; does it meet the bar?"""
        v = verify(target, fixed, inputs, splits, backend=backend, variant=variant, metrics=metrics, references=refs)[0]
        return v, misses_bar(v, reference, result.tolerance) is None

    fallback_nodes_ = [e["node"] for e in plan.fallback_fp32]
    with step("islands: the fewest FP32 nodes that meet the bar"):
        found = search_islands(applied.rewritten, plan.unfixable_nodes, fallback_nodes_,
                               _true_amax(plan),
                               lambda nodes: target.convert(applied.rewritten, nodes, islands=result.islands),
                               check, limit=max(len(fallback_nodes_), len(plan.unfixable_nodes)))
    kept = (found.conversion.fp32_nodes + found.conversion.bf16_nodes) if found.nodes is not None else []
    if found.nodes is not None and len(kept) > len(fallback_nodes_) and same is not None and same.finite:
        found.nodes = None  # its restoring rescales make it larger than the fallback: the fallback is no worse
    if found.nodes is not None:
        result = replace(result, fixed=found.fixed, conversion=found.conversion, verification=found.verification,
                         delivered="islands", refusal=reason, island_search=found)
    elif same is not None and same.finite:
        result = _with_fallback(result, target, plan, same, refusal=reason, island_search=found)
    else:
        result = replace(result, refusal=reason, island_search=found)
    return replace(result, floor=floor_note(result.verification, reference, result.tolerance))


def _with_fallback(result: FixResult, target: FixTarget, plan: RewritePlan, verified: Verification,
                   **changes) -> FixResult:
    """``result`` holding the fallback in its islands' precision (already ``verified``), with
    ``changes`` (``refusal``, ``island_search``) too."""
    fb = apply_plan(target, plan, fallback=result.islands, check_hash=False)
    return replace(result, fixed=fb.fixed, rewritten_fp32=fb.rewritten, notes=fb.notes, conversion=fb.conversion,
                   verification=verified, delivered="fallback", **changes)


def _true_amax(plan: RewritePlan) -> dict[str, float]:
    """The true (unscaled) calibration amax of every value a plan's regions scale (0 elsewhere)."""
    out: dict[str, float] = {}
    for region in plan.regions:
        for t in region.tensors:
            out[t] = max(out.get(t, 0.0), float(region.amax))
    return out


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
            ONNX export route failed: :func:`~fp16guard.torch_graph.export_onnx_routes`); when
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
              source: str | None = None, graph: str | None = None, submodule: str | None = None) -> RewritePlan:
    """Calibrate a rewrite plan for an ONNX model or a PyTorch module.

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto``, ``torch.nn.Module`` or ``.pt2`` path
            (:func:`~fp16guard.loading.open_model`). A module is calibrated in eval mode, as
            deployed, on a deep copy (:func:`~fp16guard.torch_graph.inference_copy`): a module in
            train or mixed mode gets the eval-mode plan, and the caller's module
            (state_dict, BatchNorm statistics, training flags, hooks) is never changed.
        calib_inputs: :class:`~fp16guard.inputs.NamedInput` items, arrays, or tuples of arrays.
        target_log2, raise_underflow: see :func:`calibrate_target`.
        source: the model's name in the plan.
        graph: for a PyTorch module, which graph the plan names: ``"torch"`` (default) or ``"onnx"``
            (see :func:`make_target`). Either way ``model_sha256`` hashes the module's state_dict.
        submodule: for a PyTorch module, calibrate only this submodule (dotted name, e.g.
            ``"backbone"``), on the inputs it receives when the whole model runs in FP32 on
            ``calib_inputs`` (see :func:`fix_model`); the plan is the submodule's. Without it, a
            module that cannot be captured whole gets the plan of its largest submodule that can
            (a warning names it).

    Raises:
        FixError, ExportError, ModelLoadError; InputError for an input with inf/NaN, no elements,
            or a shape the model does not take; ValueError for an unknown ``graph``
        or ``graph="torch"`` with an ONNX model, or a ``submodule`` the model does not have (UsageError).
    """
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
