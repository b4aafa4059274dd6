"""The floating tensors inside a module's arguments or outputs (what FInspect's hooks measure)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterator

import torch


def iter_tensors(obj: Any, _seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Yield every floating tensor inside ``obj``.

    Walks tensors, lists, tuples (named tuples too), dicts and other mappings (``ModelOutput``),
    and dataclass instances; anything else is ignored. Integer and bool tensors are skipped: they
    are indices and masks, not activations.
    """
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
        return
    if isinstance(obj, (str, bytes)) or obj is None:
        return
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name, None), seen)


def floating_tensors(obj: Any) -> list[torch.Tensor]:
    """``list(iter_tensors(obj))``: the same tensors in the same order, faster for the hooks' usual
    arguments (a tuple, list or dict of tensors and ``None``s, or a hook's ``(args, kwargs)``: no
    generator per level)."""
    if type(obj) is tuple and len(obj) == 2 and type(obj[0]) is tuple and type(obj[1]) is dict:
        parts = (obj[0], obj[1].values())  # a hook's (args, kwargs)
    elif type(obj) in (tuple, list):
        parts = (obj,)
    elif type(obj) is dict:
        parts = (obj.values(),)
    else:
        return list(iter_tensors(obj))
    out: list[torch.Tensor] = []
    seen: set[int] = {id(obj)}
    for part in parts:
        for v in part:
            if type(v) is torch.Tensor:
                if v.is_floating_point():
                    out.append(v)
            elif v is not None:
                out += iter_tensors(v, seen)
    return out
