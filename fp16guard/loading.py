"""Models named on the command line or given to the Python API, through one table of formats.

:data:`MODEL_FORMATS` maps a file suffix (``.onnx``, ``.pt2``) to a :class:`ModelFormat`: its loader
and the :class:`Framework` (ONNX or PyTorch) it gives, which picks every stage's target. The
command line (:func:`load_model`, its checks and messages), ``bisect`` and the fix pipeline
(:func:`open_model`) read it; a new format is one loader and one row. :func:`framework_of` is the one
place ONNX-or-PyTorch is decided, once per command. ``package.module:factory`` (a callable
returning a ``torch.nn.Module``) is the one form without a suffix (:func:`load_torch_model`).
What a PyTorch model declares about its inputs is read here too (:func:`check_program_inputs`,
:func:`by_forward_names`).

torch is imported where used: ``--help`` reads the table without it.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import io
import logging
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

from fp16guard.errors import InputError, ModelLoadError, first_line
from fp16guard.files import check_readable
from fp16guard.named_input import NamedInput

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fp16guard")

#: How messages name the one model form without a suffix.
FACTORY = "package.module:factory"


class Framework(str, enum.Enum):
    """The target a model gives: ``ONNX`` (an ``onnx.ModelProto``) or ``TORCH`` (a ``torch.nn.Module``
    or ``ExportedProgram``). A ``str`` enum: a member equals, prints and serializes as its former
    string (``Framework.ONNX == "onnx"``; a plan's ``framework``, ``Example.framework``)."""

    ONNX = "onnx"
    TORCH = "torch"

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(frozen=True)
class ModelFormat:
    """One row of :data:`MODEL_FORMATS`: a model file type.

    Attributes:
        suffix: ``.onnx``, with its dot (matched case-sensitively, at the end of the name).
        framework: the :class:`Framework` its models give.
        noun: how messages name it, starting with its article (``an .onnx file``).
        load: ``load(path) -> model``: an ``onnx.ModelProto`` or a ``torch.nn.Module`` in eval mode;
            raises :class:`ModelLoadError` for a missing or unreadable file.
    """

    suffix: str
    framework: Framework
    noun: str
    load: Callable[[Path], Any]

    @property
    def short(self) -> str:
        """The suffix with the noun's article: ``an .onnx``."""
        return f"{self.noun.split()[0]} {self.suffix}"


def _load_onnx(path: Path):
    """An ``.onnx`` file as an ``onnx.ModelProto`` (:func:`fp16guard.onnx_graph.load_onnx`)."""
    from fp16guard.onnx_graph import load_onnx

    return load_onnx(path)


def _load_pt2(path: Path):
    """A ``.pt2`` file as the module of its program (:func:`load_program`, no code run)."""
    check_readable(path, "ExportedProgram", ModelLoadError)
    return load_program(path).module()


#: Model files by suffix, in the order messages list them: the one list of what MODEL may be.
MODEL_FORMATS: dict[str, ModelFormat] = {
    ".onnx": ModelFormat(".onnx", Framework.ONNX, "an .onnx file", _load_onnx),
    ".pt2": ModelFormat(".pt2", Framework.TORCH, "a .pt2 ExportedProgram", _load_pt2),
}


def model_format(spec: str | Path | None) -> ModelFormat | None:
    """The row of :data:`MODEL_FORMATS` whose suffix ends ``spec``; None for none (a factory, an
    unknown file, no model)."""
    return next((f for f in MODEL_FORMATS.values() if str(spec or "").endswith(f.suffix)), None)


def model_forms() -> str:
    """What MODEL may be, for messages and ``--help``: ``an .onnx file, a .pt2 ExportedProgram, or
    package.module:factory``."""
    return ", ".join([f.noun for f in MODEL_FORMATS.values()] + [f"or {FACTORY}"])


def model_files(*, outputs: bool = False) -> str:
    """The model file types, for messages: ``an .onnx or .pt2 file``; ``outputs``: what ``fix -o``
    writes, ``an .onnx or (PyTorch models) a .pt2`` (a PyTorch format only from a PyTorch model)."""
    if outputs:
        return " or ".join(("(PyTorch models) " if f.framework is Framework.TORCH else "") + f.short
                           for f in MODEL_FORMATS.values())
    first, *rest = MODEL_FORMATS.values()
    return " or ".join([first.short, *(f.suffix for f in rest)]) + " file"


def model_kind(spec: str) -> str:
    """``onnx``, ``pt2`` (the format's suffix without its dot) or ``factory`` for a MODEL argument.

    Raises:
        ModelLoadError: none of :data:`MODEL_FORMATS` nor ``package.module:factory``.
    """
    fmt = model_format(spec)
    if fmt is not None:
        return fmt.suffix.lstrip(".")
    if _is_factory(spec):
        return "factory"
    raise ModelLoadError(f"cannot tell what {spec!r} is: give {model_forms()} with --checkpoint")


def _is_factory(spec: str) -> bool:
    """``package.module:factory`` (a path is not one, even with a colon)."""
    return ":" in spec and not spec.startswith(("/", "."))


def framework_of(model) -> Framework:
    """ONNX or PyTorch: the one decision of which target a model gives, made once per command.

    Args:
        model: an ``onnx.ModelProto``; a ``torch.nn.Module`` or ``torch.export.ExportedProgram``; or
            a path (``str``/``Path``): by its :data:`MODEL_FORMATS` row, ``package.module:factory``
            PyTorch, any other path ONNX (the Python API takes a path as an ``.onnx`` file).

    Raises:
        ModelLoadError: anything else (the message names its type).
    """
    if isinstance(model, (str, os.PathLike)):
        fmt = model_format(model)
        if fmt is not None:
            return fmt.framework
        return Framework.TORCH if _is_factory(str(model)) else Framework.ONNX
    onnx = sys.modules.get("onnx")  # not imported: not a ModelProto
    if onnx is not None and isinstance(model, onnx.ModelProto):
        return Framework.ONNX
    import torch

    if isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        return Framework.TORCH
    raise ModelLoadError(f"cannot tell what a {type(model).__name__} is: give an onnx.ModelProto, a torch.nn.Module, "
                         f"or the path of {' or '.join(f.noun for f in MODEL_FORMATS.values())}")


class OpenModel(NamedTuple):
    """A model given to the Python API, as the stages take it (:func:`open_model`)."""

    model: Any  #: an ``onnx.ModelProto`` or ONNX path, a ``torch.nn.Module`` or ``ExportedProgram``
    framework: Framework  #: which target it gives
    name: str | None  #: the file name of a model given by path, else None


def open_model(model) -> OpenModel:
    """``(model, framework, name)`` of a model given to the Python API (``bisect``, ``fix``,
    ``calibrate``): the one place their ONNX-or-PyTorch decision is made (:func:`framework_of`).

    Objects are returned as they are; a path of a PyTorch format is loaded (``.pt2``: its program's
    module, in eval mode); a path of an ONNX format, or of none, stays a path, which the stage loads.

    Raises:
        ModelLoadError: see :func:`framework_of`; an unreadable ``.pt2``.
    """
    framework = framework_of(model)
    if not isinstance(model, (str, os.PathLike)):
        return OpenModel(model, framework, None)
    fmt = model_format(model)
    loaded = fmt.load(Path(model)) if fmt is not None and framework is Framework.TORCH else model
    return OpenModel(loaded, framework, Path(model).name)


def load_model(spec: str, checkpoint: str | None = None) -> tuple[Any, Framework]:
    """``(model, framework)`` of a MODEL argument: a file by its :data:`MODEL_FORMATS` row (an ONNX
    file as an ``onnx.ModelProto``), ``package.module:factory`` by :func:`load_torch_model`.

    Raises:
        ModelLoadError: none of these forms (``cannot tell what ...``), or the model cannot be loaded.
    """
    fmt = model_format(spec)
    if fmt is not None:
        return fmt.load(Path(spec)), fmt.framework
    model_kind(spec)  # a factory, or "cannot tell what"
    return load_torch_model(spec, checkpoint), Framework.TORCH


def load_torch_model(spec: str, checkpoint: str | None = None) -> torch.nn.Module:
    """Load a PyTorch model for inspection, in eval mode on the CPU.

    Args:
        spec: a ``.pt2`` file saved by ``torch.export.save``, or ``package.module:factory``, a
            callable that takes no arguments and returns a ``torch.nn.Module``.
        checkpoint: a state_dict file (``torch.save``; a dict with a ``state_dict`` or ``model``
            key is unwrapped) loaded into the factory's module with ``strict=True``.

    Raises:
        ModelLoadError: the file is missing or unreadable; the factory cannot be imported (also
            a syntax error or an exception in its module), is not callable, needs arguments, raises,
            or does not return a module; or the checkpoint does not match it.
    """
    import torch

    kind = model_kind(spec)
    fmt = model_format(spec)
    if fmt is not None and fmt.framework is Framework.TORCH:
        return fmt.load(Path(spec))
    if kind != "factory":
        raise ModelLoadError(f"{spec} is not a PyTorch model")
    module_name, _, attr = spec.partition(":")
    try:
        with _users_code(f"importing {module_name}"):
            factory = getattr(importlib.import_module(module_name), attr)
    except ModelLoadError:  # sys.exit while importing
        raise
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import {spec}: {e}") from None
    except SyntaxError as e:
        raise ModelLoadError(f"cannot import {spec}: SyntaxError in {Path(e.filename or '?').name} line {e.lineno}: "
                             f"{e.msg}") from None
    except Exception as e:  # the user's module raised while importing
        raise ModelLoadError(f"cannot import {spec}: importing {module_name} raised {type(e).__name__}: "
                             f"{first_line(e)}") from None
    if not callable(factory):
        raise ModelLoadError(f"{spec} is {type(factory).__name__}, not a callable that returns a torch.nn.Module")
    try:
        needed = [p.name for p in inspect.signature(factory).parameters.values()
                  if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):  # a builtin without a signature: call it and see
        needed = []
    if needed:
        raise ModelLoadError(f"{spec} takes no arguments here but needs {', '.join(needed)}; write a factory "
                             f"that builds the model, e.g. def build(): return {attr}(...)")
    try:
        with _users_code(f"{spec}()"):
            model = factory()
    except ModelLoadError:
        raise
    except Exception as e:  # the user's factory failed: its own error, in one line
        raise ModelLoadError(f"{spec}() raised {type(e).__name__}: {first_line(e)}") from None
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise ModelLoadError(f"{spec}() returned a TorchScript {type(model).__name__}; fp16guard captures Python "
                             f"modules with torch.export: return the torch.nn.Module before torch.jit.script/trace "
                             f"(or export the TorchScript model to ONNX and give the .onnx)")
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        path = Path(checkpoint)
        check_readable(path, "checkpoint", ModelLoadError)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file; weights_only runs no code
            raise ModelLoadError(f"{path}: not a readable state_dict ({type(e).__name__}: {first_line(e)}); "
                                 f"write it with torch.save(model.state_dict(), path)") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        _check_state_dict(state, path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
            raise ModelLoadError(f"{path} does not fit {spec}: {detail[:300]}") from None
    return model.eval()


#: Where a ``.pt2`` archive keeps Python objects that only ``pickle`` reads (TorchScript custom
#: classes and opaque objects: torch.export.pt2_archive.constants' CUSTOM_OBJ/OPAQUE_OBJ prefixes).
PICKLED_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")


def load_program(path: str | Path):
    """Read a ``.pt2`` file written by ``torch.export.save`` without executing any code in it.

    ``torch.export.load`` unpickles several members of the archive (the example inputs, pickled
    weights and constants) and retries a failed weights-only read with ``weights_only=False``,
    which runs whatever the pickle says. Here every ``torch.load`` inside runs with weights-only
    semantics (``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which ``torch.load`` reads at each call and
    which overrides ``weights_only=False``), and an archive holding pickled Python objects
    (custom classes, opaque objects), which only plain ``pickle`` reads, is refused.

    Returns:
        the ``torch.export.ExportedProgram``.

    Raises:
        ModelLoadError: not a readable archive, or one holding pickled Python objects.
    """
    import torch

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a readable ExportedProgram ({type(e).__name__}: {first_line(e)}); "
                             f"write it with torch.export.save") from None
    pickled = [n for n in names if Path(n).name.startswith(PICKLED_OBJECT_PREFIXES)]
    if pickled:
        raise ModelLoadError(f"{path}: holds pickled Python objects ({Path(pickled[0]).name}), which fp16guard "
                             f"does not load because unpickling runs code; export the model without custom "
                             f"or opaque objects")
    quiet = logging.getLogger("torch.export")  # it logs a whole traceback before raising
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch's warnings about the refused pickle
            return torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable archive; no code from it ran
        raise ModelLoadError(f"{path}: not a readable ExportedProgram ({type(e).__name__}: {first_line(e)[:200]}); "
                             f"write it with torch.export.save (fp16guard reads archives with weights-only "
                             f"unpickling)") from None
    finally:
        quiet.setLevel(level)
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


@contextlib.contextmanager
def _users_code(what: str) -> Iterator[None]:
    """Run the user's module import or factory: what it prints goes to the ``fp16guard`` log (shown
    with ``-v``), not to the terminal, and ``sys.exit`` inside it (a module that parses the command
    line at import, a factory that exits) is an error, not the end of fp16guard.

    Raises:
        ModelLoadError: the code called ``sys.exit``; the message quotes its last printed line.
    """
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except SystemExit as e:
        printed = [line.strip() for line in (err.getvalue() + out.getvalue()).splitlines() if line.strip()]
        last = printed[-1].split(": error: ", 1)[-1] if printed else ""  # argparse's "prog: error: " is not ours
        said = f" after printing {last[:160]!r}" if last else ""
        hint = " (it parses the command line when imported: guard that with if __name__ == '__main__')" \
            if "usage:" in err.getvalue() + out.getvalue() else ""
        raise ModelLoadError(f"{what} called sys.exit({e.code!r}){said}{hint}; a factory must return the "
                             f"model") from None
    finally:
        for stream, text in (("stdout", out.getvalue()), ("stderr", err.getvalue())):
            for line in text.splitlines():
                log.info("%s printed on %s: %s", what, stream, line)


def _check_state_dict(state, path: Path) -> None:
    """A checkpoint must be a mapping of parameter names (str) to tensors.

    Raises:
        ModelLoadError: a bare tensor, a list, or keys that are not strings, naming what was found.
    """
    import torch

    if isinstance(state, torch.Tensor):
        raise ModelLoadError(f"{path} holds a single Tensor of shape {list(state.shape)}, not a state_dict; "
                             f"write it with torch.save(model.state_dict(), path)")
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state_dict (a dict of parameter names "
                             f"to tensors); write it with torch.save(model.state_dict(), path)")
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise ModelLoadError(f"{path}: the state_dict key {odd!r} is a {type(odd).__name__}, not a parameter name; "
                             f"write it with torch.save(model.state_dict(), path)")
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise ModelLoadError(f"{path}: the state_dict entry {odd!r} holds a {type(state[odd]).__name__}, not a "
                             f"tensor; write it with torch.save(model.state_dict(), path)")


def check_program_inputs(model, inputs: Sequence[Sequence[torch.Tensor]], what: str = "input",
                         labels: Sequence[str] = ()) -> None:
    """Refuse inputs that a module unflattened from a ``.pt2`` cannot take: its placeholders keep
    the shapes the program was exported with, a static dimension must match (the program's guard
    would fail with ``AssertionError: Guard failed``), a dynamic one (a ``SymInt``) takes any size.

    Args:
        model: any module; only a ``GraphModule`` whose placeholders carry ``meta["val"]`` (a
            ``torch.export`` program) is checked.
        inputs: per input, the tensors ``forward`` is called with, by position.

    Raises:
        InputError: naming the input, its shape and the shape the program was exported for.
    """
    import torch

    if not isinstance(model, torch.fx.GraphModule):
        return
    specs = [n.meta.get("val") for n in model.graph.nodes if n.op == "placeholder"]
    if not specs or any(not isinstance(v, torch.Tensor) for v in specs):
        return
    for i, tensors in enumerate(inputs):
        label = labels[i] if i < len(labels) else f"#{i + 1}"
        for spec, t in zip(specs, tensors):
            if not isinstance(t, torch.Tensor):
                continue
            exported = [d if isinstance(d, int) else None for d in spec.shape]
            if len(exported) != t.dim() or any(d is not None and d != s for d, s in zip(exported, t.shape)):
                shown = "[" + ", ".join("*" if d is None else str(d) for d in exported) + "]"
                raise InputError(f"{what} {label} has shape {list(t.shape)}, but the program was exported for "
                                 f"{shown} (static dimensions must match); give inputs of that shape, or export "
                                 f"with dynamic_shapes")


def refuse_fp16_module(model, what: str) -> None:
    """Raise when a PyTorch model already holds FP16 (or BF16) weights: ``model.half()``, a
    ``.pt2`` exported from one, or a module with some layers converted. An FP16 or BF16 buffer beside
    FP32 parameters (a constant table kept in bfloat16, such as ALiBi slopes) is not refused.

    Args:
        model: a ``torch.nn.Module`` or ``torch.export.ExportedProgram``.
        what: what needs the FP32 model, completing "give <what> the FP32 model".

    Raises:
        ModelLoadError: one line naming the first such parameter or buffer and what to give instead.
    """
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        tensors = {**model.state_dict, **model.constants}.items()
        params = set(model.graph_signature.parameters)
    elif isinstance(model, torch.nn.Module):
        tensors = [*model.named_parameters(), *model.named_buffers()]
        params = {name for name, _ in model.named_parameters()}
    else:
        return
    narrow = {torch.float16: ("FP16", "float16", ".half()"), torch.bfloat16: ("BF16", "bfloat16", ".bfloat16()")}
    # a narrow buffer beside FP32 weights is a constant the model keeps so on purpose (ALiBi slopes in bfloat16)
    fp32_weights = any(name in params and isinstance(t, torch.Tensor) and t.dtype == torch.float32 for name, t in tensors)
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype in narrow and (name in params or not fp32_weights):
            fmt, dtype, call = narrow[t.dtype]
            raise ModelLoadError(f"the model is already converted to {fmt} ({name!r} is {dtype}); give {what} the "
                                 f"FP32 model (without {call}): fp16guard makes the FP16 version itself")


def by_forward_names(model, item: NamedInput) -> NamedInput:
    """``item`` with its named arrays (``.npz`` keys other than ``arr_N``) in the order of
    ``model.forward``'s parameters, so a PyTorch model is fed by name as an ONNX model is.

    Items without names, raw images and waveforms are returned as they are.

    Raises:
        InputError: the names are not parameters of ``forward``, or a parameter without a default is missing.
    """
    if item.kind.raw or not item.names or all(re.fullmatch(r"arr_\d+", n) for n in item.names):
        return item
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # no signature to read: keep the file's order
        return item
    names = [p.name for p in params]
    required = [p.name for p in params if p.default is p.empty]
    if not set(item.names) <= set(names) or not set(required) <= set(item.names):
        raise InputError(f"{item.label}: its arrays are named {', '.join(item.names)}, forward takes "
                         f"{', '.join(names)}; name them alike or save them in order with np.savez(f, a, b)")
    order = [n for n in names if n in item.names]
    if order[-1] != names[len(order) - 1]:
        raise InputError(f"{item.label}: forward's parameters before {order[-1]} need arrays too "
                         f"(forward takes {', '.join(names)})")
    return NamedInput(item.label, tuple(item.arrays[item.names.index(n)] for n in order), names=tuple(order))
