"""The typed FP16 program behind :func:`fp16guard.fixing.torch_pass.to_fp16_program`, built one source
node at a time (:class:`Fp16Program`): FP16 constants and activations, FP32 graph inputs and outputs,
each float value kept in the precision its producer ran in (FP16, or FP32 / BF16 in an island) and
cast once for each consumer that runs in another."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_map

from fp16guard.fixing.torch_edit import aten, node_writes_float
from fp16guard.torch_graph import get_attr


class Fp16Program:
    """The typed program :func:`fp16guard.fixing.torch_pass.to_fp16_program` builds, one source node
    at a time: each float value is kept in the precision its producer ran in and cast (once) for
    consumers that need another one."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.g = fx.Graph()
        self.g._codegen = gm.graph._codegen
        self.new = torch.nn.Module()
        self.env: dict[torch.dtype, dict[fx.Node, Any]] = {}  # value as consumers of each dtype read it
        self.made: dict[fx.Node, torch.dtype] = {}  # the dtype a float value's producer wrote
        self.buffers: dict[tuple[str, torch.dtype], fx.Node] = {}
        self.count = 0

    def cast(self, node: fx.Node, dtype: torch.dtype) -> fx.Node:
        """``node`` converted to ``dtype`` (an ``aten._to_copy``)."""
        return self.g.call_function(aten._to_copy.default, (node,), {"dtype": dtype})

    def const(self, target: str, dtype: torch.dtype) -> fx.Node:
        """A ``get_attr`` for the constant at ``target`` stored as ``dtype`` (floats only)."""
        key = (target, dtype)
        if key not in self.buffers:
            t = get_attr(self.gm, target)
            name = f"c{self.count}"
            self.count += 1
            self.new.register_buffer(name, t.detach().to(dtype) if t.is_floating_point() else t.detach().clone())
            self.buffers[key] = self.g.get_attr(name)
        return self.buffers[key]

    def read(self, node: fx.Node, dtype: torch.dtype):
        """The value of ``node`` for a consumer running in ``dtype`` (FP16, FP32 or BF16)."""
        if node.op == "get_attr":
            t = get_attr(self.gm, node.target)
            if not isinstance(t, torch.Tensor):
                return None
            return self.const(node.target, dtype if t.is_floating_point() else t.dtype)
        env = self.env.setdefault(dtype, {})
        if node not in env:
            made = self.made.get(node)  # None: not a float value, the same for every reader
            env[node] = self.cast(self.env[made][node], dtype) if made is not None else self.env[None][node]
        return env[node]

    def add_input(self, node: fx.Node) -> None:
        """A graph input: a float one is FP32 (cast to FP16 when an FP16 op first reads it)."""
        p = self.g.placeholder(node.name)
        p.meta.update(node.meta)
        self.store(node, p, torch.float32 if node_writes_float(node) else None)

    def store(self, node: fx.Node, value, dtype: torch.dtype | None) -> None:
        """Record ``value`` as ``node``'s, written in ``dtype`` (None: not a float value, read as it is)."""
        self.env.setdefault(dtype, {})[node] = value
        if dtype is not None:
            self.made[node] = dtype

    def add_output(self, node: fx.Node) -> None:
        """The graph's output node: every output read as FP32."""
        outs = tree_map(lambda a: self.read(a, torch.float32) if isinstance(a, fx.Node) else a, node.args[0])
        self.g.output(outs)

    def add_op(self, node: fx.Node, dtype: torch.dtype) -> None:
        """A copy of the op ``node`` running in ``dtype`` (FP16, or FP32 / BF16 in an island): its float
        inputs are read (cast if need be) in that precision, and an explicit ``dtype=float32`` of an op
        running in FP16 or BF16 becomes that dtype."""
        args, kwargs = tree_map(lambda a: self.read(a, dtype) if isinstance(a, fx.Node) else a,
                                (node.args, node.kwargs))
        kwargs = dict(kwargs)
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = dtype  # an explicit FP32 cast inside the model stays in the FP16 program
        # ... also when the dtype is positional (T5's ``hidden.to(torch.float32)``: aten.to.dtype)
        args = tuple(dtype if a is torch.float32 else a for a in args)
        out = self.g.create_node(node.op, node.target, tuple(args), kwargs, name=node.name)
        self.store(node, out, dtype if node_writes_float(node) else None)

    def module(self) -> fx.GraphModule:
        """The finished program as a ``GraphModule`` (its constants are the new buffers)."""
        self.g.lint()
        return fx.GraphModule(self.new, self.g)
