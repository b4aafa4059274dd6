"""Models and inputs named on the command line: ``.onnx``, ``.pt2``, or ``package.module:factory``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .inputs import InputError, NamedInput
from .onnx_inspector import ModelLoadError


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


def to_tensors(item: NamedInput) -> tuple[torch.Tensor, ...]:
    """Arrays of a :class:`NamedInput` as tensors for a generic PyTorch model.

    Images become ``float32 [1, 3, H, W]`` in [0, 1], waveforms ``float32 [1, T]``; arrays are
    taken as they are (float64 is cast to float32).
    """
    if item.kind == "image":
        return (torch.from_numpy(item.arrays[0].astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous(),)
    if item.kind == "audio":
        return (torch.from_numpy(item.arrays[0].astype(np.float32))[None],)
    out = []
    for a in item.arrays:
        t = torch.from_numpy(np.ascontiguousarray(a))
        out.append(t.float() if t.dtype == torch.float64 else t)
    return tuple(out)


def run_torch(model: torch.nn.Module, inputs: Sequence[NamedInput], *, ops: bool = False,
              device: str = "cpu", half: bool = False):
    """Run ``model`` on every input under :class:`~fp16guard.FInspect` and return the report.

    The model is deep-copied before it is moved to ``device`` or cast to FP16, so the caller's
    model is untouched.

    Raises:
        InputError: the model rejects an input (wrong shape or dtype); the message gives the
            input's shapes and the model's first error line.
    """
    from .inspector import FInspect

    if device != "cpu" or half:
        import copy

        model = copy.deepcopy(model).to(device)
        if half:
            model = model.half()
    with torch.no_grad(), FInspect(model, ops=ops) as probe:
        for item in inputs:
            tensors = [t.to(device) for t in to_tensors(item)]
            if half:
                tensors = [t.half() if t.is_floating_point() else t for t in tensors]
            try:
                model(*tensors)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                shapes = ", ".join(str(list(t.shape)) for t in tensors)
                raise InputError(f"the model rejected input {item.label} of shape {shapes}: "
                                 f"{str(e).strip().splitlines()[0]}") from None
    report = probe.report()
    from dataclasses import replace

    return replace(report, inputs=tuple(i.label for i in inputs))
