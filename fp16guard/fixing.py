"""``fp16guard.fix``: calibrate a rewrite plan, apply it, and verify the fixed model in FP16.

Pipeline for an ONNX model (:func:`fix_onnx`):

1. **Structural passes** (:func:`prepare_onnx`): constants to initializers, bias Adds and
   BatchNorms folded in float64 (:mod:`fp16guard.onnx_rewrite`).
2. **Calibration** (:func:`calibrate_onnx`): the inspector's per-value ranges
   (:func:`fp16guard.onnx_inspector.value_ranges`) over the calibration inputs, the scale solver
   (:mod:`fp16guard.scaling`), and the constants FP16 would flush entirely: a
   :class:`~fp16guard.plan.RewritePlan`.
3. **Apply** (:func:`apply_onnx`): the plan's exponents folded into the constants, its consented
   constant raises, then the typed FP16 conversion (:func:`fp16guard.fp16_onnx.to_typed_fp16`)
   with only the plan's unfixable nodes in FP32. ``fallback="fp32"`` instead converts the original
   graph with the offending nodes in FP32 (what other tools do), for comparison.
4. **Verify** (:func:`verify_onnx`), always: the fixed FP16 model on an FP16 backend against the
   FP32 original on the calibration inputs and on validation inputs not used for calibration.
   A fixed model that still produces inf/NaN is refused (:class:`FixError`) unless ``force``.

PyTorch models go through :mod:`fp16guard.torch_rewrite` with the same plan and solver.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from .backends import Backend, get_backend
from .fp16 import FP16_MAX, FP16_MIN_NORMAL
from .fp16_onnx import Fp16Conversion, to_typed_fp16, unfit_constants
from .inputs import InputError, NamedInput
from .onnx_inspector import load_onnx, value_ranges
from .onnx_rewrite import (RewriteNote, apply_exponents, constants_to_initializers, fold_batchnorms,
                           fold_affine_constants, raise_constants, scale_ops)
from .plan import PlanError, PlanRegion, PlanUnderflow, RewritePlan, sha256_of
from .scaling import ScaleSolution, complete, solve

logger = logging.getLogger("fp16guard")

#: A task metric: ``metric(outputs, reference) -> score`` on lists of numpy arrays in the model's
#: output order (higher is better, e.g. mask IoU).
TaskMetric = Callable[[list[np.ndarray], list[np.ndarray]], float]


class FixError(RuntimeError):
    """The fixed model still fails in FP16 (non-finite outputs), or the model cannot be fixed as asked."""


def prepare_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[RewriteNote]]:
    """The structural passes: constants to initializers, bias Adds and BatchNorms folded.

    Returns ``(model', notes)``; ``model`` is not modified.
    """
    notes: list[RewriteNote] = []
    for rewrite in (constants_to_initializers, fold_affine_constants, fold_batchnorms, fold_affine_constants):
        model, n = rewrite(model)
        notes += n
    return model, notes


def _feeds(model: onnx.ModelProto, inputs: Sequence[NamedInput]) -> list[dict[str, np.ndarray]]:
    from .bisect import _onnx_feeds
    from .onnx_inspector import graph_constants

    consts = set(graph_constants(model))
    names = [i.name for i in model.graph.input if i.name not in consts]
    out = []
    for item in inputs:
        if item.kind != "arrays":
            raise InputError(f"{item.label}: a raw {item.kind} needs preprocessing; use --example or pass .npy/.npz")
        feed = _onnx_feeds(names, item)
        out.append({n: a.astype(np.float32) if a.dtype.kind == "f" else a for n, a in feed.items()})
    return out


def _amax(stats: Sequence[Mapping]) -> dict[str, float]:
    out: dict[str, float] = {}
    for run in stats:
        for name, s in run.items():
            out[name] = max(out.get(name, 0.0), s.amax)
            if s.nonfinite:
                out[name] = math.inf
    return out


def fallback_nodes(model: onnx.ModelProto, amax: Mapping[str, float], target_log2: int) -> list[dict]:
    """Nodes the FP32 fallback keeps in FP32: readers of constants that overflow FP16, writers of
    values above ``2**target_log2`` and readers of values above 65504.

    Args:
        model: the FP32 graph (constants as initializers, nodes named).
        amax: calibration amax per value of ``model``.
        target_log2: the plan's headroom target.

    Returns:
        ``[{"node", "reason"}]`` in graph order.
    """
    over = {u.name for u in unfit_constants(model) if u.overflow}
    return _fallback([(n.name, list(n.input), list(n.output)) for n in model.graph.node], amax, over, target_log2)


def _fallback(nodes: Sequence[tuple[str, Sequence[str], Sequence[str]]], amax: Mapping[str, float],
              overflowing_constants: set[str], target_log2: int) -> list[dict]:
    """:func:`fallback_nodes`' rule on ``(node, inputs, outputs)`` triples (ONNX or fx)."""
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


def calibrate_onnx(model: str | Path | onnx.ModelProto, inputs: Sequence[NamedInput], *, target_log2: int = 13,
                   raise_underflow: bool = False, source: str | None = None,
                   memory_budget: int = 1 << 30) -> RewritePlan:
    """Measure an FP32 ONNX model on calibration inputs and decide its rewrite plan.

    Args:
        model: ``.onnx`` path or ``onnx.ModelProto`` (not modified).
        inputs: calibration inputs (preprocessed arrays, in the model's input order).
        target_log2: headroom target: stored activations at or below ``2**target_log2``
            (default 13, i.e. 8192: 3 bits below 65504, room for inputs 8x larger than seen).
        raise_underflow: consent to raising constants FP16 flushes to zero (see
            :class:`~fp16guard.plan.PlanUnderflow`).
        source: the model's name in the plan.
        memory_budget: bytes of intermediate values held at once during calibration.

    Returns:
        The :class:`~fp16guard.plan.RewritePlan`.

    Raises:
        ModelLoadError, InputError: as :func:`fp16guard.inspect_onnx`.
        FixError: no inputs, or the FP32 model itself produces inf/NaN on them.
    """
    if not inputs:
        raise FixError("calibration needs at least one input")
    original = load_onnx(model)
    name = source or (Path(model).name if not isinstance(model, onnx.ModelProto) else original.graph.name or "model")
    prepared, _ = prepare_onnx(original)
    feeds = _feeds(prepared, inputs)
    labels = [i.label for i in inputs]
    amax = _amax(value_ranges(prepared, feeds, labels=labels, memory_budget=memory_budget))
    bad = [t for t, a in amax.items() if not math.isfinite(a)]
    if bad:
        raise FixError(f"the FP32 model already produces inf/NaN at {bad[0]} on the calibration inputs; "
                       f"no rewrite can fix that")
    graph_inputs = [i.name for i in prepared.graph.input]
    graph_outputs = [o.name for o in prepared.graph.output]
    sol = solve(scale_ops(prepared), amax, graph_inputs=graph_inputs, graph_outputs=graph_outputs,
                target_log2=target_log2)

    readers: dict[str, list[str]] = {}
    for node in prepared.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node.name)
    underflow = [PlanUnderflow(u.name, readers.get(u.name, []), u.amax, u.flushed, FP16_MIN_NORMAL, raise_underflow)
                 for u in unfit_constants(prepared) if u.flushed and u.flushed == _nonzero(prepared, u.name)]

    base, _ = constants_to_initializers(original)
    base_amax = _amax(value_ranges(base, feeds, labels=labels, memory_budget=memory_budget))
    return _plan("onnx", name, sha256_of(original.SerializeToString()), target_log2, labels, sol, underflow,
                 fallback_nodes(base, base_amax, target_log2))


