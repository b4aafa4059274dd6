"""Models and inputs named on the command line: ``.onnx``, ``.pt2``, or ``package.module:factory``."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fp16guard.errors import InputError, ModelLoadError, first_line
from fp16guard.files import check_readable

log = logging.getLogger("fp16guard")


def model_kind(spec: str) -> str:
    """``onnx``, ``pt2`` or ``factory`` for a MODEL argument.

    Raises:
        ModelLoadError: none of the three forms.
    """
    if spec.endswith(".onnx"):
        return "onnx"
    if spec.endswith(".pt2"):
        return "pt2"
    if ":" in spec and not spec.startswith(("/", ".")):
        return "factory"
    raise ModelLoadError(f"cannot tell what {spec!r} is: give an .onnx file, a .pt2 ExportedProgram, "
                         "or package.module:factory with --checkpoint")


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
    kind = model_kind(spec)
    if kind == "pt2":
        path = Path(spec)
        check_readable(path, "ExportedProgram", ModelLoadError)
        return load_program(path).module()
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
