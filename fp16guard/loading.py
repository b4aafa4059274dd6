"""Models and inputs named on the command line: ``.onnx``, ``.pt2``, or ``package.module:factory``."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from fp16guard.errors import ModelLoadError


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
        ModelLoadError: the file is missing or unreadable, the factory cannot be imported or does
            not return a module, or the checkpoint does not match it.
    """
    kind = model_kind(spec)
    if kind == "pt2":
        path = Path(spec)
        if not path.is_file():
            raise ModelLoadError(f"ExportedProgram not found: {path}")
        try:
            return torch.export.load(str(path)).module()
        except Exception as e:
            raise ModelLoadError(f"{path}: not a readable ExportedProgram ({type(e).__name__}: {e})") from None
    if kind != "factory":
        raise ModelLoadError(f"{spec} is not a PyTorch model")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"cannot import {spec}: {e}") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelLoadError(f"checkpoint not found: {path}")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path}: not a readable state_dict ({type(e).__name__}: {e})") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelLoadError(f"{path} does not fit {spec}: {str(e).splitlines()[0]}") from None
    return model.eval()
