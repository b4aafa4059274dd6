"""``emulate``: strict FP16 on the CPU, the backend CI uses.

Every op output and every weight is rounded through IEEE FP16 (through BF16 in BF16 islands, round to
nearest even, inf beyond 3.39e38); arithmetic runs in FP32. Built on
:func:`fp16guard.fp16_onnx.emulation_model` (a ``Cast(FLOAT16) -> Cast(FLOAT)`` pair after every
FP16 tensor, inside ``If``/``Loop``/``Scan`` subgraphs too) run by ONNX Runtime's CPU EP with every
graph optimization off, so neither ORT's cast elimination nor its FP32 fallback for ops without FP16 kernels can hide an overflow.
``tests/test_backends.py`` checks overflow, subnormals and flush-to-zero against numpy's float16.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from fp16guard.backends.base import Backend, Engine
from fp16guard.fp16_onnx import emulation_model, emulation_session_options


class OrtEngine(Engine):
    """An ONNX Runtime session behind the :class:`Engine` interface."""

    def __init__(self, model: onnx.ModelProto, providers: list, options=None):
        import onnxruntime as ort

        if options is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: ORT warns about every EP it does not use
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the session on the inputs it declares (other keys of ``feeds`` are ignored)."""
        return self.session.run(None, {k: feeds[k] for k in self.input_names if k in feeds})  # optional inputs left out


class EmulateBackend(Backend):
    """Strict FP16 emulation on the CPU (ONNX Runtime, graph optimizations off)."""

    name = "emulate"

    def _build(self, fp16_model: onnx.ModelProto) -> Engine:
        return OrtEngine(emulation_model(fp16_model), ["CPUExecutionProvider"], emulation_session_options())

    def describe(self) -> str:
        """One line naming the method."""
        import onnxruntime as ort

        return (f"emulate: FP16 storage emulated on the CPU (every tensor rounded through IEEE FP16, BF16 "
                f"islands through BF16, FP32 arithmetic), ONNX Runtime {ort.__version__}, graph optimizations off")
