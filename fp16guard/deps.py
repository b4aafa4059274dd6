"""Imports of optional dependencies, failing with one line that names the extra to install
(:class:`~fp16guard.errors.MissingDependencyError`)."""

from __future__ import annotations

import importlib
from types import ModuleType

from fp16guard.errors import MissingDependencyError


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError`.

    Args:
        module: the import name (``skimage``).
        extra: the fp16guard extra that installs it (``examples``).
        purpose: what it is needed for, completing "... is needed for <purpose>".
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{module} is needed for {purpose} but is not installed: pip install 'fp16guard[{extra}]'"
        ) from None


def import_tensorrt(purpose: str = "building TensorRT networks") -> ModuleType:
    """The ``tensorrt`` module, else TensorRT-RTX's ``tensorrt_rtx_bindings`` (same Python API),
    else one clear error.

    Raises:
        MissingDependencyError: neither is installed; names the ``tensorrt`` extra.
    """
    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError(f"tensorrt is needed for {purpose} but is not installed: "
                                 "pip install 'fp16guard[tensorrt]' (NVIDIA's index), or tensorrt-rtx")


def import_polygraphy(purpose: str) -> ModuleType:
    """The ``polygraphy`` package (NVIDIA's, pure Python from PyPI; its JSON encoding needs no
    TensorRT), else one clear error.

    Raises:
        MissingDependencyError: polygraphy is not installed; names ``pip install polygraphy``.
    """
    try:
        return importlib.import_module("polygraphy")
    except ImportError:
        raise MissingDependencyError(f"polygraphy is needed for {purpose} but is not installed: pip install polygraphy "
                                     "(or pip install 'fp16guard[polygraphy]')") from None
