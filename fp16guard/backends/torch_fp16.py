"""``torch``: PyTorch FP16 programs on CUDA, PyTorch's own FP16 kernels (no ONNX in between).

It takes PyTorch programs only (``accepts = {"torch"}``): the fix's typed FP16 program
(:func:`fp16guard.fixing.torch_pass.to_fp16_program`) runs as it is, moved to the GPU
(:func:`~fp16guard.backends.torch_program.program_on`); a bisect prefix runs as its naive FP16
program (:func:`~fp16guard.backends.torch_program.half_program`, through :meth:`Backend.build_module`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from fp16guard.backends.base import Backend, Engine
from fp16guard.backends.program_engine import ProgramEngine
from fp16guard.backends.torch_program import as_numpy, program_on
from fp16guard.errors import BackendError


class TorchEngine(Engine):
    """A module on a device: the engine of earlier releases' ``build_module``, kept for backends
    written against it (the ``torch`` backend itself builds a
    :class:`~fp16guard.backends.program_engine.ProgramEngine`).

    Args:
        module: a module already converted to FP16 (``copy.deepcopy(prefix).half()``).
        input_names, output_names: its inputs (in ``forward`` order) and outputs.
        device: where the module is (it is not moved); inputs are moved there.

    Floating inputs are cast to FP16 on the way in; floating outputs come back as FP32 numpy.
    """

    def __init__(self, module: torch.nn.Module, input_names: list[str], output_names: list[str], device):
        self.module = module
        self.input_names = input_names
        self.output_names = output_names
        self.device = device

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on the device in FP16; returns FP32 arrays (inf/NaN kept)."""
        args = []
        for name in self.input_names:
            t = torch.as_tensor(np.asarray(feeds[name])).to(self.device)
            args.append(t.half() if t.is_floating_point() else t)
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [as_numpy(o) for o in out]


class TorchBackend(Backend):
    """PyTorch programs in FP16 on CUDA.

    Args:
        device: the CUDA device.

    Raises:
        BackendError: no CUDA device (and, from :meth:`build`, an ONNX model).
    """

    name = "torch"
    accepts = frozenset({"torch"})
    device = "cuda"
    subnormals = "kept"  # CUDA's FP16 arithmetic keeps them

    def __init__(self, device: str = "cuda"):
        super().__init__()
        if not torch.cuda.is_available():
            raise BackendError("backend 'torch' runs PyTorch's FP16 kernels on CUDA, and no CUDA device is "
                               "visible; use --backend emulate on a CPU")
        self.device = torch.device(device)

    def _build_program(self, program) -> Engine:
        """A copy of ``program`` on the GPU (:func:`~fp16guard.backends.torch_program.program_on`)."""
        on_gpu = program_on(program, self.device)
        return ProgramEngine(on_gpu, on_gpu, self.device,
                             f"PyTorch {torch.__version__} FP16 on {torch.cuda.get_device_name(self.device)}")

    def describe(self) -> str:
        """One line naming the device."""
        return f"torch {torch.__version__}: prefix as an FP16 module on {torch.cuda.get_device_name(self.device)}"
