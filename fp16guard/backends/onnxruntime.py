"""``onnxruntime``: the typed FP16 prefix on ONNX Runtime's CUDA EP (real FP16 kernels).

Needs ``onnxruntime-gpu`` (extra ``gpu``). The CPU EP is refused for FP16 verdicts unless
``allow_cpu=True``: it has no FP16 kernel for many ops and silently runs them in FP32 after
inserting Casts, and its optimizer removes back-to-back Casts, both of which hide overflow
(``tests/test_fp16_onnx.py`` shows a case). Use the ``emulate`` backend on a CPU.
"""

from __future__ import annotations

import onnx

from fp16guard.backends.base import Backend, Engine
from fp16guard.backends.emulate import OrtEngine
from fp16guard.errors import BackendError


def cuda_available() -> bool:
    """Whether ONNX Runtime here has the CUDA execution provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRuntimeBackend(Backend):
    """Typed FP16 ONNX on ONNX Runtime (CUDA EP).

    Args:
        allow_cpu: run on the CPU EP when CUDA is absent, knowing its verdicts can miss overflow.
        device_id: CUDA device for the CUDA EP.

    Raises:
        BackendError: no CUDA EP and ``allow_cpu`` is False.
    """

    name = "onnxruntime"
    accepts = frozenset({"onnx"})
    device = "cuda"
    subnormals = "kept"  # CUDA's FP16 arithmetic keeps them; the CPU EP computes many ops in FP32

    def __init__(self, *, allow_cpu: bool = False, device_id: int = 0):
        super().__init__()
        if cuda_available():
            # HEURISTIC: cuDNN's exhaustive algorithm search costs seconds per new prefix and shape,
            # and a bisect builds a new prefix every step
            options = {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}
            self.providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        elif allow_cpu:
            self.providers = ["CPUExecutionProvider"]
        else:
            raise BackendError(
                "backend 'onnxruntime' needs the CUDA execution provider (pip install 'fp16guard[gpu]' "
                "on a machine with an NVIDIA GPU). Its CPU EP runs many FP16 ops in FP32 and removes "
                "back-to-back Casts, which hides overflow: use --backend emulate on a CPU, or pass "
                "allow_cpu=True / --allow-cpu to accept that.")

    def _build(self, fp16_model: onnx.ModelProto) -> Engine:
        """A session of ``fp16_model`` on the providers chosen at construction."""
        return OrtEngine(fp16_model, self.providers)

    def describe(self) -> str:
        """One line naming the provider and version."""
        import onnxruntime as ort

        where = "CUDA EP" if self.providers[0] != "CPUExecutionProvider" else "CPU EP (allow_cpu: may hide overflow)"
        return f"onnxruntime {ort.__version__}: typed FP16 ONNX on the {where}"
