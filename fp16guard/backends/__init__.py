"""FP16 execution backends: one table of rows, one interface (:class:`Backend`), a lazy import per row.

:data:`BACKEND_TABLE` maps each name to a :class:`BackendSpec`: the class (a dotted path, imported
only when the backend is asked for), the models it builds (``accepts``), where it runs, and one
line saying what it is. :func:`get_backend` is a look-up in it; the command line reads its names,
its help and its compatibility rules (``--backend torch`` with an ``.onnx``) from it too.

=============  ===============  ======  ==============================================================
name           accepts          device  what runs the FP16 model
=============  ===============  ======  ==============================================================
emulate        onnx, torch      cpu     strict FP16 emulation: every tensor rounded through FP16
onnxruntime    onnx             cuda    ONNX Runtime's CUDA EP, real FP16 kernels (extra ``gpu``)
torch          torch            cuda    PyTorch's FP16 kernels on CUDA
tensorrt       onnx             cuda    a strongly typed TensorRT engine (extra ``tensorrt``)
=============  ===============  ======  ==============================================================

``accepts``: ``"onnx"`` is a typed FP16 ``onnx.ModelProto``
(:func:`fp16guard.fp16_onnx.to_typed_fp16`); ``"torch"`` a PyTorch FP16 program, a
``torch.fx.GraphModule`` that takes and returns FP32 tensors and computes in FP16 inside
(:func:`fp16guard.fixing.torch_pass.to_fp16_program`, or a bisect prefix made one by
:func:`fp16guard.backends.torch_program.half_program`).

``"auto"`` picks tensorrt if importable, else onnxruntime with CUDA, else emulate
(:func:`default_backend_name`). Adding a backend is one class and one row: ``docs/backends.md``.

This module imports nothing heavy (the command line's ``--help`` reads the table); :class:`Backend`,
:class:`Engine` and :func:`content_hash` are imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fp16guard.errors import BackendError, MissingDependencyError

if TYPE_CHECKING:
    from fp16guard.backends.base import Backend, Engine, InputSpec, content_hash  # noqa: F401

#: What a backend can build: a typed FP16 ONNX model, or a PyTorch FP16 program.
MODEL_KINDS = ("onnx", "torch")


@dataclass(frozen=True)
class BackendSpec:
    """One row of :data:`BACKEND_TABLE`.

    Attributes:
        path: ``"package.module:Class"``, the :class:`Backend` subclass (imported by :meth:`load`).
        accepts: the models it builds, a subset of :data:`MODEL_KINDS`; must equal the class's
            ``accepts`` (``tests/test_backend_conformance.py`` checks it).
        device: where it runs, ``"cpu"`` or ``"cuda"``; must equal the class's ``device``.
        description: one line saying what runs the model (the docs' table of backends).
        extra: the pip extra that installs what it needs, named when its import fails (None: none).
    """

    path: str
    accepts: frozenset
    device: str
    description: str
    extra: str | None = None

    def load(self, name: str | None = None) -> type:
        """The backend class (``name``: the row's, for the message).

        Raises:
            MissingDependencyError: its module imports a package that is not installed; one line
                naming the pip extra.
        """
        module, _, attr = self.path.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            extra = f"pip install 'fp16guard[{self.extra}]'" if self.extra else "pip install fp16guard"
            raise MissingDependencyError(f"{e.name or module} is needed for the backend {name or self.path} but is "
                                         f"not installed: {extra}") from None


#: Every backend by name, in the order ``--help`` lists them.
BACKEND_TABLE: dict[str, BackendSpec] = {
    "emulate": BackendSpec("fp16guard.backends.emulate:EmulateBackend", frozenset({"onnx", "torch"}), "cpu",
                           "strict FP16 emulation on the CPU, every tensor rounded through FP16 (CI's backend)"),
    "onnxruntime": BackendSpec("fp16guard.backends.onnxruntime:OnnxRuntimeBackend", frozenset({"onnx"}), "cuda",
                               "ONNX Runtime's CUDA EP, real FP16 kernels", extra="gpu"),
    "torch": BackendSpec("fp16guard.backends.torch_fp16:TorchBackend", frozenset({"torch"}), "cuda",
                         "PyTorch's FP16 kernels on CUDA"),
    "tensorrt": BackendSpec("fp16guard.backends.tensorrt:TensorRTBackend", frozenset({"onnx"}), "cuda",
                            "a strongly typed TensorRT engine", extra="tensorrt"),
}

#: The backend names (kept for callers of earlier releases; the table is the source).
BACKENDS = tuple(BACKEND_TABLE)


def accepting(kind: str) -> tuple[str, ...]:
    """Names of the backends that build a model of ``kind`` (``"onnx"`` or ``"torch"``), in table order."""
    return tuple(name for name, spec in BACKEND_TABLE.items() if kind in spec.accepts)


def either(names) -> str:
    """``"a, b or c"``: names joined as a sentence lists alternatives."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def help_text(words: dict[str, str]) -> str:
    """Every row as ``name (DEVICE)`` for ``--help``, with ``; no X`` for each kind of model it does
    not take (``words``: how the command names each kind it reads, e.g. ``{"onnx": ".onnx"}``)."""
    parts = []
    for name, spec in BACKEND_TABLE.items():
        missing = "".join(f"; no {word}" for kind, word in words.items() if kind not in spec.accepts)
        parts.append(f"{name} ({spec.device.upper()}{missing})")
    return ", ".join(parts)


def default_backend_name() -> str:
    """``tensorrt`` if importable, else ``onnxruntime`` if its CUDA EP is present, else ``emulate``."""
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    from fp16guard.backends.onnxruntime import cuda_available

    return "onnxruntime" if cuda_available() else "emulate"


def get_backend(name: str = "auto", **options) -> Backend:
    """A backend by name: a row of :data:`BACKEND_TABLE`, or ``auto``.

    Args:
        name: the backend, or ``auto`` (see :func:`default_backend_name`).
        options: passed to the backend's class (e.g. ``allow_cpu=True`` for onnxruntime).

    Raises:
        ValueError: unknown name (the message lists the known ones).
        BackendError / fp16guard.errors.MissingDependencyError: the backend cannot run here.
    """
    if name == "auto":
        name = default_backend_name()
    spec = BACKEND_TABLE.get(name)
    if spec is None:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKEND_TABLE)}")
    return spec.load(name)(**options)


#: Names of :mod:`fp16guard.backends.base` served on first use (PEP 562): importing them pulls numpy and onnx.
_BASE_NAMES = ("Backend", "Engine", "InputSpec", "content_hash")


def __getattr__(name: str):
    """:class:`Backend`, :class:`Engine`, :class:`InputSpec`, :func:`content_hash` on first use."""
    if name in _BASE_NAMES:
        return getattr(importlib.import_module("fp16guard.backends.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "BACKEND_TABLE", "MODEL_KINDS", "Backend", "BackendError", "BackendSpec", "Engine",
           "InputSpec", "accepting", "content_hash", "default_backend_name", "either", "get_backend", "help_text"]
