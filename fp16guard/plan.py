"""The rewrite plan: the contract between calibration and every rewriter.

``fp16guard calibrate`` writes it, ``fp16guard fix --plan`` (and the PyTorch and mmdeploy
rewriters) apply it. JSON schema ``fp16guard.plan/1``, documented in ``docs/plan-schema.md``.

A plan names values by the names they have *after* the structural passes (BatchNorm folded,
constants moved to initializers), so applying one re-runs those passes first; the passes are
deterministic, so the names match. ``model_sha256`` ties a plan to the model it was calibrated on.
A human may edit a plan: change a region's exponent, consent to raising a constant, add nodes to
``fallback_fp32``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fp16guard.errors import PlanError
from fp16guard.jsonio import write

SCHEMA = "fp16guard.plan/1"


@dataclass(frozen=True)
class PlanRegion:
    """Activations stored ``2**exponent`` times smaller than their true values.

    Attributes:
        exponent: ``k`` of the factor ``F = 2**k``.
        tensors: the values in the region (names after the structural passes).
        ops: the ops that write them; ``scopes`` their module scopes.
        amax: calibration amax of the true values; ``amax_after`` of the stored values.
        opened_by / closed_by: ops whose constants absorb ``1/F`` (region start) and ``F`` (end).
    """

    exponent: int
    tensors: list[str]
    ops: list[str]
    scopes: list[str]
    amax: float
    amax_after: float
    opened_by: list[str]
    closed_by: list[str]


@dataclass(frozen=True)
class PlanUnderflow:
    """A constant FP16 flushes to zero, and the value it may be raised to.

    Attributes:
        tensor: the constant's name.
        readers: the nodes that read it.
        amax: its largest |x|; ``flushed`` how many nonzero elements round to 0 in FP16.
        raise_to: the smallest FP16 normal, 2**-14 (subnormals may be flushed by some kernels).
        consent: apply the raise (``calibrate --raise-underflow`` or a human edit); it changes the
            model's math, so it is off unless asked.
    """

    tensor: str
    readers: list[str]
    amax: float
    flushed: int
    raise_to: float
    consent: bool = False


@dataclass
class RewritePlan:
    """What to rewrite, decided from calibration.

    Attributes:
        framework: the graph the plan names: ``onnx`` (ONNX values) or ``torch`` (fx nodes of a
            PyTorch module's ``torch.export`` graph); for a PyTorch module ``model_sha256``
            hashes its state_dict.
        source: the model's name (file name or ``package.module:factory``).
        model_sha256: hash of the model file / state_dict the plan was calibrated on.
        target_log2: headroom target, stored magnitudes <= ``2**target_log2``.
        calibration: labels of the calibration inputs.
        fold_batchnorm: fold BatchNorms (always true for a plan made by ``calibrate``).
        regions: the scale regions.
        rescale_ops: explicit multiplies the regions need (``{tensor, exponent, consumer, reason}``).
        underflow: constants FP16 flushes to zero.
        unfixable: values no scale brings into range (``{tensor, nodes, amax, reason}``); their
            nodes stay in FP32 in the fixed model.
        fallback_fp32: for ``fix --fallback fp32`` (the original graph, no rewrite): the nodes to
            keep in FP32 (``{node, reason}``).
        tight: values left unscaled above the target but within 65504 (``{tensor, amax}``).
        modules: PyTorch plans: the exponents at each module's boundary
            (:class:`fp16guard.module_scales.ModuleScale` as JSON), for rewriters that patch
            module ``forward`` functions (mmdeploy).
    """

    framework: str
    source: str
    model_sha256: str
    target_log2: int = 13
    calibration: list[str] = field(default_factory=list)
    fold_batchnorm: bool = True
    regions: list[PlanRegion] = field(default_factory=list)
    rescale_ops: list[dict] = field(default_factory=list)
    underflow: list[PlanUnderflow] = field(default_factory=list)
    unfixable: list[dict] = field(default_factory=list)
    fallback_fp32: list[dict] = field(default_factory=list)
    tight: list[dict] = field(default_factory=list)
    modules: list[dict] = field(default_factory=list)

    @property
    def exponents(self) -> dict[str, int]:
        """tensor -> exponent for every tensor in a region."""
        return {t: r.exponent for r in self.regions for t in r.tensors}

    @property
    def unfixable_nodes(self) -> list[str]:
        """Node names of ``unfixable``, deduplicated (they run in FP32 in the fixed model)."""
        return list(dict.fromkeys(n for entry in self.unfixable for n in entry["nodes"]))

    def to_json(self) -> dict:
        """The ``fp16guard.plan/1`` document."""
        return {"schema": SCHEMA, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write the JSON document (strict JSON, :mod:`fp16guard.jsonio`); returns the path."""
        return write(self.to_json(), path)

    @classmethod
    def from_json(cls, doc: dict) -> "RewritePlan":
        """Parse a ``fp16guard.plan/1`` document.

        Raises:
            PlanError: wrong schema, or a field is missing or malformed.
        """
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise PlanError(f"not a {SCHEMA} plan (schema: {found!r}); make one with `fp16guard calibrate`")
        try:
            body = {k: v for k, v in doc.items() if k != "schema"}
            body["regions"] = [PlanRegion(**r) for r in body.get("regions", [])]
            body["underflow"] = [PlanUnderflow(**u) for u in body.get("underflow", [])]
            plan = cls(**body)
        except TypeError as e:
            raise PlanError(f"malformed {SCHEMA} plan: {e}") from None
        for r in plan.regions:
            if not isinstance(r.exponent, int) or not -64 < r.exponent < 64:
                raise PlanError(f"region exponent must be a small integer, got {r.exponent!r}")
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "RewritePlan":
        """Read a plan file.

        Raises:
            PlanError: the file is missing, not JSON, or not a valid plan.
        """
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan not found: {path}")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not JSON ({e})") from None
        return cls.from_json(doc)
