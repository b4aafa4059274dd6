"""``tensorrt``: build a TensorRT engine from a typed FP16 ONNX model and run it.

Written against the TensorRT 10 and 11 Python API and imported lazily (extra ``tensorrt``;
TensorRT-RTX's ``tensorrt_rtx_bindings``, which has the same API, is accepted too):

* **Strongly typed networks.** The precision of each layer is the type of its tensors in the
  typed FP16 ONNX. TensorRT 11 (and TensorRT-RTX) has no other kind of network and no FP16
  builder flag; on TensorRT 10 the network is created with ``STRONGLY_TYPED``, so the FP16 flag
  is never set either.
* **Caches.** The builder's timing cache is kept in ``<cache>/tensorrt/timing.cache`` and reused by
  every build; serialized engines are kept in ``<cache>/tensorrt/engines``, keyed by the
  ONNX content hash, the TensorRT version and the GPU, so a model is built once per machine
  (``<cache>`` is ``$FP16GUARD_CACHE`` or ``~/.cache/fp16guard``; ``cache_dir=False`` turns both off).
* **I/O** by ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``, with buffers,
  copies and the stream from :mod:`fp16guard.backends.cuda_memory`: torch CUDA tensors on torch's
  current stream where torch sees a GPU (torch then owns the CUDA context), else cuda-python's
  runtime API (seed 004's ``cudart`` flow on ``cuda.bindings``), so a machine with TensorRT and a
  CPU-only torch runs the backend too (``memory="cuda-python"`` forces it).
* **Engine check**: after each build, :func:`check_engine_precisions` compares the engine's
  layers (``IEngineInspector``) with the typed model's FP16 nodes and logs a warning for any
  layer that runs in FP32 where the model asked for FP16 (the "0 % Half" failure of a build that
  silently ignored the types); the result is kept as ``engine.precision_check``.
* **Intermediate tensors** (``debug_tensors=``): marked as debug tensors
  (``INetworkDefinition.mark_debug``, TensorRT >= 10), which TensorRT computes inside its fused
  kernels and hands to an ``IDebugListener`` at run time without changing fusions; where
  ``mark_debug`` is missing they are marked as outputs instead, with a warning that this can
  change fusions. The values land in ``engine.debug_values`` after each run.
* **Inspection**: :func:`describe_engine` lists the built engine's layers, their fused ONNX nodes
  and precisions (``IEngineInspector``), so a user sees whether a scale multiply was folded away
  or a layer fell back to FP32.

Verified here: parsing and building with TensorRT-RTX 1.7 on an H100 (``tests/test_trt_helpers.py``,
``tests/test_backends_tensorrt.py`` when it imports). Running engines, debug tensors and engine
inspection need a GPU TensorRT supports (TensorRT-RTX refuses compute capability 9.0): unverified.
"""

from __future__ import annotations

import ctypes
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from fp16guard import deps
from fp16guard.backends.base import Backend, Engine, content_hash
from fp16guard.backends.cuda_memory import DeviceMemory, device_memory, gpu_name
from fp16guard.errors import BackendError
from fp16guard.onnx_graph import value_types

logger = logging.getLogger("fp16guard")


def import_tensorrt():
    """``tensorrt`` (or TensorRT-RTX), or :class:`fp16guard.errors.MissingDependencyError` naming the extra."""
    return deps.import_tensorrt("the tensorrt backend")


