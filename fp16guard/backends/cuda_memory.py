"""Device memory, copies and a stream for the TensorRT backend, with or without a CUDA torch.

Two implementations of one small interface, :class:`DeviceMemory`:

* :class:`TorchMemory`: torch CUDA tensors on torch's current stream, where torch sees a GPU
  (torch then owns the CUDA context and its caching allocator serves the buffers);
* :class:`CudaPythonMemory`: NVIDIA's cuda-python runtime bindings (``cuda.bindings.runtime``,
  cuda-python >= 12.6; ``cuda.cudart`` before it), the ``cudart`` flow of seed 004 on today's API:
  ``cudaStreamCreate``, ``cudaMalloc``, ``cudaMemcpyAsync`` and ``cudaStreamSynchronize``. It
  needs no torch build with CUDA, so an ONNX-only deployment machine (CPU torch, TensorRT,
  cuda-python) runs ``fp16guard bisect/fix --backend tensorrt``.

:func:`device_memory` picks one: ``auto`` takes torch where ``torch.cuda.is_available()``, else
cuda-python, imported lazily with one clear error when missing.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from fp16guard.errors import BackendError, MissingDependencyError


class DeviceMemory(Protocol):
    """Buffers on one GPU and the stream the engine runs on.

    Attributes:
        stream: the CUDA stream handle (an ``int``) for ``execute_async_v3``.
        name: ``torch`` or ``cuda-python``.
    """

    stream: int
    name: str

    def upload(self, array: np.ndarray) -> int:
        """Copy a host array to a new device buffer (kept until :meth:`release`); its address."""

    def empty(self, nbytes: int) -> int:
        """A new device buffer of ``nbytes`` bytes (kept until :meth:`release`); its address."""

    def download(self, address: int, shape: tuple[int, ...], dtype: np.dtype, stream: int | None = None) -> np.ndarray:
        """Copy ``prod(shape)`` elements of ``dtype`` at ``address`` to a new host array (on
        ``stream``, default :attr:`stream`), synchronizing that stream."""

    def synchronize(self) -> None:
        """Wait for :attr:`stream`."""

    def release(self) -> None:
        """Free every buffer made since the last release."""


class TorchMemory:
    """:class:`DeviceMemory` of torch CUDA tensors on torch's current stream."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._keep: list = []
        self.stream = torch.cuda.current_stream().cuda_stream

    def upload(self, array: np.ndarray) -> int:
        """Copy ``array`` (any shape and dtype) to a new device buffer; its address."""
        t = self._torch.as_tensor(np.require(array, requirements="C")).cuda()
        self._keep.append(t)
        return t.data_ptr()

    def empty(self, nbytes: int) -> int:
        """A new device buffer of ``nbytes`` bytes, uninitialized; its address (see :class:`DeviceMemory`)."""
        t = self._torch.empty(max(nbytes, 1), dtype=self._torch.uint8, device="cuda")
        self._keep.append(t)
        return t.data_ptr()

    def download(self, address: int, shape: tuple[int, ...], dtype: np.dtype, stream: int | None = None) -> np.ndarray:
        """``prod(shape)`` elements of ``dtype`` at ``address`` as a new host array (stream synced)."""
        torch = self._torch
        out = np.empty(shape, dtype=dtype)
        view = _DeviceArray(address, (out.nbytes,), "|u1")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream if stream is not None else self.stream)):
            data = torch.as_tensor(view, device="cuda").cpu().numpy()
        out.view(np.uint8).reshape(-1)[:] = data
        return out

    def synchronize(self) -> None:
        """Wait for :attr:`stream` (see :class:`DeviceMemory`)."""
        self._torch.cuda.current_stream().synchronize()

    def release(self) -> None:
        """Free every buffer made since the last release (see :class:`DeviceMemory`)."""
        self._keep.clear()


