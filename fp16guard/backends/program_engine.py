"""A PyTorch FP16 program behind the :class:`~fp16guard.backends.base.Engine` interface
(:class:`ProgramEngine`): what the ``emulate`` backend (the program run by
:func:`~fp16guard.backends.torch_program.run_emulated`) and the ``torch`` backend (a copy on CUDA,
:func:`~fp16guard.backends.torch_program.program_on`) build from a program.

It stands above both the interface (:mod:`fp16guard.backends.base`) and the program helpers
(:mod:`fp16guard.backends.torch_program`), which know nothing of each other's engines.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from fp16guard.backends.base import Engine
from fp16guard.backends.torch_program import as_numpy, program_io


class ProgramEngine(Engine):
    """A PyTorch program behind the :class:`~fp16guard.backends.base.Engine` interface.

    Args:
        program: the program (a ``GraphModule`` taking the inputs positionally).
        call: runs it, ``call(*tensors) -> tensors``
            (:func:`~fp16guard.backends.torch_program.run_emulated`, or the program on CUDA).
        device: where the inputs go before the call.
        description: what runs it (:attr:`Engine.description`).

    Outputs come back as numpy (:func:`~fp16guard.backends.torch_program.as_numpy`), flattened in
    the program's output order.
    """

    def __init__(self, program: fx.GraphModule, call: Callable[..., Sequence[torch.Tensor]], device: torch.device,
                 description: str):
        self.program = program
        self.call = call
        self.device = torch.device(device)
        self.description = description
        self.input_names, self.output_names = program_io(program)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The program on the checked feeds, in placeholder order."""
        args = [torch.from_numpy(np.require(feeds[n], requirements=["C", "W"])).to(self.device)
                for n in self.input_names]
        with torch.no_grad():
            out = self.call(*args)
        return [as_numpy(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
