"""PyTorch FP16 programs as the backends run them: strict emulation on the CPU, a copy on CUDA,
and the naive FP16 program of a bisect prefix.

A *program* is a ``torch.fx.GraphModule`` that takes and returns FP32 tensors and computes in FP16
inside: :func:`fp16guard.fixing.torch_pass.to_fp16_program` makes one from a fixed graph (FP32 or
BF16 islands kept), :func:`half_program` from an FP32 bisect prefix (every parameter in FP16).

* :func:`run_emulated`: strict FP16 storage, FP32 arithmetic, on the CPU (the ``emulate``
  backend's PyTorch path, the twin of :func:`fp16guard.fp16_onnx.emulation_model`);
* :func:`program_on`: a copy on a device, recorded devices rewritten (the ``torch`` backend);
* :func:`program_io`, :func:`as_numpy`: a program's inputs and outputs, and its tensors as numpy
  (what :class:`fp16guard.backends.program_engine.ProgramEngine` puts behind the ``Engine``
  interface).

This module is the shared layer's home of the emulator (a backend may not import a stage):
:mod:`fp16guard.fixing.torch_pass` still keeps its own copies of :func:`run_emulated` and
:func:`program_on` for its callers, to become re-exports of these.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map


def run_emulated(program: fx.GraphModule, *args: torch.Tensor) -> list[torch.Tensor]:
    """Run an FP16 program with strict FP16 storage and FP32 arithmetic, on the CPU.

    Each op gets its FP16 (and BF16) inputs converted to FP32, runs in FP32, and its result is
    rounded to the dtype the op would produce on the FP16 inputs (found on the ``meta`` device), so
    every FP16 value is exactly what an FP16 kernel with FP32 accumulation stores: values beyond
    65504 become inf, tiny ones subnormal or zero. A BF16 island's values are rounded to BF16 the
    same way (round to nearest even, inf beyond :data:`~fp16guard.fp16.BF16_MAX`). This is what the
    ``emulate`` backend does for ONNX (:func:`fp16guard.fp16_onnx.emulation_model`).

    Args:
        program: from :func:`~fp16guard.fixing.torch_pass.to_fp16_program` (or :func:`half_program`).
        args: graph inputs (FP32 tensors).

    Returns:
        The outputs, flattened, as given by the program (FP32 at the boundary).
    """
    def up(a):
        """FP16 and BF16 tensors to FP32."""
        return a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a

    def meta(a):
        """A tensor's stand-in on the meta device."""
        return torch.empty_like(a, device="meta") if isinstance(a, torch.Tensor) else a

    class Emulator(fx.Interpreter):
        """Runs each op in FP32 on FP16-stored inputs and rounds its result back."""

        def call_function(self, target, args, kwargs):
            """The op in FP32, rounded to the dtype it has in FP16."""
            out = target(*tree_map(up, args), **tree_map(up, kwargs))
            try:
                want = target(*tree_map(meta, args), **tree_map(meta, kwargs))
            except Exception as e:  # noqa: BLE001 - an op with no meta kernel keeps its FP32 dtype
                if "dtype" in str(e):  # FP16 and FP32 mixed where a kernel needs one: CUDA refuses it too
                    raise
                return out
            return tree_map(lambda o, w: o.to(w.dtype) if isinstance(o, torch.Tensor) and isinstance(w, torch.Tensor)
                            and o.is_floating_point() else o, out, _match(want, out))

    with torch.no_grad():
        out = Emulator(program).run(*args)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _match(want, out):
    """``want`` shaped like ``out`` for ``tree_map`` (a single tensor op may return a list)."""
    if isinstance(out, (list, tuple)) and not isinstance(want, (list, tuple)):
        return type(out)([want] * len(out))
    return want


def program_on(program: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of ``program`` on ``device``: its constants moved, and the devices ``torch.export``
    recorded when it captured on another one (``arange(..., device=cpu)``, ``to(x, cpu)``)
    rewritten (``program`` itself is not changed)."""
    moved = copy.deepcopy(program).to(device)  # Module.to moves in place: hence the copy
    for module in moved.modules():  # tensor constants that are plain attributes (not buffers)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(module, name, value.to(device))

    def placed(a):
        """``device`` for a recorded device, else ``a``."""
        return device if isinstance(a, torch.device) else a

    for node in moved.graph.nodes:
        node.args = tuple(placed(a) for a in node.args)
        node.kwargs = {k: placed(v) for k, v in node.kwargs.items()}
    moved.recompile()
    return moved


def to_half(x):
    """``x`` in FP16 where it is a floating tensor (the entry cast of :func:`half_program`)."""
    return x.half() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def half_program(prefix: fx.GraphModule) -> fx.GraphModule:
    """The naive FP16 program of an FP32 module: a copy with every parameter and buffer in FP16
    and each floating input cast to FP16 on entry (:func:`to_half`); outputs come out as the ops
    write them (FP16). What ``.half()`` on a module and ``.half()`` on its inputs compute; the
    ``torch`` backend runs bisect prefixes this way.

    Args:
        prefix: an FP32 ``GraphModule`` whose placeholders are its inputs (not modified).
    """
    gm = copy.deepcopy(prefix).half()
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    if placeholders:
        with g.inserting_after(placeholders[-1]):  # the casts after every placeholder: those stay first
            for p in placeholders:
                cast = g.call_function(to_half, (p,))
                p.replace_all_uses_with(cast, delete_user_cb=lambda user, cast=cast: user is not cast)
    gm.recompile()
    return gm


def program_io(program: fx.GraphModule) -> tuple[list[str], list[str]]:
    """``(input names, output names)`` of a program: its placeholders, and its output leaves (the
    producing node's name, ``out<i>`` for a leaf that is not a node)."""
    inputs = [n.name for n in program.graph.nodes if n.op == "placeholder"]
    output = next(n for n in program.graph.nodes if n.op == "output")
    leaves = tree_flatten(output.args[0])[0]
    return inputs, [leaf.name if isinstance(leaf, fx.Node) else f"out{i}" for i, leaf in enumerate(leaves)]


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor on the host as numpy: floating ones as FP32 (FP16 and BF16 widened), other dtypes kept."""
    t = t.detach()
    if t.is_floating_point():
        t = t.float()
    return t.cpu().numpy()