class _DeviceArray:
    """A view of raw device memory for ``torch.as_tensor`` (``__cuda_array_interface__`` v3)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3}


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6).

    Raises:
        MissingDependencyError: cuda-python is not installed (one line: what to install).
    """
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError("the tensorrt backend needs device memory: a CUDA build of torch, or cuda-python "
                                 "(pip install cuda-python) on a machine with an NVIDIA driver")


class CudaPythonMemory:
    """:class:`DeviceMemory` through cuda-python's runtime API, on a stream of its own.

    Raises:
        MissingDependencyError: cuda-python is not installed.
        BackendError: a CUDA call fails (no device, driver too old); the message names the call.
    """

    name = "cuda-python"

    def __init__(self) -> None:
        self.cudart = import_cudart()
        self._buffers: list[int] = []
        self._stream = self._check("cudaStreamCreate", self.cudart.cudaStreamCreate())
        self.stream = int(self._stream)

    def _check(self, call: str, result):
        """The values of a cuda-python call (it returns ``(error, *values)``); raise on an error."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, text = self.cudart.cudaGetErrorString(err)
            raise BackendError(f"CUDA {call} failed: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else tuple(values) or None

    def upload(self, array: np.ndarray) -> int:
        """Copy ``array`` (any shape and dtype) to a new device buffer; its address."""
        host = np.require(array, requirements="C")
        address = self.empty(host.nbytes)
        self._check("cudaMemcpyAsync", self.cudart.cudaMemcpyAsync(
            address, host.ctypes.data, host.nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
        self.synchronize()  # the host array may go away once this returns
        return address

    def empty(self, nbytes: int) -> int:
        """A new device buffer of ``nbytes`` bytes, uninitialized; its address (see :class:`DeviceMemory`)."""
        address = int(self._check("cudaMalloc", self.cudart.cudaMalloc(max(nbytes, 1))))
        self._buffers.append(address)
        return address

    def download(self, address: int, shape: tuple[int, ...], dtype: np.dtype, stream: int | None = None) -> np.ndarray:
        """``prod(shape)`` elements of ``dtype`` at ``address`` as a new host array (stream synced)."""
        out = np.empty(shape, dtype=dtype)
        on = self._stream if stream is None else stream
        self._check("cudaMemcpyAsync", self.cudart.cudaMemcpyAsync(
            out.ctypes.data, address, out.nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, on))
        self._check("cudaStreamSynchronize", self.cudart.cudaStreamSynchronize(on))
        return out

    def synchronize(self) -> None:
        """Wait for :attr:`stream` (see :class:`DeviceMemory`)."""
        self._check("cudaStreamSynchronize", self.cudart.cudaStreamSynchronize(self._stream))

    def release(self) -> None:
        """Free every buffer made since the last release (see :class:`DeviceMemory`)."""
        self.synchronize()
        for address in self._buffers:
            self._check("cudaFree", self.cudart.cudaFree(address))
        self._buffers.clear()


def device_memory(kind: str = "auto") -> DeviceMemory:
    """Device memory for the TensorRT backend.

    Args:
        kind: ``torch`` (a CUDA build of torch), ``cuda-python``, or ``auto``: torch where
            ``torch.cuda.is_available()``, else cuda-python.

    Raises:
        ValueError: an unknown ``kind``.
        MissingDependencyError: cuda-python is needed and not installed.
        BackendError: ``torch`` asked for and torch sees no GPU; a CUDA call fails.
    """
    if kind not in ("auto", "torch", "cuda-python"):
        raise ValueError(f"unknown device memory {kind!r}; choose auto, torch or cuda-python")
    if kind in ("auto", "torch"):
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
        if cuda:
            return TorchMemory()
        if kind == "torch":
            raise BackendError("torch sees no CUDA device; use cuda-python device memory (pip install cuda-python)")
    return CudaPythonMemory()


def gpu_name() -> str:
    """The first GPU's name (for cache keys), through torch or cuda-python; ``nogpu`` without one."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        cudart = import_cudart()
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name
            return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
    except MissingDependencyError:
        pass
    return "nogpu"
