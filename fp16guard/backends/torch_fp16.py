"""``torch``: the prefix as an FP16 PyTorch module on CUDA (no ONNX in between)."""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch

from fp16guard.backends.base import Backend, Engine
from fp16guard.errors import BackendError


class TorchEngine(Engine):
    """A prefix ``GraphModule`` converted to FP16 on a CUDA device.

    Floating inputs are cast to FP16 on the way in; floating outputs come back as FP32 numpy.
    """

    def __init__(self, module: torch.nn.Module, input_names: list[str], output_names: list[str], device):
        self.module = module
        self.input_names = input_names
        self.output_names = output_names
        self.device = device

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on CUDA in FP16; returns FP32 arrays (inf/NaN kept)."""
        args = []
        for name in self.input_names:
            t = torch.as_tensor(np.asarray(feeds[name])).to(self.device)
            args.append(t.half() if t.is_floating_point() else t)
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in out]


class TorchBackend(Backend):
    """FP16 PyTorch on CUDA.

    Raises:
        BackendError: no CUDA device, or asked to run an ONNX model.
    """

    name = "torch"

    def __init__(self, device: str = "cuda"):
        super().__init__()
        if not torch.cuda.is_available():
            raise BackendError("backend 'torch' runs the prefix in FP16 on CUDA, and no CUDA device is "
                               "visible; use --backend emulate on a CPU")
        self.device = torch.device(device)

    def build_module(self, prefix: Any, example_inputs: Sequence[Any]) -> Engine:
        """FP16 copy of ``prefix`` (a ``GraphModule`` whose placeholders are its inputs) on CUDA."""
        self.builds += 1
        module = copy.deepcopy(prefix).to(self.device).half().eval()
        names = [n.name for n in prefix.graph.nodes if n.op == "placeholder"]
        outs = [f"out{i}" for i in range(len(next(n for n in prefix.graph.nodes if n.op == "output").args[0]))]
        return TorchEngine(module, names, outs, self.device)

    def _build(self, fp16_model: onnx.ModelProto) -> Engine:
        raise BackendError("backend 'torch' runs PyTorch models only; for an .onnx file use "
                           "--backend emulate, onnxruntime or tensorrt")

    def describe(self) -> str:
        """One line naming the device."""
        return f"torch {torch.__version__}: prefix as an FP16 module on {torch.cuda.get_device_name(self.device)}"
