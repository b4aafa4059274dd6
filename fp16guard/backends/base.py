"""The backend interface: build an FP16 model, run it on arrays, describe yourself.

A :class:`Backend` builds an :class:`Engine` from a model of a kind it declares in ``accepts``:

* ``"onnx"``: a typed FP16 ``onnx.ModelProto`` (:func:`fp16guard.fp16_onnx.to_typed_fp16`); the
  subclass implements :meth:`Backend._build`, and engines are cached by content hash;
* ``"torch"``: a PyTorch FP16 program, a ``torch.fx.GraphModule`` that takes and returns FP32
  tensors (:func:`fp16guard.fixing.torch_pass.to_fp16_program`, or
  :func:`fp16guard.backends.torch_program.half_program` of a bisect prefix); the subclass
  implements :meth:`Backend._build_program`.

:meth:`Engine.run` checks the feeds once, for every backend, against the inputs the model declares
(:class:`InputSpec`: names, dtypes, static dimensions): a missing input or a wrong dtype is the same
:class:`~fp16guard.errors.InputError` whatever runs the model. The subclass implements
:meth:`Engine._run` on feeds already checked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from fp16guard.backends import accepting, either
from fp16guard.errors import BackendError, InputError
from fp16guard.onnx_graph import fed_inputs, model_sha256

#: How an error message names each kind of model.
KIND_WORDS = {"onnx": "ONNX models", "torch": "PyTorch programs"}


def content_hash(model: onnx.ModelProto) -> str:
    """The engine cache's key: :func:`fp16guard.onnx_graph.model_sha256` of the typed FP16 model."""
    return model_sha256(model)


@dataclass(frozen=True)
class InputSpec:
    """One input an engine takes, as its model declares it.

    Attributes:
        name: the input's name (an ONNX graph input, a program's placeholder).
        dtype: the numpy dtype it must have (None: any). A floating feed of another width is cast
            to it (float64 -> float32), as :func:`fp16guard.onnx_graph.check_feed` does.
        shape: its dimensions, None where a dimension is dynamic (the whole shape None: any rank).
    """

    name: str
    dtype: np.dtype | None = None
    shape: tuple[int | None, ...] | None = None


def onnx_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds an ONNX model (:func:`~fp16guard.onnx_graph.fed_inputs`: not
    initializers, not ``optional``), with their declared element types and static dimensions."""
    declared = {i.name: i for i in model.graph.input}
    specs = []
    for name in fed_inputs(model):
        t = declared[name].type
        if not t.HasField("tensor_type"):
            specs.append(InputSpec(name))
            continue
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):  # UNDEFINED, or a type numpy has no dtype for
            dtype = None
        shape = (tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)
                 if t.tensor_type.HasField("shape") else None)
        specs.append(InputSpec(name, dtype, shape))
    return specs


def program_input_specs(program) -> list[InputSpec]:
    """The placeholders of a ``torch.fx.GraphModule``, with the dtype ``torch.export`` recorded in
    their ``meta["val"]`` (None where none is recorded, or numpy has no such dtype). Shapes are not
    checked: a program runs on any size its ops take."""
    import torch

    specs = []
    for node in program.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        dtype = None
        if isinstance(val, torch.Tensor):
            try:
                dtype = torch.empty((), dtype=val.dtype).numpy().dtype
            except TypeError:  # bfloat16: no numpy dtype
                dtype = None
        specs.append(InputSpec(node.name, dtype))
    return specs


def check_feeds(specs: Sequence[InputSpec], feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The feeds an engine runs: one numpy array per declared input, checked.

    Args:
        specs: the engine's inputs.
        feeds: ``{name: array}``; keys that name no input are ignored (a bisect prefix takes
            some of the model's inputs).

    Returns:
        ``{name: array}`` in ``specs`` order; floating arrays of another width cast to the declared dtype.

    Raises:
        InputError: a declared input missing from ``feeds``, of another rank or static dimension,
            or of a dtype that is not the declared one (other than a float width).
    """
    out = {}
    names = ", ".join(s.name for s in specs)
    for spec in specs:
        if spec.name not in feeds:
            raise InputError(f"missing model input {spec.name!r} (the model takes: {names})")
        a = np.asarray(feeds[spec.name])
        if spec.shape is not None and (a.ndim != len(spec.shape) or
                                       any(d is not None and d != s for d, s in zip(spec.shape, a.shape))):
            shown = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
            raise InputError(f"input {spec.name!r} must have shape {shown}, got {list(a.shape)}")
        if spec.dtype is not None and a.dtype != spec.dtype:
            if a.dtype.kind == "f" and spec.dtype.kind == "f":
                a = a.astype(spec.dtype)
            else:
                raise InputError(f"input {spec.name!r} must be {spec.dtype.name}, got {a.dtype.name}")
        out[spec.name] = a
    return out


