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

#: The headroom target's default: stored activations at most ``2**13 = 8192``, 3 bits below 65504
#: (``calibrate``, ``fix``, ``--target-log2`` and the solver all default to it).
DEFAULT_TARGET_LOG2 = 13


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


@dataclass(frozen=True)
class RewritePlan:
    """What to rewrite, decided from calibration. Immutable: a changed plan is a new one
    (``dataclasses.replace``).

    Attributes:
        framework: the graph the plan names: ``onnx`` (ONNX values) or ``torch`` (fx nodes of a
            PyTorch module's ``torch.export`` graph); for a PyTorch module ``model_sha256``
            hashes its state_dict.
        source: the model's name (file name or ``package.module:factory``).
        model_sha256: hash of the model file / state_dict the plan was calibrated on.
        target_log2: headroom target, stored magnitudes <= ``2**target_log2``.
        calibration: labels of the calibration inputs.
        regions: the scale regions.
        rescale_ops: explicit multiplies the regions need (``{tensor, exponent, consumer, reason}``).
        underflow: constants FP16 flushes to zero.
        unfixable: values no scale brings into range (``{tensor, nodes, amax, reason}``); their
            nodes stay in FP32 in the fixed model.
        fallback_fp32: for ``fix --fallback fp32`` (the original graph, no rewrite): the nodes to
            keep in FP32 (``{node, reason}``).
        tight: values left unscaled above the target but within 65504 (``{tensor, amax}``).
        modules: PyTorch plans: the exponents at each module's boundary
            (:class:`fp16guard.fixing.module_scales.ModuleScale` as JSON), for rewriters that patch
            module ``forward`` functions (mmdeploy).
    """

    framework: str
    source: str
    model_sha256: str
    target_log2: int = DEFAULT_TARGET_LOG2
    calibration: list[str] = field(default_factory=list)
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
        """Parse a ``fp16guard.plan/1`` document, every field checked against the schema
        (:data:`PLAN_FIELDS`, docs/plan-schema.md); ``"inf"``/``"nan"`` strings read as floats
        (:mod:`fp16guard.jsonio`).

        Raises:
            PlanError: wrong schema, or a field missing, unknown, of the wrong type or out of range
                (the message names it, e.g. ``unfixable[0].nodes``).
        """
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise PlanError(f"not a {SCHEMA} plan (schema: {found!r}); make one with `fp16guard calibrate`")
        body = _checked({k: v for k, v in doc.items() if k != "schema" and k not in RETIRED_FIELDS}, PLAN_FIELDS, "")
        body["regions"] = [PlanRegion(**r) for r in body.get("regions", [])]
        body["underflow"] = [PlanUnderflow(**u) for u in body.get("underflow", [])]
        return cls(**body)

    @classmethod
    def load(cls, path: str | Path) -> "RewritePlan":
        """Read a plan file (UTF-8 JSON, as :meth:`save` writes it).

        Raises:
            PlanError: the file is missing or unreadable, not UTF-8 text (UTF-16, a binary file),
                not JSON, or not a valid plan (:meth:`from_json`); the message starts with the path.
        """
        path = Path(path)
        if path.is_dir():
            raise PlanError(f"{path} is a folder; give the plan's JSON file")
        if not path.is_file():
            raise PlanError(f"plan not found: {path}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PlanError(f"{path}: cannot read the plan ({e.strerror})") from None
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise PlanError(f"{path}: the plan is UTF-16 text; save it as UTF-8 (as `fp16guard calibrate` writes it)")
        bad = data.find(b"\x00")  # UTF-16 without a byte-order mark, or a binary file
        if bad < 0:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                bad = e.start
        if bad >= 0:
            raise PlanError(f"{path}: not UTF-8 text (byte {bad} is {data[bad]:#04x}: a binary file, or text in "
                            f"another encoding); give the UTF-8 JSON plan `fp16guard calibrate` writes")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not JSON ({e})") from None
        try:
            return cls.from_json(doc)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None


# ---------------------------------------------------------------- the schema, checked at load

# A spec is a type (``str``, ``int``, ``bool``, :data:`NUMBER`), ``[spec]`` (a list of items that
# match spec), or an object's fields, ``{field: spec}`` (required) or ``{field: (spec, default)}``.

#: A JSON number: an int or float (not a bool), or jsonio's ``"inf"``, ``"-inf"``, ``"nan"``.
NUMBER = "number"
_REASON = (str, "")  # optional: an entry added by hand may leave its reason out
REGION_FIELDS = {"exponent": int, "tensors": [str], "ops": [str], "scopes": [str], "amax": NUMBER,
                 "amax_after": NUMBER, "opened_by": [str], "closed_by": [str]}
RESCALE_FIELDS = {"tensor": str, "exponent": int, "consumer": str, "reason": _REASON}
UNDERFLOW_FIELDS = {"tensor": str, "readers": [str], "amax": NUMBER, "flushed": int, "raise_to": NUMBER,
                    "consent": (bool, False)}
UNFIXABLE_FIELDS = {"tensor": str, "nodes": [str], "amax": NUMBER, "reason": _REASON}
FALLBACK_FIELDS = {"node": str, "reason": _REASON}
TIGHT_FIELDS = {"tensor": str, "amax": NUMBER}
MODULE_FIELDS = {"module": str, "type": str, "fingerprint": str, "input_exponent": int, "output_exponent": int,
                 "inner_exponent": (int, 0), "input_amax": (NUMBER, 0.0)}
#: Every field of a ``fp16guard.plan/1`` document but ``schema`` (docs/plan-schema.md).
PLAN_FIELDS = {"framework": str, "source": str, "model_sha256": str, "target_log2": (int, DEFAULT_TARGET_LOG2),
               "calibration": ([str], []), "regions": ([REGION_FIELDS], []),
               "rescale_ops": ([RESCALE_FIELDS], []), "underflow": ([UNDERFLOW_FIELDS], []),
               "unfixable": ([UNFIXABLE_FIELDS], []), "fallback_fp32": ([FALLBACK_FIELDS], []),
               "tight": ([TIGHT_FIELDS], []), "modules": ([MODULE_FIELDS], [])}
#: Fields older plans wrote and nothing reads any more: accepted, whatever their value, and dropped
#: (``fold_batchnorm``: BatchNorms are always folded).
RETIRED_FIELDS = frozenset({"fold_batchnorm"})
#: Range checks after the types: ``field name -> (test, what to give)``.
_RANGES = {
    "framework": (lambda v: v in ("onnx", "torch"), "'onnx' or 'torch'"),
    "target_log2": (lambda v: 1 <= v <= 15, "an integer from 1 to 15"),
    "exponent": (lambda v: -64 < v < 64, "a small integer (-63 to 63)"),
    "flushed": (lambda v: v >= 0, "a count, 0 or more"),
    "raise_to": (lambda v: 0 < v < float("inf"), "a positive number"),
}


def _kind(spec) -> str:
    """How a message names what ``spec`` wants."""
    if isinstance(spec, list):
        return "a list of " + ("objects" if isinstance(spec[0], dict) else _NAMES[spec[0]] + "s")
    if isinstance(spec, dict):
        return "an object"
    return "true or false" if spec is bool else ("an " if spec is int else "a ") + _NAMES[spec]


_NAMES = {str: "string", int: "integer", bool: "boolean", NUMBER: "number"}


def _checked(value, spec, where: str):
    """``value`` checked against ``spec`` (see :data:`PLAN_FIELDS`), numbers as floats and optional
    fields filled in; ``where`` is its place in the document (``unfixable[0].nodes``).

    Raises:
        PlanError: naming ``where``, what it must be and what it is.
    """
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise PlanError(f"{where or 'the plan'} must be {_kind(spec)}, got {_shown(value)}; {_FIX}")
        unknown = sorted(set(value) - set(spec))
        if unknown:
            raise PlanError(f"{_at(where, unknown[0])} is not a field of a {SCHEMA} plan here (the fields: "
                            f"{', '.join(spec)}); remove it")
        out = {}
        for name, field_spec in spec.items():
            optional = isinstance(field_spec, tuple)
            inner = field_spec[0] if optional else field_spec
            if name not in value:
                if not optional:
                    raise PlanError(f"{_at(where, name)} is missing; {_FIX}")
                out[name] = list(field_spec[1]) if isinstance(field_spec[1], list) else field_spec[1]
                continue
            out[name] = _checked(value[name], inner, _at(where, name))
        return out
    if isinstance(spec, list):
        if not isinstance(value, (list, tuple)):  # a tuple: a plan written in a Python deploy config
            raise PlanError(f"{where} must be {_kind(spec)}, got {_shown(value)}; {_FIX}")
        return [_checked(v, spec[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if spec is NUMBER:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or value in ("inf", "-inf", "nan")
        value = float(value) if ok else value
    else:
        ok = isinstance(value, spec) and (spec is bool or not isinstance(value, bool))
    if not ok:
        raise PlanError(f"{where} must be {_kind(spec)}, got {_shown(value)}; {_FIX}")
    test = _RANGES.get(where.rsplit(".", 1)[-1])
    if test is not None and not test[0](value):
        raise PlanError(f"{where} must be {test[1]}, got {_shown(value)}; {_FIX}")
    return value


_FIX = "correct it (docs/plan-schema.md) or calibrate again with `fp16guard calibrate`"


def _at(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _shown(value) -> str:
    """A short form of a JSON value for a message: its JSON text, or its type when long."""
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else f"{type(value).__name__} {text[:37]}..."