def _plan(framework: str, source: str, digest: str, target_log2: int, labels: list[str], sol: ScaleSolution,
          underflow: list[PlanUnderflow], fallback: list[dict]) -> RewritePlan:
    """The :class:`RewritePlan` of a solved graph (ONNX or PyTorch)."""
    return RewritePlan(
        framework=framework, source=source, model_sha256=digest, target_log2=target_log2, calibration=labels,
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


def _nonzero(model: onnx.ModelProto, name: str) -> int:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return int(np.count_nonzero(numpy_helper.to_array(init)))
    return -1


def apply_onnx(model: str | Path | onnx.ModelProto, plan: RewritePlan, *, fallback: str | None = None,
               check_hash: bool = True) -> tuple[onnx.ModelProto, onnx.ModelProto, list[RewriteNote], Fp16Conversion]:
    """Apply a plan to an FP32 ONNX model.

    Args:
        model: the model the plan was calibrated on (not modified).
        plan: from :func:`calibrate_onnx` (or a file, edited or not).
        fallback: ``None`` (scale rewrites, pure FP16 except the plan's unfixable nodes) or
            ``"fp32"`` (no rewrite: the original graph with the plan's ``fallback_fp32`` nodes in
            FP32, as Polygraphy / AutoCast / onnxconverter-common would).
        check_hash: refuse a plan calibrated on another model.

    Returns:
        ``(fp16_model, fp32_rewritten, notes, conversion)``: the typed FP16 graph (FP32 graph
        inputs and outputs, TensorRT 11's strongly typed form), the rewritten FP32 graph before
        conversion, what changed, and what the conversion did.

    Raises:
        PlanError: the plan is for another model or framework, names a value the model does not
            have, or breaks a tie (two values of one scale-equivariant op with different exponents).
        RewriteError: a rescaled constant does not fit FP16.
    """
    original = load_onnx(model)
    if plan.framework != "onnx":
        raise PlanError(f"this plan is for a {plan.framework} model; apply it with fix_model() to that model")
    if check_hash and plan.model_sha256 != sha256_of(original.SerializeToString()):
        raise PlanError(f"the plan was calibrated on another model ({plan.source}, sha256 {plan.model_sha256[:12]}...); "
                        f"calibrate this one, or pass check_hash=False (--force) if only metadata changed")
    if fallback not in (None, "fp32"):
        raise ValueError(f"fallback must be None or 'fp32', got {fallback!r}")
    if fallback == "fp32":
        base, notes = constants_to_initializers(original)
        nodes = [entry["node"] for entry in plan.fallback_fp32]
        fp16, conversion = to_typed_fp16(base, node_block_list=nodes)
        notes.append(RewriteNote("fallback_fp32", ", ".join(nodes[:5]) + (" ..." if len(nodes) > 5 else ""),
                                 f"{len(nodes)} node(s) kept in FP32 with Casts around them"))
        return fp16, base, notes, conversion

    prepared, notes = prepare_onnx(original)
    ops = scale_ops(prepared)
    known = {t for op in ops for t in (*op.inputs, *op.outputs)}
    exponents = plan.exponents
    missing = sorted(set(exponents) - known)
    if missing:
        raise PlanError(f"the plan scales {missing[0]!r} (and {len(missing) - 1} more), which the model does not have")
    try:
        sol = complete(ops, exponents, graph_outputs=[o.name for o in prepared.graph.output])
    except ValueError as e:
        raise PlanError(str(e)) from None
    scaled, n = apply_exponents(prepared, sol)
    notes += n
    raises = [(u.tensor, u.raise_to) for u in plan.underflow if u.consent]
    if raises:
        scaled, n = raise_constants(scaled, raises)
        notes += n
    fp16, conversion = to_typed_fp16(scaled, node_block_list=plan.unfixable_nodes)
    return fp16, scaled, notes, conversion


@dataclass(frozen=True)
class VerifyRow:
    """The fixed model against the FP32 original on one input.

    Attributes:
        label: the input; ``split`` ``calibration`` or ``validation``.
        rel_l2: worst relative L2 error over outputs; ``max_abs`` largest absolute error.
        nonfinite: count of inf/NaN output elements where FP32 is finite.
        task: task metric scores by name (higher is better).
    """

    label: str
    split: str
    rel_l2: float
    max_abs: float
    nonfinite: int
    task: dict[str, float] = field(default_factory=dict)


@dataclass
class Verification:
    """One model variant verified on every input (:func:`verify_onnx`).

    Attributes:
        variant: ``fixed``, ``naive`` (plain FP16 conversion) or ``fallback``.
        backend: the FP16 backend's description.
        rows: one :class:`VerifyRow` per input.
    """

    variant: str
    backend: str
    rows: list[VerifyRow] = field(default_factory=list)

    @property
    def finite(self) -> bool:
        """No output has inf/NaN where FP32 is finite."""
        return all(r.nonfinite == 0 for r in self.rows)

    def to_json(self) -> dict:
        """Plain-JSON form."""
        return {"variant": self.variant, "backend": self.backend, "finite": self.finite,
                "rows": [r.__dict__ for r in self.rows]}


def compare_outputs(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[float, float, int]:
    """``(worst relative L2, max |error|, non-finite count)`` of outputs against an FP32 reference
    (non-finite elements excluded from the two errors; relative L2 is inf when any exists)."""
    from .bisect import relative_l2

    max_abs, nonfinite = 0.0, 0
    for y, r in zip(outputs, reference):
        y64, r64 = np.asarray(y, dtype=np.float64), np.asarray(r, dtype=np.float64)
        bad = ~np.isfinite(y64) & np.isfinite(r64)
        nonfinite += int(bad.sum())
        ok = np.isfinite(y64) & np.isfinite(r64)
        if ok.any():
            max_abs = max(max_abs, float(np.abs(y64[ok] - r64[ok]).max()))
    return relative_l2(list(outputs), list(reference)), max_abs, nonfinite


def _row(item: NamedInput, split: str, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray],
         metrics: Mapping[str, TaskMetric] | None) -> VerifyRow:
    """One :class:`VerifyRow`: the error metrics and every task metric of ``outputs``."""
    rel, mx, nf = compare_outputs(outputs, reference)
    task = {k: float(fn(list(outputs), list(reference))) for k, fn in (metrics or {}).items()}
    return VerifyRow(item.label, split, rel, mx, nf, task)


def verify_onnx(reference_model: onnx.ModelProto, fp16_model: onnx.ModelProto, inputs: Sequence[NamedInput],
                splits: Sequence[str], *, backend: str | Backend = "emulate", variant: str = "fixed",
                metrics: Mapping[str, TaskMetric] | None = None,
                references: list[list[np.ndarray]] | None = None) -> tuple[Verification, list[list[np.ndarray]]]:
    """Run ``fp16_model`` on an FP16 backend and compare it with ``reference_model`` in FP32.

    Args:
        reference_model: the original FP32 model (run with ONNX Runtime's CPU EP).
        fp16_model: a typed FP16 model (:func:`apply_onnx`).
        inputs: preprocessed inputs; ``splits`` says for each whether it is a calibration or a
            validation input.
        backend: FP16 backend name or instance (``emulate`` on CPU; ``onnxruntime``, ``torch``,
            ``tensorrt`` on a GPU).
        variant: the row label.
        metrics: task metrics (higher is better) by name.
        references: FP32 outputs already computed (as returned by an earlier call).

    Returns:
        ``(verification, references)``.
    """
    import onnxruntime as ort

    be = get_backend(backend) if isinstance(backend, str) else backend
    feeds = _feeds(reference_model, inputs)
    if references is None:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(reference_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        references = [sess.run(None, f) for f in feeds]
    engine = be.build(fp16_model)
    out = Verification(variant, be.describe())
    for item, split, feed, ref in zip(inputs, splits, feeds, references):
        y = engine.run(feed)
        out.rows.append(_row(item, split, y, ref, metrics))
    return out, references


@dataclass
class FixResult:
    """Everything :func:`fix_onnx` produced.

    Attributes:
        fixed: the typed FP16 model (FP32 graph inputs/outputs).
        rewritten_fp32: the rewritten FP32 graph (equal to the original in real arithmetic).
        plan: the plan applied.
        notes: every rewrite.
        conversion: what the FP16 conversion did (nodes left in FP32, Casts).
        verification: the fixed model on the FP16 backend; ``naive`` the plain conversion for
            comparison (None if not run).
    """

    fixed: onnx.ModelProto
    rewritten_fp32: onnx.ModelProto
    plan: RewritePlan
    notes: list[RewriteNote]
    conversion: Fp16Conversion
    verification: Verification
    naive: Verification | None = None

    def to_json(self) -> dict:
        """The fix report (schema ``fp16guard.fix/1``)."""
        return {"schema": "fp16guard.fix/1", "source": self.plan.source,
                "rewrites": [n.to_json() for n in self.notes],
                "regions": [{"exponent": r.exponent, "scopes": r.scopes, "amax_before": r.amax,
                             "amax_after": r.amax_after, "tensors": len(r.tensors)} for r in self.plan.regions],
                "fp32_nodes": self.conversion.fp32_nodes, "casts": self.conversion.casts,
                "verification": self.verification.to_json(),
                "naive": self.naive.to_json() if self.naive else None}


def _refuse_nonfinite(verification: Verification, force: bool) -> None:
    """Raise :class:`FixError` if the fixed model still gives inf/NaN, unless ``force``."""
    if not verification.finite and not force:
        worst = max(verification.rows, key=lambda r: r.nonfinite)
        raise FixError(f"the fixed model still produces {worst.nonfinite} inf/NaN output value(s) on {worst.label} "
                       f"in FP16; see the plan's unfixable entries, try --fallback fp32, or --force to write it anyway")


def fix_onnx(model: str | Path | onnx.ModelProto, calibration: Sequence[NamedInput] = (), *,
             plan: RewritePlan | None = None, validation: Sequence[NamedInput] = (), target_log2: int = 13,
             raise_underflow: bool = False, fallback: str | None = None, backend: str | Backend = "emulate",
             metrics: Mapping[str, TaskMetric] | None = None, compare_naive: bool = True,
             force: bool = False, source: str | None = None) -> FixResult:
    """Calibrate (unless ``plan`` is given), apply and verify; see the module docstring.

    Args:
        model: FP32 ``.onnx`` path or ``onnx.ModelProto`` (not modified).
        calibration: calibration inputs (needed unless ``plan`` is given; also verified).
        plan: a plan to apply instead of calibrating.
        validation: inputs not used for calibration, verified too.
        target_log2, raise_underflow: see :func:`calibrate_onnx`.
        fallback: see :func:`apply_onnx`.
        backend: FP16 backend for verification (default ``emulate``: strict FP16 emulation on CPU).
        metrics: task metrics reported per input (higher is better).
        compare_naive: also verify the plain FP16 conversion, for comparison.
        force: return the fixed model even if it still produces inf/NaN.
        source: the model's name in the plan.

    Raises:
        FixError: nothing to verify on, or the fixed model still produces inf/NaN (unless ``force``).
        PlanError, RewriteError, ModelLoadError, InputError: see :func:`apply_onnx` and
            :func:`calibrate_onnx`.
    """
    original = load_onnx(model)
    if plan is None:
        plan = calibrate_onnx(original, calibration, target_log2=target_log2, raise_underflow=raise_underflow,
                              source=source or (Path(model).name if not isinstance(model, onnx.ModelProto) else None))
    inputs = [*calibration, *validation]
    if not inputs:
        raise FixError("verification needs inputs: give calibration or validation inputs")
    splits = ["calibration"] * len(calibration) + ["validation"] * len(validation)
    fixed, rewritten, notes, conversion = apply_onnx(original, plan, fallback=fallback)
    verification, refs = verify_onnx(original, fixed, inputs, splits, backend=backend,
                                     variant="fallback" if fallback else "fixed", metrics=metrics)
    naive = None
    if compare_naive:
        naive_model, _ = to_typed_fp16(original)
        naive, _ = verify_onnx(original, naive_model, inputs, splits, backend=backend, variant="naive",
                               metrics=metrics, references=refs)
    result = FixResult(fixed, rewritten, plan, notes, conversion, verification, naive)
    _refuse_nonfinite(verification, force)
    return result


# ---------------------------------------------------------------- PyTorch modules


def _overflow_constants(gm) -> set[str]:
    """Names of the ``get_attr`` nodes whose float constant has a value beyond 65504."""
    import torch

    from .torch_rewrite import _fetch

    out = set()
    for n in gm.graph.nodes:
        t = _fetch(gm, n.target) if n.op == "get_attr" else None
        if isinstance(t, torch.Tensor) and t.is_floating_point() and bool((t.detach().double().abs() > FP16_MAX).any()):
            out.add(n.name)
    return out


def _fx_nodes(gm) -> list[tuple[str, list[str], list[str]]]:
    """``(node, inputs, outputs)`` triples of a graph's ops for :func:`_fallback`."""
    from torch import fx
    from torch.utils._pytree import tree_flatten

    return [(n.name, [a.name for a in tree_flatten((n.args, n.kwargs))[0] if isinstance(a, fx.Node)], [n.name])
            for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def calibrate_torch(model, inputs: Sequence[NamedInput], *, target_log2: int = 13, raise_underflow: bool = False,
                    source: str | None = None) -> RewritePlan:
    """Measure an FP32 PyTorch module on calibration inputs and decide its rewrite plan.

    The module is captured with ``torch.export`` (:func:`fp16guard.torch_rewrite.capture`), its
    BatchNorms folded, every op's activation amax measured, and the graph solved by
    :func:`fp16guard.scaling.solve`, as :func:`calibrate_onnx` does for ONNX. The plan
    (``framework="torch"``) names fx nodes and hashes the module's state_dict.

    Args:
        model: ``torch.nn.Module`` (not modified; its training flag is restored).
        inputs: calibration inputs (arrays in ``forward``'s argument order).
        target_log2, raise_underflow, source: as :func:`calibrate_onnx`.

    Raises:
        ExportError: ``torch.export`` cannot capture the module.
        FixError: no inputs, or the FP32 model itself produces inf/NaN on them.
        RewriteError: a BatchNorm in training mode.
    """
    from . import torch_rewrite as tr
    from .fp16 import FP16_MIN_SUBNORMAL

    if not inputs:
        raise FixError("calibration needs at least one input")
    examples = tr.examples_of(inputs)
    captured = tr.capture(model, examples)
    prepared, _ = tr.fold_batchnorms(captured)
    tr.annotate(prepared, examples[0])
    amax = tr.activation_amax(prepared, examples)
    bad = [t for t, a in amax.items() if not math.isfinite(a)]
    if bad:
        raise FixError(f"the FP32 model already produces inf/NaN at {bad[0]} on the calibration inputs; "
                       f"no rewrite can fix that")
    graph_inputs, graph_outputs = tr.graph_io(prepared)
    sol = solve(tr.scale_ops(prepared), amax, graph_inputs=graph_inputs, graph_outputs=graph_outputs,
                target_log2=target_log2)
    underflow = []
    for target, (value, readers) in tr.constants(prepared).items():
        nonzero = int(np.count_nonzero(value))
        flushed = int(np.count_nonzero((value != 0) & (np.abs(value) <= FP16_MIN_SUBNORMAL / 2)))
        if flushed and flushed == nonzero:
            underflow.append(PlanUnderflow(target, readers, float(np.abs(value).max()), flushed, FP16_MIN_NORMAL,
                                           raise_underflow))
    base_amax = tr.activation_amax(captured, examples)
    fallback = _fallback(_fx_nodes(captured), base_amax, _overflow_constants(captured), target_log2)
    plan = _plan("torch", source or type(model).__name__, tr.state_dict_sha256(model), target_log2,
                 [i.label for i in inputs], sol, underflow, fallback)
    from .module_scales import module_scales

    plan.modules = [m.to_json() for m in module_scales(model, plan, examples, captured=captured)]
    return plan


def apply_torch(model, plan: RewritePlan, examples, *, fallback: str | None = None, check_hash: bool = True):
    """Apply a ``framework="torch"`` plan to a PyTorch module.

    Args:
        model: the module the plan was calibrated on (not modified).
        plan: from :func:`calibrate_torch`.
        examples: argument tuples of FP32 tensors (capture and value types).
        fallback: ``None`` (scale rewrites) or ``"fp32"`` (the captured graph, unrewritten, with
            the plan's ``fallback_fp32`` nodes in FP32).
        check_hash: refuse a plan calibrated on another model.

    Returns:
        ``(program, rewritten, notes, conversion)``: the typed FP16 program
        (:func:`fp16guard.torch_rewrite.to_fp16_program`), the rewritten FP32 graph, the rewrites,
        and the nodes kept in FP32 with the casts inserted.

    Raises:
        PlanError: the plan is for another model or framework, names a value the graph does not
            have, or breaks a tie.
        RewriteError: a rescaled constant does not fit FP16.
    """
    from . import torch_rewrite as tr

    if plan.framework != "torch":
        raise PlanError(f"this plan names the values of an {plan.framework} graph; apply it to the ONNX model "
                        f"(fp16guard fix ... -o OUT.onnx)")
    if check_hash and plan.model_sha256 != tr.state_dict_sha256(model):
        raise PlanError(f"the plan was calibrated on another model ({plan.source}, sha256 {plan.model_sha256[:12]}...); "
                        f"calibrate this one, or force it")
    if fallback not in (None, "fp32"):
        raise ValueError(f"fallback must be None or 'fp32', got {fallback!r}")
    captured = tr.capture(model, examples)
    if fallback == "fp32":
        tr.annotate(captured, examples[0])
        nodes = [entry["node"] for entry in plan.fallback_fp32]
        program = tr.to_fp16_program(captured, nodes)
        notes = [RewriteNote("fallback_fp32", ", ".join(nodes[:5]) + (" ..." if len(nodes) > 5 else ""),
                             f"{len(nodes)} node(s) kept in FP32 with casts around them")]
        return program, captured, notes, Fp16Conversion(fp32_nodes=nodes, casts=_casts(program))
    prepared, notes = tr.fold_batchnorms(captured)
    tr.annotate(prepared, examples[0])
    ops = tr.scale_ops(prepared)
    known = {t for op in ops for t in (*op.inputs, *op.outputs)}
    missing = sorted(set(plan.exponents) - known)
    if missing:
        raise PlanError(f"the plan scales {missing[0]!r} (and {len(missing) - 1} more), which the model does not have")
    try:
        sol = complete(ops, plan.exponents, graph_outputs=tr.graph_io(prepared)[1])
    except ValueError as e:
        raise PlanError(str(e)) from None
    scaled, n = tr.apply_exponents(prepared, sol)
    notes += n
    raises = [(u.tensor, u.raise_to) for u in plan.underflow if u.consent]
    if raises:
        scaled, n = tr.raise_constants(scaled, raises)
        notes += n
    tr.annotate(scaled, examples[0])
    program = tr.to_fp16_program(scaled, plan.unfixable_nodes)
    return program, scaled, notes, Fp16Conversion(fp32_nodes=list(plan.unfixable_nodes), casts=_casts(program))


def _casts(program) -> int:
    import torch

    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten._to_copy.default)


def verify_torch(reference, program, inputs: Sequence[NamedInput], splits: Sequence[str], *,
                 backend: str = "emulate", variant: str = "fixed", metrics: Mapping[str, TaskMetric] | None = None,
                 references: list[list[np.ndarray]] | None = None) -> tuple[Verification, list[list[np.ndarray]]]:
    """Run an FP16 program against the FP32 module on every input.

    Args:
        reference: the FP32 ``torch.nn.Module`` (run on the CPU, in eval mode).
        program: the FP16 program (:func:`apply_torch`).
        inputs, splits, variant, metrics, references: as :func:`verify_onnx`.
        backend: ``emulate`` (strict FP16 emulation on the CPU,
            :func:`fp16guard.torch_rewrite.run_emulated`) or ``torch`` (PyTorch's FP16 kernels on
            CUDA).

    Raises:
        BackendError: ``torch`` without a CUDA device, or an unknown backend.
    """
    import torch
    from torch.utils._pytree import tree_flatten

    from . import torch_rewrite as tr
    from .backends import BackendError

    examples = tr.examples_of(inputs)
    if references is None:
        with tr.eval_mode(reference), torch.no_grad():
            references = [[t.float().numpy() for t in tree_flatten(reference(*ex))[0] if isinstance(t, torch.Tensor)]
                          for ex in examples]
    if backend == "emulate":
        run, what = (lambda ex: tr.run_emulated(program, *ex)), f"strict FP16 emulation (PyTorch {torch.__version__}, CPU)"
    elif backend == "torch":
        if not torch.cuda.is_available():
            raise BackendError("backend torch runs PyTorch's FP16 kernels on CUDA, and no CUDA device is visible; "
                               "use --backend emulate")
        device = torch.device("cuda")
        on_gpu = copy.deepcopy(program).to(device)  # Module.to moves in place: the program stays on the CPU

        def run(ex):
            """The program on CUDA."""
            with torch.no_grad():
                return [t for t in tree_flatten(on_gpu(*(a.to(device) for a in ex)))[0] if isinstance(t, torch.Tensor)]
        what = f"PyTorch {torch.__version__} FP16 on {torch.cuda.get_device_name(device)}"
    else:
        raise BackendError(f"a PyTorch model is verified on emulate or torch, not {backend!r}")
    out = Verification(variant, what)
    for item, split, ex, ref in zip(inputs, splits, examples, references):
        y = [t.float().cpu().numpy() for t in run(ex)]
        out.rows.append(_row(item, split, y, ref, metrics))
    return out, references


def fix_torch(model, calibration: Sequence[NamedInput] = (), *, plan: RewritePlan | None = None,
              validation: Sequence[NamedInput] = (), target_log2: int = 13, raise_underflow: bool = False,
              fallback: str | None = None, backend: str = "emulate", metrics: Mapping[str, TaskMetric] | None = None,
              compare_naive: bool = True, force: bool = False, source: str | None = None) -> FixResult:
    """:func:`fix_onnx` for a PyTorch module, without leaving PyTorch: calibrate (unless ``plan``),
    rewrite the ``torch.export`` graph, convert it to a typed FP16 program and verify it.

    ``FixResult.fixed`` is the FP16 program (a ``torch.fx.GraphModule`` taking and returning FP32
    tensors); save it with :func:`fp16guard.torch_rewrite.save_program` (``.pt2``).

    Args:
        model: ``torch.nn.Module`` (never modified).
        backend: ``emulate`` (default) or ``torch`` (CUDA); other arguments as :func:`fix_onnx`.

    Raises:
        FixError, PlanError, RewriteError, ExportError, BackendError: as :func:`fix_onnx`,
        :func:`apply_torch` and :func:`verify_torch`.
    """
    from . import torch_rewrite as tr

    if plan is None:
        plan = calibrate_torch(model, calibration, target_log2=target_log2, raise_underflow=raise_underflow,
                               source=source)
    inputs = [*calibration, *validation]
    if not inputs:
        raise FixError("verification needs inputs: give calibration or validation inputs")
    splits = ["calibration"] * len(calibration) + ["validation"] * len(validation)
    examples = tr.examples_of(inputs)
    program, rewritten, notes, conversion = apply_torch(model, plan, examples, fallback=fallback, check_hash=not force)
    verification, refs = verify_torch(model, program, inputs, splits, backend=backend,
                                      variant="fallback" if fallback else "fixed", metrics=metrics)
    naive = None
    if compare_naive:
        captured = tr.annotate(tr.capture(model, examples), examples[0])
        naive, _ = verify_torch(model, tr.to_fp16_program(captured), inputs, splits, backend=backend,
                                variant="naive", metrics=metrics, references=refs)
    result = FixResult(program, rewritten, plan, notes, conversion, verification, naive)
    _refuse_nonfinite(verification, force)
    return result


def _as_onnx(model, inputs: Sequence[NamedInput]) -> tuple[onnx.ModelProto, str, str]:
    """``(onnx model, framework, sha256)``: an ONNX model as is, a PyTorch module exported (with
    every input dimension that differs between ``inputs`` dynamic)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        proto = load_onnx(model)
        return proto, "onnx", sha256_of(proto.SerializeToString())
    from .export import dynamic_dims, export_onnx

    from .torch_rewrite import examples_of, state_dict_sha256

    examples = examples_of(inputs)
    if not examples:
        raise FixError("a PyTorch model needs inputs to be exported to ONNX")
    proto = export_onnx(model, examples[0], dynamic_shapes=dynamic_dims(examples), what=type(model).__name__)
    return proto, "torch", state_dict_sha256(model)


def calibrate(model, calib_inputs, *, target_log2: int = 13, raise_underflow: bool = False,
              source: str | None = None, graph: str | None = None) -> RewritePlan:
    """Calibrate a rewrite plan for an ONNX model or a PyTorch module.

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto`` or ``torch.nn.Module`` (not modified).
        calib_inputs: :class:`~fp16guard.inputs.NamedInput` items, arrays, or tuples of arrays.
        target_log2, raise_underflow, source: see :func:`calibrate_onnx`.
        graph: for a PyTorch module, which graph the plan names: ``"torch"`` (default: its
            ``torch.export`` graph, :func:`calibrate_torch`) or ``"onnx"`` (its ONNX export,
            :func:`fp16guard.export.export_onnx`; input dimensions that differ between the
            calibration inputs are exported as dynamic). Either way ``model_sha256`` hashes the
            module's state_dict.

    Raises:
        FixError, ExportError, ModelLoadError, InputError; ValueError for an unknown ``graph``
        or ``graph="torch"`` with an ONNX model.
    """
    import torch

    from .bisect import _as_inputs

    inputs = _as_inputs(calib_inputs)
    is_torch = isinstance(model, torch.nn.Module)
    if graph not in (None, "torch", "onnx") or (graph == "torch" and not is_torch):
        raise ValueError(f"graph must be 'torch' (PyTorch modules only) or 'onnx', got {graph!r}")
    if is_torch and graph != "onnx":
        return calibrate_torch(model, inputs, target_log2=target_log2, raise_underflow=raise_underflow, source=source)
    proto, framework, digest = _as_onnx(model, inputs)
    plan = calibrate_onnx(proto, inputs, target_log2=target_log2, raise_underflow=raise_underflow,
                          source=source or (type(model).__name__ if framework == "torch" else None))
    plan.model_sha256 = digest
    return plan


def fix_model(model, calib_inputs=(), *, plan: RewritePlan | None = None, validation=(), output: str | None = None,
              **options) -> FixResult:
    """Fix an ONNX model (:func:`fix_onnx`) or a PyTorch module (:func:`fix_torch`, or
    :func:`fix_onnx` on its ONNX export with ``output="onnx"``); ``options`` are their keyword
    arguments.

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto`` or ``torch.nn.Module`` (never modified).
        calib_inputs, validation: arrays, tuples of arrays or ``NamedInput`` items.
        plan: apply this plan instead of calibrating; its ``framework`` picks the rewriter.
        output: for a PyTorch module, ``"torch"`` (an FP16 program; default) or ``"onnx"`` (a
            typed FP16 ONNX model).

    Raises:
        PlanError: ``plan`` was calibrated on another model, or names another graph than ``output``.
        FixError, ExportError, ModelLoadError, InputError, RewriteError: see :func:`fix_onnx`.
    """
    import torch

    from .bisect import _as_inputs

    calibration = _as_inputs(calib_inputs) if len(calib_inputs) else []
    validation = _as_inputs(validation) if len(validation) else []
    is_torch = isinstance(model, torch.nn.Module)
    graph = output or (plan.framework if plan is not None else ("torch" if is_torch else "onnx"))
    if graph not in ("torch", "onnx") or (graph == "torch" and not is_torch):
        raise ValueError(f"output must be 'torch' (PyTorch modules only) or 'onnx', got {graph!r}")
    if plan is not None and plan.framework != graph:
        raise PlanError(f"the plan names the values of a {plan.framework} graph, but the output asked for is "
                        f"{graph}; calibrate again for {graph}")
    if graph == "torch":
        return fix_torch(model, calibration, plan=plan, validation=validation, **options)
    proto, framework, digest = _as_onnx(model, [*calibration, *validation])
    target_log2, raise_underflow = options.pop("target_log2", 13), options.pop("raise_underflow", False)
    if plan is None:
        plan = calibrate(model if framework == "torch" else proto, calibration, graph="onnx",
                         target_log2=target_log2, raise_underflow=raise_underflow, source=options.get("source"))
    elif plan.model_sha256 != digest and not options.get("force"):
        raise PlanError(f"the plan was calibrated on another model ({plan.source}, sha256 "
                        f"{plan.model_sha256[:12]}...); calibrate this one, or force it")
    plan_for_graph = RewritePlan(**{**plan.__dict__, "model_sha256": sha256_of(proto.SerializeToString())})
    result = fix_onnx(proto, calibration, plan=plan_for_graph, validation=validation, **options)
    result.plan = plan
    return result


def fix(model, calib_inputs, **options):
    """Rewrite a model so it runs entirely in FP16, exact in real arithmetic; verify it.

    ``fixed, plan = fp16guard.fix(model, calib_inputs)``: calibrates a plan on ``calib_inputs``,
    folds BatchNorms, folds power-of-two scale regions into the weights, converts to typed FP16
    (FP32 graph inputs and outputs), and verifies it against the FP32 model on the ``emulate``
    backend. See :mod:`fp16guard.fixing`, :func:`fix_onnx` and :func:`fix_torch` for ``options``
    (``validation``, ``target_log2``, ``backend``, ``fallback``, ``metrics``, ``force``,
    ``output``, ...).

    Args:
        model: ``.onnx`` path, ``onnx.ModelProto`` or ``torch.nn.Module`` (never modified).
        calib_inputs: calibration inputs (arrays, tuples of arrays, or ``NamedInput``).

    Returns:
        ``(fixed, plan)``: for an ONNX model the typed FP16 ``onnx.ModelProto``; for a PyTorch
        module the FP16 program, a ``torch.fx.GraphModule`` that takes and returns FP32 tensors
        (``output="onnx"`` gives a ``ModelProto`` instead); and the
        :class:`~fp16guard.plan.RewritePlan` applied.

    Raises:
        FixError: the fixed model still produces inf/NaN in FP16 (pass ``force=True`` to get it).
    """
    result = fix_model(model, calib_inputs, **options)
    return result.fixed, result.plan
