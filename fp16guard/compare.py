"""Comparing FP16 outputs with an FP32 reference: the one error measure, task metrics, and the
verification rows every stage reports (the shape of Polygraphy's comparator: one row per input,
worst error over outputs).

Used by bisect (is this cut good?), the fix (is the fixed model right?) and the mmdeploy export
check.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from fp16guard.errors import UsageError, first_line
from fp16guard.fp16 import DEFAULT_TOLERANCE  # noqa: F401 - defined with the other thresholds; named here too

#: The bar a written model must meet (issue 24), relative to what FP16 can do for this model: on
#: every input its relative L2 error may reach ``BAR_FACTOR`` times the FP32 fallback's (the
#: offending ops in FP32, what other tools give) plus ``BAR_ROUNDOFF``, two units of FP16 roundoff
#: (2^-11 each), below which two correct FP16 graphs differ by rounding alone; a task metric
#: (higher is better) may be lower than the fallback's by at most ``TASK_MARGIN`` of its magnitude.
#: An absolute tolerance neither accepts nor refuses: a model whose own FP16 floor is above it is
#: written with a note (:func:`floor_note`).
BAR_FACTOR, BAR_ROUNDOFF, TASK_MARGIN = 1.5, 2.0**-10, 0.01

#: A task metric or error measure: ``metric(outputs, reference) -> float`` on lists of numpy arrays
#: in the model's output order. Bisect reads it as an error (lower is better, :func:`relative_l2`);
#: the fix reports task metrics (higher is better, e.g. mask IoU).
Metric = Callable[[list[np.ndarray], list[np.ndarray]], float]


def relative_l2(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Worst relative L2 error over outputs: ``max_i ||y_i - r_i||_2 / ||r_i||_2`` (dimensionless).

    Float outputs are compared in float64; integer/bool outputs must match exactly (else inf).
    A non-finite value where the reference is finite gives inf. Shapes must match (else inf).
    """
    worst = 0.0
    for y, r in zip(outputs, reference):
        y, r = np.asarray(y), np.asarray(r)
        if y.shape != r.shape:
            return math.inf
        if not np.issubdtype(r.dtype, np.floating):
            if not np.array_equal(y, r):
                return math.inf
            continue
        y64, r64 = y.astype(np.float64), r.astype(np.float64)
        finite_ref = np.isfinite(r64)
        if np.any(~np.isfinite(y64) & finite_ref):
            return math.inf
        diff = np.where(finite_ref, y64 - r64, 0.0)
        norm = float(np.linalg.norm(np.where(finite_ref, r64, 0.0)))
        err = float(np.linalg.norm(diff)) / max(norm, 1e-30)
        worst = max(worst, err)
    return worst