def _capsule_pointer(capsule) -> int:
    """The address a ``PyCapsule`` holds (TensorRT passes debug tensor buffers as capsules)."""
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return int(get_pointer(capsule, get_name(capsule)))


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine with one execution context.

    Args:
        trt: the ``tensorrt`` module.
        serialized: the engine.
        debug_tensors: intermediate tensors to expose (see the module docstring).
        memory: device buffers and the stream (:func:`~fp16guard.backends.cuda_memory.device_memory`).

    Attributes:
        debug_values: ``{tensor name: numpy array}`` of the debug tensors, filled by each run.
        precision_check: the :class:`PrecisionCheck` of this engine, when the backend made one.
    """

    def __init__(self, trt, serialized: bytes, debug_tensors: Sequence[str] = (), memory: DeviceMemory | None = None):
        self.trt = trt
        self.memory = memory if memory is not None else device_memory()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise BackendError("TensorRT could not deserialize the engine on this GPU (see the TensorRT log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.debug_values: dict[str, np.ndarray] = {}
        self.precision_check: PrecisionCheck | None = None
        self._listener = None
        # debug tensors marked as outputs (no mark_debug in this TensorRT) are read as outputs
        self._extra_outputs = [n for n in debug_tensors if n in self.output_names]
        listened = [n for n in debug_tensors if n not in self._extra_outputs]
        if listened:
            self._listener = self._make_listener(trt)
            self.context.set_debug_listener(self._listener)
            for name in listened:
                if not self.engine.is_debug_tensor(name):
                    raise BackendError(f"{name} is not a debug tensor of this engine")
                self.context.set_tensor_debug_state(name, True)

    def _make_listener(self, trt):
        engine = self

        class Listener(trt.IDebugListener):
            """Copies each debug tensor TensorRT hands over into ``engine.debug_values``."""

            def process_debug_tensor(self, addr, location, type, shape, name, stream):
                """Copy the debug tensor to the host while its buffer is valid (this call only)."""
                dtype = np.dtype(trt.nptype(type))
                engine.debug_values[name] = engine.memory.download(_capsule_pointer(addr), tuple(shape), dtype,
                                                                   stream=int(stream))
                return True

        return Listener()

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run once on the memory's stream (feeds checked by :meth:`Engine.run` against the typed
        model's inputs); outputs come back as numpy arrays (network outputs added for
        ``debug_tensors`` are moved to :attr:`debug_values`)."""
        trt, memory = self.trt, self.memory
        try:
            for name in self.input_names:
                host = np.require(feeds[name], requirements="C")
                self.context.set_input_shape(name, tuple(host.shape))
                self.context.set_tensor_address(name, memory.upload(host))
            outs = []
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                address = memory.empty(int(np.prod(shape)) * dtype.itemsize)
                outs.append((address, shape, dtype))
                self.context.set_tensor_address(name, address)
            self.debug_values = {}
            if not self.context.execute_async_v3(memory.stream):
                raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            memory.synchronize()
            values = {name: memory.download(*o) for name, o in zip(self.output_names, outs)}
        finally:
            memory.release()
        for name in self._extra_outputs:
            self.debug_values[name] = values.pop(name)
        return list(values.values())


@dataclass
class EngineLayer:
    """One layer of a built engine, as ``IEngineInspector`` reports it.

    Attributes:
        name: the engine layer's name; fused layers join their ONNX node names with ``" + "``.
        type: TensorRT's layer type (``CaskConvolution``, ``PointWiseV2``, ``Reformat``, ...).
        precisions: the data types of its inputs and outputs (``Half``, ``Float``, ...).
        fused: the ONNX nodes fused into it (``name`` split on ``" + "``).
    """

    name: str
    type: str
    precisions: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)


def describe_engine(serialized: bytes, trt=None) -> list[EngineLayer]:
    """The layers of a serialized engine: type, precisions and the ONNX nodes fused into each.

    Needs the engine built with ``ProfilingVerbosity.DETAILED`` (the backend does this) and a GPU
    the engine runs on.

    Raises:
        BackendError: the engine cannot be deserialized here.
    """
    trt = trt or import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
    if engine is None:
        raise BackendError("TensorRT could not deserialize the engine on this GPU")
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for entry in info.get("Layers", []):
        if isinstance(entry, str):  # ProfilingVerbosity.LAYER_NAMES_ONLY
            layers.append(EngineLayer(entry, "", [], entry.split(" + ")))
            continue
        name = str(entry.get("Name", ""))
        types = [str(t.get("Format/Datatype", "")) for t in (*entry.get("Inputs", []), *entry.get("Outputs", []))]
        precisions = sorted({p.split()[-1] for p in types if p})
        layers.append(EngineLayer(name, str(entry.get("LayerType", "")), precisions, name.split(" + ")))
    return layers


