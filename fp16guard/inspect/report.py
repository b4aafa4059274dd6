"""The inspection report: plain frozen data, shared by the PyTorch and the ONNX inspectors.

A report holds

* ``calls``: one :class:`CallRecord` per call of a module (PyTorch) or per node (ONNX), in execution
  order (the order in which calls *finished*, so a child comes before its parent);
* ``ops``: the same at aten-op level when the op view was on (empty otherwise);
* ``static``: :class:`StaticFinding` for weights, buffers, initializers and folded BatchNorms.

Everything else (per-layer summaries, the from/to transitions, the first non-finite value, the
findings and the exit status) is derived from those on demand. ``to_json`` writes the versioned
schema documented in ``docs/report-schema.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fp16guard.fp16 import FP16_MAX
from fp16guard.jsonio import write
from fp16guard.stats import RangeStats

#: Version tag of :meth:`InspectionReport.to_json`'s output; bumped on any incompatible change.
SCHEMA = "fp16guard.inspect/1"

#: A layer whose amax is within this many bits of 65504 gets a ``near_limit`` warning.
NEAR_LIMIT_BITS = 2.0

#: A layer whose outputs flush at least this fraction of nonzero values to zero gets an
#: ``underflow`` warning (when its inputs did not already).
UNDERFLOW_FRACTION = 0.01

#: ``|finfo(float32).min|``: what an additive attention mask holds at its masked positions
#: (transformers' extended mask, ``(1 - mask) * finfo(float32).min``). An input whose amax is
#: exactly this is taken for such a mask, not for an input beyond FP16 (rule ``attention_mask``).
MASK_MAGNITUDE = float.fromhex("0x1.fffffep+127")

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class CallRecord:
    """Range statistics of one call of one layer.

    Attributes:
        index: position in execution order (0-based, order of completion).
        name: qualified module name (``backbone.layer4.0.conv2``; ``""`` for the root model), ONNX
            node name, or for op records ``<module>::<aten op>``.
        kind: module class name, ONNX op type, or aten op name.
        scope: the module the layer belongs to (for ONNX nodes, parsed from the node name when the
            exporter put it there, e.g. ``/backbone/layer4/conv/Conv`` -> ``backbone.layer4.conv``).
        call: how many times this layer had run before this call (0 for the first call).
        inputs: merged statistics of the floating tensors going in (activations only).
        outputs: merged statistics of the floating tensors coming out.
        leaf: False for container modules (their statistics repeat their children's).
    """

    index: int
    name: str
    kind: str
    scope: str
    call: int
    inputs: RangeStats
    outputs: RangeStats
    leaf: bool = True

    @property
    def transition(self) -> Literal["from", "to"] | None:
        """``"from"`` where an overflow starts (inputs in range, outputs beyond 65504 or non-finite),
        ``"to"`` where it is absorbed (inputs out of range, outputs back in range), else None."""
        if not self.inputs.out_of_range and self.outputs.out_of_range:
            return "from"
        if self.inputs.out_of_range and not self.outputs.out_of_range:
            return "to"
        return None

    @property
    def nonfinite_origin(self) -> bool:
        """True when inf/NaN appears in the outputs although every input was finite."""
        return self.inputs.nonfinite == 0 and self.outputs.nonfinite > 0

    @property
    def underflow_origin(self) -> bool:
        """True when the outputs flush >= 1% of nonzero values to zero and the inputs did not."""
        return (
            self.outputs.flush_to_zero_fraction >= UNDERFLOW_FRACTION
            and self.inputs.flush_to_zero_fraction < UNDERFLOW_FRACTION
        )

    @property
    def display_name(self) -> str:
        """``name``, or ``(model)`` for the root module."""
        return self.name or "(model)"

    def to_json(self) -> dict:
        """JSON-ready dict of this record (schema in ``docs/report-schema.md``)."""
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "scope": self.scope,
            "call": self.call,
            "leaf": self.leaf,
            "transition": self.transition,
            "nonfinite_origin": self.nonfinite_origin,
            "inputs": self.inputs.to_json(),
            "outputs": self.outputs.to_json(),
        }


@dataclass(frozen=True)
class LayerSummary:
    """All calls of one layer merged: the per-layer view of a report.

    Attributes:
        name, kind, scope, leaf: as in :class:`CallRecord`.
        first_index: execution index of the layer's first call (the plotting order).
        calls: number of calls.
        inputs, outputs: statistics merged over every call.
    """

    name: str
    kind: str
    scope: str
    leaf: bool
    first_index: int
    calls: int
    inputs: RangeStats
    outputs: RangeStats

    @property
    def amax(self) -> float:
        """Largest finite magnitude seen at this layer's inputs or outputs."""
        return max(self.inputs.amax, self.outputs.amax)

    @property
    def display_name(self) -> str:
        """``name``, or ``(model)`` for the root module."""
        return self.name or "(model)"


@dataclass(frozen=True)
class StaticFinding:
    """A weight, buffer, initializer or folded BatchNorm whose values do not survive FP16.

    Attributes:
        tensor: parameter/buffer name (``conv2_BN.running_var``) or ONNX initializer/Constant name.
        rule: ``overflow`` (|x| > 65504), ``nonfinite`` (already inf/NaN), ``flush_to_zero``
            (nonzero values below 2**-24), or ``bn_fold`` (a BatchNorm whose folded scale or shift
            does not fit FP16).
        severity: ``error`` when a plain FP16 cast breaks the model, ``warning`` when it is only at
            risk, ``info`` when it is harmless if handled as the reason says.
        count: number of offending elements.
        stats: statistics of the whole tensor.
        reason: one sentence a user can act on.
        layer: the module or node that uses the tensor, when known.
        extra: rule-specific numbers (for ``bn_fold``: ``scale_amax``, ``shift_amax``, ...).
    """

    tensor: str
    rule: str
    severity: Severity
    count: int
    stats: RangeStats
    reason: str
    layer: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON-ready dict of this finding."""
        return {
            "tensor": self.tensor,
            "rule": self.rule,
            "severity": self.severity,
            "count": self.count,
            "layer": self.layer,
            "reason": self.reason,
            "stats": self.stats.to_json(),
            "extra": self.extra,
        }


@dataclass(frozen=True)
class Finding:
    """One thing the report says about an activation, with the rule that produced it.

    Attributes:
        rule: ``overflow_from``, ``overflow_to``, ``nonfinite_origin``, ``near_limit``,
            ``underflow``, ``input_overflow`` (the model's input beyond 65504), ``input_nonfinite``
            (its input holds inf/NaN), ``attention_mask`` (an input of exactly
            ``|finfo(float32).min|``: an additive attention mask, see :data:`MASK_MAGNITUDE`).
        severity: ``error`` for an overflow or inf/NaN origin, ``info`` for an attention mask,
            ``warning`` otherwise.
        name, kind, index: the layer (see :class:`CallRecord`).
        reason: one sentence with the numbers behind the finding.
    """

    rule: str
    severity: Severity
    name: str
    kind: str
    index: int
    reason: str

    def to_json(self) -> dict:
        """JSON-ready dict of this finding."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class InspectionReport:
    """What an inspection found. Built by :class:`fp16guard.FInspect` or :func:`inspect_onnx`.

    Attributes:
        source: what was inspected (a model class, a file path).
        calls: module/node-level records in execution order.
        ops: aten-op-level records (empty unless the op view was on).
        static: findings of the static weight check.
        inputs: a short description of each input the model ran on.
        mode: how the forwards ran (PyTorch: eager, or CUDA-graph replays, see
            :attr:`fp16guard.FInspect.mode`; ONNX: the inspector's runtime); empty if unknown.
    """

    source: str
    calls: tuple[CallRecord, ...] = ()
    ops: tuple[CallRecord, ...] = ()
    static: tuple[StaticFinding, ...] = ()
    inputs: tuple[str, ...] = ()
    mode: str = ""

    # -- derived views -------------------------------------------------------------------------
    def layers(self, *, leaves_only: bool = False) -> list[LayerSummary]:
        """One :class:`LayerSummary` per layer, in order of first call."""
        groups: dict[str, list[CallRecord]] = {}
        for rec in self.calls:
            groups.setdefault(rec.name, []).append(rec)
        out = [
            LayerSummary(
                name=recs[0].name,
                kind=recs[0].kind,
                scope=recs[0].scope,
                leaf=recs[0].leaf,
                first_index=recs[0].index,
                calls=len(recs),
                inputs=RangeStats.merge(r.inputs for r in recs),
                outputs=RangeStats.merge(r.outputs for r in recs),
            )
            for recs in groups.values()
        ]
        if leaves_only:
            out = [s for s in out if s.leaf]
        return sorted(out, key=lambda s: s.first_index)

    def worst(self, n: int = 10) -> list[LayerSummary]:
        """The ``n`` leaf layers with the largest output amax (non-finite first)."""
        layers = self.layers(leaves_only=True)
        return sorted(layers, key=lambda s: (s.outputs.nonfinite > 0, s.outputs.amax), reverse=True)[:n]

    def transitions(self, *, level: Literal["calls", "ops"] = "calls") -> list[CallRecord]:
        """Records flagged ``from`` or ``to``, in execution order."""
        return [r for r in getattr(self, level) if r.transition is not None]

    def first_nonfinite(self, *, level: Literal["calls", "ops"] = "calls") -> CallRecord | None:
        """The first record, in execution order, whose outputs hold inf/NaN from finite inputs."""
        return next((r for r in getattr(self, level) if r.nonfinite_origin), None)

    @property
    def peak(self) -> CallRecord | None:
        """The call with the largest finite output amax."""
        return max(self.calls, key=lambda r: r.outputs.amax, default=None)

    def findings(self) -> list[Finding]:
        """Activation findings, in execution order; one per layer and rule (first call wins)."""
        seen: set[tuple[str, str]] = set()
        out: list[Finding] = []

        def add(rule: str, severity: Severity, rec: CallRecord, reason: str) -> None:
            """Record a finding, once per layer and rule."""
            if (rec.name, rule) not in seen:
                seen.add((rec.name, rule))
                out.append(Finding(rule, severity, rec.display_name, rec.kind, rec.index, reason))

        produced_overflow = False  # has any layer so far written a value beyond 65504?
        produced_nonfinite = False  # ... or an inf/NaN?
        mask_seen = False  # an attention mask is reported once, where it first comes in
        for rec in self.calls:
            i, o = rec.inputs, rec.outputs
            if i.nonfinite and not produced_nonfinite:
                add("input_nonfinite", "error", rec,
                    f"inputs hold {i.nonfinite} inf/NaN values and no layer before wrote one: the model's input is "
                    f"not finite, so neither FP32 nor FP16 results on it mean anything (clean the input; an "
                    f"additive attention mask holding -inf shows here too: inf and NaN are counted together)")
            produced_nonfinite |= bool(o.nonfinite)
            if i.overflows and not produced_overflow and i.amax == MASK_MAGNITUDE:
                if not mask_seen:  # the hooks keep only the largest magnitude, not how many values hold it
                    add("attention_mask", "info", rec,
                        "inputs reach exactly |finfo(float32).min| = 3.403e+38, the value of an additive attention "
                        "mask at masked positions, made inside the model: a mask, not an input beyond FP16; "
                        "`fp16guard fix` rewrites it to -2^15, within FP16's range (only the largest magnitude "
                        "is recorded, so a value beyond 65504 beside the mask would not show here)")
                mask_seen = True
            elif i.overflows and not produced_overflow:
                add("input_overflow", "error", rec,
                    f"inputs reach amax {i.amax:.4g}, beyond 65504, and no layer before wrote such a value: the "
                    f"model's input exceeds FP16 (normalize it, or `fp16guard fix` scales it before the input cast)")
            produced_overflow |= o.overflows
            if rec.nonfinite_origin:
                add("nonfinite_origin", "error", rec,
                    f"{o.nonfinite} inf/NaN values out of finite inputs (input amax {i.amax:.4g})")
            if rec.transition == "from":
                add("overflow_from", "error", rec,
                    f"inputs in range (amax {i.amax:.4g}), outputs beyond 65504 (amax {o.amax:.4g})")
            elif rec.transition == "to":
                add("overflow_to", "warning", rec,
                    f"inputs beyond 65504 (amax {i.amax:.4g}), outputs back in range (amax {o.amax:.4g})")
            elif rec.leaf and not o.out_of_range and o.headroom < NEAR_LIMIT_BITS:
                add("near_limit", "warning", rec,
                    f"output amax {o.amax:.4g} = {o.amax / FP16_MAX:.2f}x the FP16 limit "
                    f"({o.headroom:.2f} bits of headroom)")
            if rec.leaf and rec.underflow_origin:
                add("underflow", "warning", rec,
                    f"{o.flush_to_zero_fraction:.1%} of nonzero outputs flush to zero in FP16 (|x| < 2^-24)")
        return out

    @property
    def overflow_found(self) -> bool:
        """True when an activation overflows or turns non-finite, or a static error was found.

        This is the CLI's exit status 1.
        """
        return any(f.severity == "error" for f in self.findings()) or any(
            s.severity == "error" for s in self.static
        )

    # -- display -------------------------------------------------------------------------------
    # ``print(report)`` (a few lines: what ran, the verdict by cause, the peak, the next step) and
    # ``rich.print(report)`` (the full report) are the renderer's: the package attaches them
    # (fp16guard/inspect/__init__.py), so this data module imports no renderer.
    def __repr__(self) -> str:
        return (f"InspectionReport(source={self.source!r}, inputs={len(self.inputs)}, calls={len(self.calls)}, "
                f"static={len(self.static)}, overflow_found={self.overflow_found})")

    # -- serialisation -------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The report as a JSON-ready dict, schema :data:`SCHEMA` (``docs/report-schema.md``)."""
        peak = self.peak
        return {
            "schema": SCHEMA,
            "source": self.source,
            "inputs": list(self.inputs),
            "mode": self.mode,
            "fp16_max": FP16_MAX,
            "overflow_found": self.overflow_found,
            "summary": {
                "layers": len(self.layers()),
                "calls": len(self.calls),
                "peak": None if peak is None else {
                    "name": peak.name, "kind": peak.kind, "amax": peak.outputs.amax,
                    "fraction_of_limit": peak.outputs.amax / FP16_MAX,
                    "headroom": None if math.isinf(peak.outputs.headroom) else peak.outputs.headroom,
                },
                "first_nonfinite": None if (r := self.first_nonfinite()) is None else r.name,
            },
            "findings": [f.to_json() for f in self.findings()],
            "static": [s.to_json() for s in self.static],
            "calls": [r.to_json() for r in self.calls],
            "ops": [r.to_json() for r in self.ops],
        }

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (strict JSON, :mod:`fp16guard.jsonio`); returns the path."""
        return write(self.to_json(), path)
