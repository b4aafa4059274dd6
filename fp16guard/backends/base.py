"""The backend interface: build an FP16 prefix, run it on arrays, describe yourself."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from fp16guard.onnx_graph import model_sha256


def content_hash(model: onnx.ModelProto) -> str:
    """The engine cache's key: :func:`fp16guard.onnx_graph.model_sha256` of the typed FP16 model."""
    return model_sha256(model)


class Engine(ABC):
    """A built FP16 prefix. ``run`` takes and returns FP32 (or integer) numpy arrays."""

    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once. ``feeds`` maps input names to arrays (extra keys are ignored); returns the
        outputs in ``output_names`` order, as numpy arrays on the host."""


class Backend(ABC):
    """Runs a typed FP16 ONNX prefix (see :func:`fp16guard.fp16_onnx.to_typed_fp16`).

    Subclasses implement :meth:`_build`; :meth:`build` caches engines by content hash, so a cut
    tried twice (``--all``, the boundary check) is built once. ``builds`` counts real builds.
    """

    name = "backend"

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self.builds = 0

    def build(self, fp16_model: onnx.ModelProto) -> Engine:
        """Engine for ``fp16_model`` (built once per distinct model content)."""
        key = content_hash(fp16_model)
        engine = self._engines.get(key)
        if engine is None:
            engine = self._engines[key] = self._build(fp16_model)
            self.builds += 1
        return engine

    @abstractmethod
    def _build(self, fp16_model: onnx.ModelProto) -> Engine:
        ...

    @abstractmethod
    def describe(self) -> str:
        """One line: what runs the FP16 prefix, where (``"emulate: ONNX Runtime CPU, ..."``)."""

    def build_module(self, prefix: Any, example_inputs: Sequence[Any]) -> Engine | None:
        """Engine straight from a PyTorch prefix (``torch.fx.GraphModule``), or None when this
        backend needs ONNX (the default)."""
        return None