class Engine(ABC):
    """A built FP16 model. :meth:`run` takes and returns FP32 (or integer, bool) numpy arrays.

    Attributes:
        input_names: the inputs, in the model's order.
        output_names: the outputs, in the order :meth:`run` returns them.
        inputs: what each input must be (:class:`InputSpec`); the backend fills it from the model
            when the engine leaves it empty. Empty: every name of ``input_names`` required, any dtype.
        description: what runs this engine, where it differs from its backend's ``describe()``
            (a PyTorch program on ``emulate``); None otherwise.
    """

    input_names: list[str]
    output_names: list[str]
    inputs: Sequence[InputSpec] = ()
    description: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "run" in vars(cls) and "_run" not in vars(cls):  # an engine written before _run: its run() is the work
            cls._run = cls.run

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once.

        Args:
            feeds: ``{input name: array}``; keys that name no input are ignored.

        Returns:
            the outputs in :attr:`output_names` order, numpy arrays on the host (floating ones FP32,
            inf/NaN kept).

        Raises:
            InputError: a missing input, or one of another dtype or static shape (:func:`check_feeds`).
        """
        specs = self.inputs or [InputSpec(n) for n in self.input_names]
        return self._run(check_feeds(specs, feeds))

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """:meth:`run` on feeds already checked: exactly the declared inputs, of their dtypes."""


def model_kind(model) -> str:
    """``"onnx"`` for an ``onnx.ModelProto``, ``"torch"`` for a ``torch.fx.GraphModule``.

    Raises:
        TypeError: anything else.
    """
    if isinstance(model, onnx.ModelProto):
        return "onnx"
    import torch.fx

    if isinstance(model, torch.fx.GraphModule):
        return "torch"
    raise TypeError(f"a backend builds an onnx.ModelProto or a torch.fx.GraphModule, not {type(model).__name__}")


class Backend(ABC):
    """Builds engines of typed FP16 models (module docstring).

    Class attributes (a backend declares them; its :data:`~fp16guard.backends.BACKEND_TABLE` row
    repeats ``accepts`` and ``device`` so the command line can decide without importing it):

    * ``name``: the table's name for it.
    * ``accepts``: the kinds of model it builds, ``"onnx"`` and/or ``"torch"``.
    * ``device``: where it runs, ``"cpu"`` or ``"cuda"``.
    * ``subnormals``: what happens to FP16 subnormals (magnitudes in ``[2**-24, 2**-14)``):
      ``"kept"`` (IEEE: they survive, smaller values round to 0), ``"flushed"`` (to 0), or
      ``"either"`` (kernel-dependent: the backend promises neither).

    :meth:`build` caches ONNX engines by content hash, so a cut tried twice (``--all``, the
    boundary check) is built once; ``builds`` counts real builds.
    """

    name = "backend"
    accepts: frozenset = frozenset({"onnx"})
    device = "cpu"
    subnormals = "kept"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a backend written before `accepts`: one whose build_module runs PyTorch prefixes takes those only
        if "accepts" not in vars(cls) and cls.accepts == Backend.accepts and "build_module" in vars(cls):
            cls.accepts = frozenset({"torch"})

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self._unhashed: tuple[onnx.ModelProto, Engine] | None = None  # the one engine not yet hashed
        self.builds = 0

    def build(self, model) -> Engine:
        """The engine of ``model``: a typed FP16 ``onnx.ModelProto`` (built once per distinct content)
        or a PyTorch FP16 program (``torch.fx.GraphModule``, built on each call).

        Raises:
            BackendError: a kind of model this backend does not take (the message names those that do),
                or the build fails.
            TypeError: neither kind of model.
        """
        kind = model_kind(model)
        if kind not in self.accepts:
            takes = " and ".join(KIND_WORDS[k] for k in sorted(self.accepts))
            raise BackendError(f"backend {self.name!r} runs {takes} only; {KIND_WORDS[kind]} run on "
                               f"{either(accepting(kind))} (--backend)")
        if kind == "torch":
            engine = self._build_program(model)
            self.builds += 1
            if not engine.inputs:
                engine.inputs = program_input_specs(model)
            return engine
        key, engine = self._cached(model)
        if engine is None:
            engine = self._build(model)
            if key is None:
                self._unhashed = (model, engine)  # hashed only if another model comes (a fix builds once)
            else:
                self._engines[key] = engine
            self.builds += 1
            if not engine.inputs:
                engine.inputs = onnx_input_specs(model)
        return engine

    def _cached(self, model: onnx.ModelProto) -> tuple[str | None, Engine | None]:
        """``(content hash or None, the engine already built for a model of that content or None)``.
        The hash (a serialization and a SHA-256 of the whole model: a second for BERT-base) is taken
        only from the second model on; the first is hashed then."""
        last = self._unhashed
        if last is not None and last[0] is model:
            return None, last[1]
        if last is None and not self._engines:
            return None, None
        if last is not None:
            self._engines[content_hash(last[0])] = last[1]
            self._unhashed = None
        key = content_hash(model)
        return key, self._engines.get(key)

    def _build(self, fp16_model: onnx.ModelProto) -> Engine:
        """The engine of a typed FP16 ONNX model (backends that accept ``"onnx"``)."""
        raise BackendError(f"backend {self.name!r} declares it accepts ONNX models but builds none")

    def _build_program(self, program) -> Engine:
        """The engine of a PyTorch FP16 program (backends that accept ``"torch"``)."""
        raise BackendError(f"backend {self.name!r} declares it accepts PyTorch programs but builds none")

    @abstractmethod
    def describe(self) -> str:
        """One line: what runs the FP16 model, where (``"emulate: ONNX Runtime CPU, ..."``)."""

    def build_module(self, prefix: Any, example_inputs: Sequence[Any] = ()) -> Engine | None:
        """The engine of an FP32 PyTorch prefix (``torch.fx.GraphModule``) run in FP16: its
        :func:`~fp16guard.backends.torch_program.half_program`, built by :meth:`build`. None where this
        backend takes no PyTorch programs. Bisect calls it for a backend that takes no ONNX models."""
        if "torch" not in self.accepts:
            return None
        from fp16guard.backends.torch_program import half_program

        return self.build(half_program(prefix))
