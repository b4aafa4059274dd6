"""One input through a probe: the forward :func:`~fp16guard.inspect.hooks.run_torch` and the
streamed inspection (:mod:`fp16guard.inspect.streaming`) both run per input."""

from __future__ import annotations

from typing import Any

from fp16guard.errors import InputError
from fp16guard.inputs import NamedInput, torch_args


def probe_forward(probe: Any, item: NamedInput, device: Any, half: bool) -> None:
    """Run ``item`` through ``probe.run`` (an active :class:`~fp16guard.inspect.hooks.FInspect`).

    Args:
        probe: the active probe.
        item: one input; its tensors are moved to ``device``, floating ones cast to FP16 if ``half``.
        device: a ``torch.device`` (or its name).
        half: the model runs in FP16.

    Raises:
        InputError: the model rejected the input (the message names it and its shapes).
    """
    tensors = [t.to(device) for t in torch_args(item)]
    if half:
        tensors = [t.half() if t.is_floating_point() else t for t in tensors]
    try:
        probe.run(*tensors)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shapes = ", ".join(str(list(t.shape)) for t in tensors)
        raise InputError(f"the model rejected input {item.label} of shape {shapes}: "
                         f"{str(e).strip().splitlines()[0]}") from None