def load_metric(spec: str) -> Metric:
    """``package.module:function`` -> the function (``metric(outputs, reference) -> float``).

    Raises:
        UsageError: the spec is malformed, or the module/function cannot be imported or called.
    """
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UsageError(f"--metric {spec!r}: give package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--metric {spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise UsageError(f"--metric {spec!r} is not callable")
    return fn


def checked_metric(name: str, fn: Metric) -> Metric:
    """``fn`` wrapped so that a task metric's own failure reads as one line naming it.

    The wrapper returns ``float(fn(outputs, reference))``; a NaN score counts as the worst (inf), so
    a metric that cannot score FP16 garbage calls it bad.

    Raises:
        UsageError: ``fn`` raised, or returned something that is not a real number (a string, None,
            an array of several values).
    """
    def call(outputs, reference):
        """``fn(outputs, reference)`` as a float (NaN -> inf); its failures as :class:`UsageError`."""
        try:
            value = fn(outputs, reference)
        except Exception as e:  # the user's metric failed: say so, in its own words
            raise UsageError(f"--metric {name} raised {type(e).__name__}: {first_line(e)}; fix the metric") from None
        try:
            score = float(np.asarray(value).item()) if not isinstance(value, (str, bytes, bool)) else None
        except (TypeError, ValueError):
            score = None
        if score is None:
            raise UsageError(f"--metric {name} returned {type(value).__name__} ({str(value)[:40]!r}); it must "
                             f"return one float, larger = worse")
        return math.inf if math.isnan(score) else score

    call.__name__ = getattr(fn, "__name__", name)
    return call


def compare_outputs(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[float, float, int]:
    """``(worst relative L2, max |error|, non-finite count)`` of outputs against an FP32 reference
    (non-finite elements excluded from the two errors; relative L2 is inf when any exists). An
    output whose shape differs from the reference's (a data-dependent count, such as the boxes
    above a score threshold) gives relative L2 and max |error| inf and adds no non-finite count."""
    max_abs, nonfinite = 0.0, 0
    for y, r in zip(outputs, reference):
        y64, r64 = np.asarray(y, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if y64.shape != r64.shape:
            max_abs = math.inf
            continue
        bad = ~np.isfinite(y64) & np.isfinite(r64)
        nonfinite += int(bad.sum())
        ok = np.isfinite(y64) & np.isfinite(r64)
        if ok.any():
            max_abs = max(max_abs, float(np.abs(y64[ok] - r64[ok]).max()))
    return relative_l2(list(outputs), list(reference)), max_abs, nonfinite


@dataclass(frozen=True)
class VerifyRow:
    """A model variant against the FP32 original on one input.

    Attributes:
        label: the input; ``split`` ``calibration`` or ``validation``.
        rel_l2: worst relative L2 error over outputs; ``max_abs`` largest absolute error (output units).
        nonfinite: count of inf/NaN output elements where FP32 is finite.
        task: task metric scores by name (higher is better).
    """

    label: str
    split: str
    rel_l2: float
    max_abs: float
    nonfinite: int
    task: dict[str, float] = field(default_factory=dict)

    @classmethod
    def measure(cls, label: str, split: str, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray],
                metrics: Mapping[str, Metric] | None = None) -> "VerifyRow":
        """The row of ``outputs`` against ``reference``: :func:`compare_outputs` and every task metric."""
        rel, mx, nf = compare_outputs(outputs, reference)
        task = {k: float(fn(list(outputs), list(reference))) for k, fn in (metrics or {}).items()}
        return cls(label, split, rel, mx, nf, task)


@dataclass
class Verification:
    """One model variant verified on every input.

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
        """Plain-JSON form (non-finite errors stay floats; :mod:`fp16guard.jsonio` writes them)."""
        return {"variant": self.variant, "backend": self.backend, "finite": self.finite,
                "rows": [asdict(r) for r in self.rows]}


def misses_bar(candidate: Verification, reference: Verification | None, tolerance: float | None = None) -> str | None:
    """Why ``candidate`` misses the bar that ``reference`` (the FP32 fallback) sets, or None.

    Per input: inf/NaN where FP32 is finite misses; a relative L2 error above ``BAR_FACTOR x``
    the reference's ``+ BAR_ROUNDOFF`` misses, and so does one above ``tolerance`` where the
    reference is within it (the accuracy asked for is reachable); a task metric below the
    reference's by more than ``TASK_MARGIN`` of its magnitude misses. Where the reference is
    missing or not finite on an input, ``tolerance`` (if given) bounds the error there instead.
    An error above ``tolerance`` where the reference is above it too is the model's own FP16
    floor: not a miss (:func:`floor_note` says it).

    Returns:
        One sentence naming the input, the numbers and the reference, or None.
    """
    for i, row in enumerate(candidate.rows):
        if row.nonfinite:
            return f"the {candidate.variant} model gives {row.nonfinite} inf/NaN output value(s) on {row.label}"
        ref = reference.rows[i] if reference is not None and i < len(reference.rows) else None
        if ref is None or ref.nonfinite or not math.isfinite(ref.rel_l2):
            if tolerance is not None and row.rel_l2 > tolerance:
                return (f"the {candidate.variant} model's relative L2 error on {row.label} is {row.rel_l2:.3g}, above "
                        f"the tolerance {tolerance:g}")
            continue
        bound = BAR_FACTOR * ref.rel_l2 + BAR_ROUNDOFF
        if tolerance is not None and row.rel_l2 > tolerance >= ref.rel_l2:
            return (f"the {candidate.variant} model's relative L2 error on {row.label} is {row.rel_l2:.3g}, above the "
                    f"tolerance {tolerance:g}, which the {reference.variant} model meets ({ref.rel_l2:.3g})")
        if row.rel_l2 > bound:
            return (f"the {candidate.variant} model's relative L2 error on {row.label} is {row.rel_l2:.3g}, above "
                    f"{BAR_FACTOR:g} x the {reference.variant} model's {ref.rel_l2:.3g} + 2^-10 = {bound:.3g}")
        for name, score in row.task.items():
            theirs = ref.task.get(name)
            if theirs is not None and math.isfinite(theirs) and score < theirs - TASK_MARGIN * max(abs(theirs), 1e-12):
                return (f"the {candidate.variant} model's {name} on {row.label} is {score:.4g}, below the "
                        f"{reference.variant} model's {theirs:.4g} by more than {TASK_MARGIN:.0%}")
    return None


def floor_note(written: Verification, reference: Verification | None, tolerance: float | None) -> str | None:
    """One line when the written model's error is above ``tolerance`` on some input though it met
    the bar: the model's own FP16 floor (the fallback's error) is above the tolerance; else None."""
    if tolerance is None:
        return None
    worst = max(written.rows, key=lambda r: r.rel_l2, default=None)
    if worst is None or worst.rel_l2 <= tolerance:
        return None
    i = written.rows.index(worst)
    theirs = reference.rows[i].rel_l2 if reference is not None and i < len(reference.rows) else None
    said = f" (the {reference.variant} model's {theirs:.3g})" if theirs is not None else ""
    return (f"this model's FP16 floor is above the tolerance {tolerance:g}: worst relative L2 error {worst.rel_l2:.3g} "
            f"on {worst.label}{said}; written, as the FP32 fallback does no better (a --metric judges the task)")
