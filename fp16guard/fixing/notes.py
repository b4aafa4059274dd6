"""What a rewrite changed: :class:`RewriteNote`, the rows of ``fp16guard fix``'s report, written by
the ONNX passes (:mod:`fp16guard.fixing.onnx_pass`), the PyTorch passes (:mod:`fp16guard.fixing.torch_pass`)
and the fix targets alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewriteNote:
    """One change a rewrite made.

    Attributes:
        kind: ``constant_to_initializer``, ``fold_affine``, ``fold_batchnorm``,
            ``batchnorm_to_affine``, ``scale``, ``rescale_op``, ``raise_constant``, ``saturate_constant``, ``mask_guard``,
            ``fallback_fp32``, ``float64_to_float32``, ``initializer_inputs``
            (docs/fix-schema.md).
        target: the node (or tensor) changed.
        detail: one sentence.
    """

    kind: str
    target: str
    detail: str

    def to_json(self) -> dict:
        """``{"kind", "target", "detail"}``."""
        return {"kind": self.kind, "target": self.target, "detail": self.detail}
