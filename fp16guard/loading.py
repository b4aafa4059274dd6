"""Models and inputs named on the command line: ``.onnx``, ``.pt2``, or ``package.module:factory``."""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path

import torch

from fp16guard.errors import ModelLoadError, first_line


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
        if path.is_dir():
            raise ModelLoadError(f"{path} is a folder, not an ExportedProgram file")
        if not path.is_file():
            raise ModelLoadError(f"ExportedProgram not found: {path}")
        quiet = logging.getLogger("torch.export")  # it logs a whole traceback before raising
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            return torch.export.load(str(path)).module()
        except Exception as e:
            raise ModelLoadError(f"{path}: not a readable ExportedProgram ({type(e).__name__}: {first_line(e)}); "
                                 f"write it with torch.export.save") from None
        finally:
            quiet.setLevel(level)
    if kind != "factory":
        raise ModelLoadError(f"{spec} is not a PyTorch model")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
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
        model = factory()
    except Exception as e:  # the user's factory failed: its own error, in one line
        raise ModelLoadError(f"{spec}() raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelLoadError(f"checkpoint not found: {path}")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path}: not a readable state_dict ({type(e).__name__}: {first_line(e)}); "
                                 f"write it with torch.save(model.state_dict(), path)") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
            raise ModelLoadError(f"{path} does not fit {spec}: {detail[:300]}") from None
    return model.eval()