@dataclass
class PrecisionCheck:
    """The engine's layer precisions against what the typed model asked.

    Attributes:
        fp16_layers: engine layers made only of the model's FP16 nodes.
        mismatches: those of them that run in FP32 (``Float`` and no ``Half`` among their types).
        unmapped: engine layers named by no node of the model (Myelin's ``{ForeignNode[...]}``,
            reformats), not judged.
        half_layers: engine layers with any ``Half`` tensor; 0 with FP16 nodes in the model is
            the "0 % Half" failure (the build ignored the types).
    """

    fp16_layers: list[EngineLayer] = field(default_factory=list)
    mismatches: list[EngineLayer] = field(default_factory=list)
    unmapped: list[EngineLayer] = field(default_factory=list)
    half_layers: int = 0

    def summary(self) -> str:
        """One line: how many FP16 layers run in FP32, naming the first few."""
        if not self.mismatches:
            return (f"all {len(self.fp16_layers)} engine layers of FP16 nodes run in FP16 "
                    f"({len(self.unmapped)} layers not mapped to nodes)")
        names = ", ".join(layer.name for layer in self.mismatches[:3])
        more = f" and {len(self.mismatches) - 3} more" if len(self.mismatches) > 3 else ""
        return (f"{len(self.mismatches)} of {len(self.fp16_layers)} engine layers of FP16 nodes run in FP32: "
                f"{names}{more}; the engine does not follow the typed model (is the network strongly typed?)")


def check_engine_precisions(layers: Sequence[EngineLayer], typed_model: onnx.ModelProto) -> PrecisionCheck:
    """Compare a built engine's layers (:func:`describe_engine`) with the typed FP16 model.

    A layer is judged when every ONNX node fused into it (by name) is in the model and computes
    in FP16 (its floating outputs are ``float16``); it is a mismatch when its tensors' types hold
    ``Float`` and no ``Half``. Casts and the model's FP32 islands are not judged.

    Args:
        layers: the engine's layers, as :func:`describe_engine` reads them.
        typed_model: the typed FP16 ONNX the engine was built from.

    Returns:
        a :class:`PrecisionCheck`.
    """
    types = value_types(typed_model)
    fp16_nodes = set()
    known = set()
    for node in typed_model.graph.node:
        known.add(node.name)
        floats = [types.get(o) for o in node.output if types.get(o) in (onnx.TensorProto.FLOAT,
                                                                          onnx.TensorProto.FLOAT16)]
        if node.op_type != "Cast" and floats and all(t == onnx.TensorProto.FLOAT16 for t in floats):
            fp16_nodes.add(node.name)
    check = PrecisionCheck()
    for layer in layers:
        check.half_layers += "Half" in layer.precisions
        fused = [n.strip() for n in layer.fused if n.strip()]
        if not fused or not all(n in known for n in fused):
            check.unmapped.append(layer)
            continue
        if all(n in fp16_nodes for n in fused):
            check.fp16_layers.append(layer)
            if "Float" in layer.precisions and "Half" not in layer.precisions:
                check.mismatches.append(layer)
    return check


