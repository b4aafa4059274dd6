"""Helpers for networks built with the TensorRT Python API (tensorrtx style; seeds 000, 001, 004).

* :mod:`fp16guard.trt.wts`: tensorrtx's ``.wts`` weight files: read, write, FP16 range check.
* :mod:`fp16guard.trt.layers`: BatchNorm as an ``IScaleLayer``, conv+BN folding, hard-swish and a
  fully connected layer from the layers TensorRT 10/11 still has.
* :mod:`fp16guard.trt.scale`: the fix's power-of-two scale region applied to a network built by API.

Only the functions that take a ``network`` need TensorRT; they import it lazily
(:func:`import_tensorrt`), so the numpy math and the ``.wts`` functions work without it.
"""

from __future__ import annotations

from types import ModuleType

from fp16guard.deps import MissingDependencyError


def import_tensorrt(purpose: str = "building TensorRT networks") -> ModuleType:
    """The ``tensorrt`` module, else TensorRT-RTX's ``tensorrt_rtx_bindings`` (same Python API),
    else one clear error.

    Raises:
        MissingDependencyError: neither is installed; names the ``tensorrt`` extra.
    """
    import importlib

    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError(f"tensorrt is needed for {purpose} but is not installed: "
                                 "pip install 'fp16guard[tensorrt]' (NVIDIA's index), or tensorrt-rtx")
