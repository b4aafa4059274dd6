"""The record of one fix: :class:`FixResult` (schema ``fp16guard.fix/1``) and the outputs it keeps.

What :func:`fp16guard.fixing.pipeline.fix_target` returns, as data: the fixed model, the plan, the
rewrites, the verification rows and what was delivered. Immutable; its rendering is
:mod:`fp16guard.fixing.render`'s, imported when printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fp16guard.compare import Verification
from fp16guard.fixing.notes import RewriteNote
from fp16guard.fp16_onnx import Fp16Conversion
from fp16guard.jsonio import strict
from fp16guard.plan import RewritePlan

FIX_SCHEMA = "fp16guard.fix/1"


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
    """Everything :func:`~fp16guard.fixing.pipeline.fix_target` produced. Immutable: a step that
    changes it makes a new one (``dataclasses.replace``); ``notes`` is a tuple.

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
        target: the :class:`~fp16guard.fixing.targets.FixTarget` ``fixed`` was made from (of the
            submodule, when one was fixed); :meth:`save` writes through it. Not compared, not shown.

    ``fixed, plan = result`` unpacks it as :func:`~fp16guard.fixing.pipeline.fix` returned before;
    ``print(result)`` gives a few lines (verdict with the worst error against the tolerance and the
    FP32 fallback's, the rewrites, the next step), ``rich.print(result)`` the full report of
    ``fp16guard fix``.
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
    target: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "notes", tuple(self.notes))  # a list given (Applied.notes) is frozen too

    def __iter__(self):
        """``fixed, plan = result``: the two values :func:`~fp16guard.fixing.pipeline.fix` used to return."""
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

    def save(self, path: str | Path) -> str:
        """Write ``fixed`` to ``path`` through its target (:meth:`~fp16guard.fixing.targets.FixTarget.save`:
        ``.onnx`` with ``onnx.save``, a PyTorch program as a ``.pt2`` ``ExportedProgram`` whose input
        dimensions that differ between the inputs it was captured with are dynamic); returns the path.

        Raises:
            ExportError: a PyTorch program ``torch.export`` cannot re-capture.
            ValueError: a result built without its target.
        """
        if self.target is None:
            raise ValueError("this FixResult has no target to save through; save result.fixed yourself")
        return self.target.save(self.fixed, path)

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