class TensorRTBackend(Backend):
    """Typed FP16 ONNX -> strongly typed TensorRT engine (see the module docstring).

    Args:
        workspace_bytes: the builder's workspace limit.
        cache_dir: where the timing cache and engines are kept (default ``<cache>/tensorrt``);
            ``False`` keeps nothing on disk.
        debug_tensors: names of intermediate tensors to expose at run time
            (``engine.debug_values``).
        memory: device memory for running engines: ``auto`` (torch CUDA tensors where torch
            sees a GPU, else cuda-python), ``torch`` or ``cuda-python``
            (:func:`~fp16guard.backends.cuda_memory.device_memory`).
        check_precisions: after each build, compare the engine's layer precisions with the typed
            model (:func:`check_engine_precisions`) and warn on a layer in FP32 where FP16 was asked.

    Raises:
        fp16guard.deps.MissingDependencyError: TensorRT is not installed.
        BackendError: the ONNX parser or the builder fails (the parser's errors are included).
    """

    name = "tensorrt"
    accepts = frozenset({"onnx"})
    device = "cuda"
    subnormals = "either"  # kernel-dependent: TensorRT promises neither (tactics, fusions)

    def __init__(self, workspace_bytes: int = 4 << 30, cache_dir: str | Path | bool | None = None,
                 debug_tensors: Sequence[str] = (), memory: str = "auto", check_precisions: bool = True):
        super().__init__()
        self.trt = import_tensorrt()
        self.memory_kind = memory
        self.check_precisions = check_precisions
        self._memory: DeviceMemory | None = None
        self.workspace_bytes = workspace_bytes
        if cache_dir is None or cache_dir is True:
            from fp16guard.cache import cache_dir as fp16guard_cache

            cache_dir = fp16guard_cache() / "tensorrt"
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.debug_tensors = list(debug_tensors)
        self.engines_built = 0

    @property
    def memory(self) -> DeviceMemory:
        """Device memory for the engines (made on first use: building needs none)."""
        if self._memory is None:
            self._memory = device_memory(self.memory_kind)
        return self._memory

    @property
    def version(self) -> str:
        """``tensorrt 10.x`` / ``tensorrt_rtx_bindings 1.x``."""
        return f"{self.trt.__name__} {self.trt.__version__}"

    def _network(self, builder):
        """A strongly typed network: the flag on TensorRT 10, the only kind on 11 and RTX."""
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return builder.create_network(0 if flag is None else 1 << int(flag))

    def _engine_path(self, fp16_model: onnx.ModelProto) -> Path | None:
        if self.cache_dir is None:
            return None
        gpu = gpu_name()
        tag = "".join(c if c.isalnum() else "-" for c in f"{self.version}-{gpu}-{','.join(self.debug_tensors)}")
        return self.cache_dir / "engines" / f"{content_hash(fp16_model)[:32]}-{tag}.engine"

    def build_serialized(self, fp16_model: onnx.ModelProto) -> bytes:
        """The serialized engine for ``fp16_model``: from the engine cache, or parsed and built
        (then cached). Input shapes must be static (the model's own).

        Raises:
            BackendError: the parser rejects the model, an input shape is dynamic, or the build fails.
        """
        trt = self.trt
        path = self._engine_path(fp16_model)
        if path is not None and path.is_file():
            logger.info("tensorrt: engine from the cache %s", path)
            return path.read_bytes()
        log = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(log)
        network = self._network(builder)
        parser = trt.OnnxParser(network, log)
        if not parser.parse(fp16_model.SerializeToString()):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT's ONNX parser rejected the model: {errors}")
        self._mark_debug(network)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if hasattr(trt, "ProfilingVerbosity"):
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # for describe_engine
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = tuple(tensor.shape)
            if any(d < 0 for d in shape):
                raise BackendError(f"input {tensor.name} has dynamic shape {shape}; the tensorrt backend builds "
                                   "for static shapes (give the ONNX model fixed input dimensions)")
            profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
        cache_file = self.cache_dir / "timing.cache" if self.cache_dir is not None else None
        timing = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
        config.set_timing_cache(timing, False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError("TensorRT failed to build the engine (see the TensorRT log above)")
        self.engines_built += 1
        serialized = bytes(serialized)
        if self.cache_dir is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(serialized)
        return serialized

    def _mark_debug(self, network) -> None:
        if not self.debug_tensors:
            return
        tensors = {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            for j in range(layer.num_outputs):
                tensors[layer.get_output(j).name] = layer.get_output(j)
        missing = [n for n in self.debug_tensors if n not in tensors]
        if missing:
            raise BackendError(f"the network has no tensor named {missing[0]!r} to expose")
        for name in self.debug_tensors:
            if hasattr(network, "mark_debug"):
                network.mark_debug(tensors[name])
            else:
                warnings.warn(f"this TensorRT has no debug tensors; {name} is marked as a network output, "
                              f"which can change layer fusion", stacklevel=3)
                network.mark_output(tensors[name])

    def _build(self, fp16_model: onnx.ModelProto) -> Engine:
        """Parse, build (or load from the cache) and deserialize; check the precisions."""
        serialized = self.build_serialized(fp16_model)
        engine = TensorRTEngine(self.trt, serialized, self.debug_tensors, memory=self.memory)
        if self.check_precisions:
            engine.precision_check = check_engine_precisions(describe_engine(serialized, self.trt), fp16_model)
            if engine.precision_check.mismatches:
                logger.warning("tensorrt: %s", engine.precision_check.summary())
        return engine

    def describe(self) -> str:
        """One line naming the TensorRT version."""
        return f"{self.version}: strongly typed engine from the typed FP16 ONNX"
