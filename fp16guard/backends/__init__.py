"""FP16 execution backends for the prefix of a bisect: one small interface, four implementations.

=============  =====================================================  =======================
name           what runs the FP16 prefix                              needs
=============  =====================================================  =======================
emulate        ONNX Runtime CPU, every tensor rounded through FP16     nothing (CI's backend)
onnxruntime    ONNX Runtime CUDA EP, real FP16 kernels                 extra ``gpu``, a GPU
torch          the PyTorch prefix in FP16 on CUDA (PyTorch models)     a GPU
tensorrt       a strongly typed TensorRT engine                        extra ``tensorrt``, a GPU
=============  =====================================================  =======================

:func:`get_backend` builds one by name; ``"auto"`` picks tensorrt if importable, else onnxruntime
with CUDA, else emulate. Backends are imported lazily: a missing optional one fails with one line
naming the extra.
"""

from __future__ import annotations

import importlib.util

from fp16guard.backends.base import Backend, Engine, content_hash
from fp16guard.errors import BackendError

BACKENDS = ("emulate", "onnxruntime", "torch", "tensorrt")


def default_backend_name() -> str:
    """``tensorrt`` if importable, else ``onnxruntime`` if its CUDA EP is present, else ``emulate``."""
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    from fp16guard.backends.onnxruntime import cuda_available

    return "onnxruntime" if cuda_available() else "emulate"


def get_backend(name: str = "auto", **options) -> Backend:
    """A backend by name (``auto``, ``emulate``, ``onnxruntime``, ``torch``, ``tensorrt``).

    Args:
        name: the backend, or ``auto`` (see :func:`default_backend_name`).
        options: passed to the backend (e.g. ``allow_cpu=True`` for onnxruntime).

    Raises:
        ValueError: unknown name (the message lists the known ones).
        BackendError / fp16guard.deps.MissingDependencyError: the backend cannot run here.
    """
    if name == "auto":
        name = default_backend_name()
    if name == "emulate":
        from fp16guard.backends.emulate import EmulateBackend

        return EmulateBackend(**options)
    if name == "onnxruntime":
        from fp16guard.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(**options)
    if name == "torch":
        from fp16guard.backends.torch_fp16 import TorchBackend

        return TorchBackend(**options)
    if name == "tensorrt":
        from fp16guard.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(**options)
    raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "BackendError", "Engine", "content_hash", "default_backend_name", "get_backend"]
