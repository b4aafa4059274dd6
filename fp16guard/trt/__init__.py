"""Helpers for networks built with the TensorRT Python API (tensorrtx style; seeds 000, 001, 004).

* :mod:`fp16guard.trt.wts`: tensorrtx's ``.wts`` weight files: read, write, FP16 range check.
* :mod:`fp16guard.trt.layers`: BatchNorm as an ``IScaleLayer``, conv+BN folding, hard-swish and a
  fully connected layer from the layers TensorRT 10/11 still has.
* :mod:`fp16guard.trt.scale`: the fix's power-of-two scale region applied to a network built by API.

Only the functions that take a ``network`` need TensorRT; they import it lazily
(:func:`fp16guard.deps.import_tensorrt`), so the numpy math and the ``.wts`` functions work without it.
"""

from __future__ import annotations

from fp16guard.deps import import_tensorrt

__all__ = ["import_tensorrt"]
