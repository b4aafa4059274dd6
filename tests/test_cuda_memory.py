"""Device memory for the TensorRT backend: torch CUDA tensors or cuda-python (no torch CUDA needed).

On CI (no GPU, no cuda-python) the choice and its one-line errors are checked; on a GPU both
implementations copy arrays to the device and back, bit for bit, on their streams."""

import importlib.util

import numpy as np
import pytest
import torch

from fp16guard.backends.cuda_memory import CudaPythonMemory, TorchMemory, device_memory
from fp16guard.errors import BackendError, MissingDependencyError

HAS_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None and (
    importlib.util.find_spec("cuda.bindings") is not None or importlib.util.find_spec("cuda.cudart") is not None)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="choose auto, torch or cuda-python"):
        device_memory("cupy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA torch")
def test_without_a_cuda_torch_the_backend_needs_cuda_python():
    with pytest.raises(BackendError, match="torch sees no CUDA device"):
        device_memory("torch")
    if not HAS_CUDA_PYTHON:
        with pytest.raises(MissingDependencyError, match="pip install cuda-python"):
            device_memory("auto")


def _roundtrip(memory):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, 5)).astype(np.float16), np.arange(7, dtype=np.int64),
              rng.standard_normal((2, 2, 2)).astype(np.float32)]
    addresses = [memory.upload(a) for a in arrays]
    scratch = memory.empty(64)
    assert scratch not in addresses and len(set(addresses)) == 3
    back = [memory.download(p, a.shape, a.dtype) for p, a in zip(addresses, arrays)]
    memory.synchronize()
    memory.release()
    for a, b in zip(arrays, back):
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.gpu
def test_torch_memory_copies_bit_for_bit():
    memory = device_memory("auto")
    assert isinstance(memory, TorchMemory) and memory.stream == torch.cuda.current_stream().cuda_stream
    _roundtrip(memory)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_PYTHON, reason="cuda-python is not installed")
def test_cuda_python_memory_copies_bit_for_bit_on_its_own_stream():
    memory = device_memory("cuda-python")
    assert isinstance(memory, CudaPythonMemory) and memory.stream != 0
    _roundtrip(memory)
    _roundtrip(memory)  # buffers released and made again
