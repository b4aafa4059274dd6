"""``tensorrt``: build a TensorRT engine from the typed FP16 ONNX prefix and run it.

Written against the TensorRT 10 and 11 Python API and imported lazily (extra ``tensorrt``):

* networks are created strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): the
  precision of each layer is the type of its tensors in the typed FP16 ONNX, which is the only
  mode TensorRT 11 has (its FP16 builder flag is gone). On TensorRT 10, where strong typing is
  optional, the FP16 flag is never needed for the same reason;
* I/O by ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on the current torch
  CUDA stream, with torch CUDA tensors as buffers (torch is already a dependency and owns the
  CUDA context; cuda-python would add a second allocator for no gain).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from .._optional import require
from .base import Backend, BackendError, Engine


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`fp16guard._optional.MissingDependencyError` naming the extra."""
    return require("tensorrt", extra="tensorrt", purpose="the tensorrt backend")


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine with one execution context."""

    def __init__(self, trt, plan: bytes):
        import torch

        self._torch = torch
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on the current CUDA stream; outputs come back as numpy arrays."""
        torch, trt = self._torch, self.trt
        keep = []
        for name in self.input_names:
            t = torch.as_tensor(np.ascontiguousarray(feeds[name])).cuda()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            t = torch.empty(shape, dtype=dtype, device="cuda")
            outs.append(t)
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        stream.synchronize()
        return [o.cpu().numpy() for o in outs]


class TensorRTBackend(Backend):
    """Typed FP16 ONNX -> strongly typed TensorRT engine.

    Raises:
        fp16guard._optional.MissingDependencyError: TensorRT is not installed.
        BackendError: the ONNX parser or the builder fails (the parser's errors are included).
    """

    name = "tensorrt"

    def __init__(self, workspace_bytes: int = 4 << 30):
        super().__init__()
        self.trt = import_tensorrt()
        self.workspace_bytes = workspace_bytes

    def _build(self, fp16_model: onnx.ModelProto) -> Engine:
        trt = self.trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(fp16_model.SerializeToString()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT's ONNX parser rejected the prefix: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = tuple(tensor.shape)
            if any(d < 0 for d in shape):
                raise BackendError(f"input {tensor.name} has dynamic shape {shape}; the tensorrt backend "
                                   "builds for the shapes of the bisect inputs only (not yet supported)")
            profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError("TensorRT failed to build the engine (see the TensorRT log above)")
        return TensorRTEngine(trt, bytes(plan))

    def describe(self) -> str:
        """One line naming the TensorRT version."""
        return f"tensorrt {self.trt.__version__}: strongly typed engine from the typed FP16 ONNX"
