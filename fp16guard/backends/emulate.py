"""``emulate``: strict FP16 on the CPU, the backend CI uses; it takes ONNX models and PyTorch programs.

Every op output and every weight is rounded through IEEE FP16 (through BF16 in BF16 islands, round to
nearest even, inf beyond 3.39e38); arithmetic runs in FP32; subnormals are kept (as numpy's float16
stores them). A typed FP16 ONNX model becomes
:func:`fp16guard.fp16_onnx.emulation_model` (a ``Cast(FLOAT16) -> Cast(FLOAT)`` pair after every
FP16 tensor, inside ``If``/``Loop``/``Scan`` subgraphs too), run by ONNX Runtime's CPU EP with every
graph optimization off, so neither ORT's cast elimination nor its FP32 fallback for ops without FP16
kernels can hide an overflow.
A PyTorch FP16 program runs on :func:`fp16guard.backends.torch_program.run_emulated` (each op in FP32 on
its FP16-stored inputs, the result rounded back), the same rounding on ``torch.fx``.
``tests/test_backend_conformance.py`` checks overflow, subnormals and BF16 rounding against numpy.
"""

from __future__ import annotations

import numpy as np
import onnx

from fp16guard.backends.base import Backend, Engine, onnx_input_specs
from fp16guard.fp16_onnx import emulation_model, emulation_session_options


class OrtEngine(Engine):
    """An ONNX Runtime session behind the :class:`Engine` interface.

    Args:
        model: the model the session runs (its declared inputs are the engine's :attr:`inputs`).
        providers: ONNX Runtime execution providers.
        options: ``onnxruntime.SessionOptions`` (default: errors only in the log).
    """

    def __init__(self, model: onnx.ModelProto, providers: list, options=None):
        import onnxruntime as ort

        if options is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only: ORT warns about every EP it does not use
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.inputs = onnx_input_specs(model)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the session on the checked feeds (optional inputs left out)."""
        return self.session.run(None, {k: feeds[k] for k in self.input_names if k in feeds})


class EmulateBackend(Backend):
    """Strict FP16 emulation on the CPU: ONNX Runtime with graph optimizations off for ONNX models,
    :func:`~fp16guard.backends.torch_program.run_emulated` for PyTorch programs."""

    name = "emulate"
    accepts = frozenset({"onnx", "torch"})
    device = "cpu"
    subnormals = "kept"

    def _build(self, fp16_model: onnx.ModelProto) -> Engine:
        """The emulation graph of ``fp16_model`` on ONNX Runtime's CPU EP."""
        return OrtEngine(emulation_model(fp16_model), ["CPUExecutionProvider"], emulation_session_options())

    def _build_program(self, program) -> Engine:
        """``program`` run by :func:`~fp16guard.backends.torch_program.run_emulated` on the CPU."""
        import torch

        from fp16guard.backends.program_engine import ProgramEngine
        from fp16guard.backends.torch_program import run_emulated

        return ProgramEngine(program, lambda *args: run_emulated(program, *args), torch.device("cpu"),
                             f"strict FP16 emulation (PyTorch {torch.__version__}, CPU)")

    def describe(self) -> str:
        """One line naming the method."""
        import onnxruntime as ort

        return (f"emulate: FP16 storage emulated on the CPU (every tensor rounded through IEEE FP16, BF16 "
                f"islands through BF16, FP32 arithmetic), ONNX Runtime {ort.__version__}, graph optimizations off")
