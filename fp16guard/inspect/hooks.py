"""``FInspect``: forward hooks that measure every module's activations against the FP16 range.

Usage::

    with FInspect(model) as probe:
        model(x)
    report = probe.report()          # one host sync here, none in the hooks
    for rec in report.transitions():
        print(rec.transition, rec.display_name, rec.outputs.amax)

How to read a report (a real trace, CREPE ``full`` in FP32 on speech; see the README)::

    from  conv2_BN   BatchNorm2d  inputs amax 3.1e+01  outputs amax 1.9e+04  ...

``from`` marks where an overflow starts (inputs finite and within 65504, outputs beyond it or
non-finite), ``to`` where it is absorbed again. ``first_nonfinite()`` gives the first layer, in
execution order, whose outputs hold inf/NaN although its inputs were finite: with the model in FP16
that is where the NaN was born; with the model in FP32, ``from`` predicts where FP16 would overflow.

Cost. Each floating tensor a module takes or returns is reduced to five numbers (see
:mod:`fp16guard.stats`) on its own device; the results stay there until :meth:`FInspect.report`,
which reads all of them with one transfer per device. A tensor handed from one module to the next
is measured once (an identity/version cache), and on CUDA the reduction is one Triton kernel
writing into a preallocated device buffer. ``benchmarks/inspect_overhead.py`` measures the overhead.

Hygiene. The inspector keeps all its state on the instance; nothing is stored on modules. On exit,
also when the forward raised, every hook is removed and the model's ``state_dict`` is untouched.
Instances nest (two probes on one model) and re-enter (the same probe entered twice counts once).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fp16guard.errors import InputError
from fp16guard.inputs import NamedInput, torch_args
from fp16guard.inspect import triton_stats
from fp16guard.inspect.report import CallRecord, InspectionReport
from fp16guard.inspect.static_check import check_module
from fp16guard.progress import step
from fp16guard.stats import RangeStats, tensor_stats
from fp16guard.torch_graph import inference_copy

logger = logging.getLogger("fp16guard")


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


class _StatsStore:
    """Device-side rows of statistics, one per measured tensor, read back in one go.

    ``measure`` returns a row number; rows are stacked into blocks at the end of every root
    forward (one small kernel, no sync) so a long calibration loop keeps a few tensors, not
    thousands.
    """

    def __init__(self, fused: bool | None):
        self._fused = fused is not False
        self._pending: list[torch.Tensor] = []
        self._blocks: list[tuple[torch.device, torch.Tensor, list[int]]] = []
        self._pending_rows: list[int] = []
        self._arenas: dict[int, triton_stats.StatsArena] = {}  # by CUDA device index
        self._arena_rows: list[tuple[int, int, int]] = []  # (row, device index, arena slot)
        self._numel: list[int] = []
        # id(tensor) -> (weakref to it, its version counter, row)
        self._cache: dict[int, tuple[weakref.ref, int, int]] = {}
        self._host: list[tuple[float, ...]] | None = None

    def _reduce(self, t: torch.Tensor, row: int) -> None:
        # No torch.no_grad() here: tensor_stats detaches first and the Triton kernel is invisible
        # to autograd, and entering the context costs more than the kernel launch on a slow CPU.
        if self._fused and triton_stats.available(t):
            index = t.get_device()
            arena = self._arenas.get(index)
            if arena is None:
                arena = self._arenas[index] = triton_stats.StatsArena(t.device)
            self._arena_rows.append((row, index, arena.reduce(t)))
        else:
            self._pending.append(tensor_stats(t))
            self._pending_rows.append(row)

    def measure(self, t: torch.Tensor, *, fresh: bool = False) -> int:
        """Row of ``t``'s statistics, computed now unless ``t`` is unchanged since last measured.

        Inference-mode tensors have no version counter, so they are always measured afresh, as is
        everything with ``fresh=True`` (outputs of in-place ops seen below autograd, where the
        version counter has not been bumped yet).
        """
        version = None if t.is_inference() else t._version
        hit = None if fresh else self._cache.get(id(t))
        if hit is not None and version is not None and hit[0]() is t and hit[1] == version:
            return hit[2]
        row = len(self._numel)
        self._numel.append(t.numel())
        self._reduce(t, row)
        self._host = None
        if version is not None:
            self._cache[id(t)] = (weakref.ref(t), version, row)
        return row

    def flush(self) -> None:
        """Stack pending rows per device (no host sync), forget the tensor cache, and re-read the
        Triton launch settings (once per forward, not per launch)."""
        by_device: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
        for stat, row in zip(self._pending, self._pending_rows):
            rows = by_device.setdefault(stat.device, ([], []))
            rows[0].append(stat)
            rows[1].append(row)
        for device, (stats, rows) in by_device.items():
            self._blocks.append((device, torch.stack(stats), rows))
        self._pending.clear()
        self._pending_rows.clear()
        self._cache.clear()
        for arena in self._arenas.values():
            arena.refresh()

    def read(self) -> list[tuple[float, ...]]:
        """Every row as host floats, in row order: one device-to-host copy per block."""
        self.flush()
        if self._host is None:
            host: list[tuple[float, ...]] = [()] * len(self._numel)
            for _, block, rows in self._blocks:
                for row, values in zip(rows, block.cpu().tolist()):
                    host[row] = tuple(values)
            arena_values = {device: arena.read() for device, arena in self._arenas.items()}
            for row, device, slot in self._arena_rows:
                host[row] = arena_values[device][slot]
            self._host = host
        return self._host

    def stats(self, rows: list[int]) -> RangeStats:
        """Merged :class:`RangeStats` of ``rows`` (call :meth:`read` first)."""
        host = self.read()
        return RangeStats.merge(RangeStats.from_row(host[r], self._numel[r]) for r in rows)


@dataclasses.dataclass(slots=True)
class _PendingCall:
    name: str
    kind: str
    scope: str
    call: int
    leaf: bool
    inputs: list[int]
    outputs: list[int] = dataclasses.field(default_factory=list)
    index: int = -1


class _OpView(TorchDispatchMode):
    """Attributes every aten op's output to the innermost module running it (the op-level view)."""

    def __init__(self, probe: "FInspect"):
        super().__init__()
        self._probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        probe = self._probe
        if probe._paused or getattr(func, "is_view", False):
            return func(*args, **kwargs)
        skip = probe._weight_ids
        ins = [probe._store.measure(t) for t in iter_tensors((args, kwargs)) if id(t) not in skip]
        out = func(*args, **kwargs)
        mutates = func._schema.is_mutable
        outs = [probe._store.measure(t, fresh=mutates) for t in iter_tensors(out)]
        if outs:
            scope = probe._stack[-1] if probe._stack else ""
            kind = func.overloadpacket.__name__
            key = f"{scope or '(model)'}::{kind}"
            n = probe._op_counts.get(key, 0)
            probe._op_counts[key] = n + 1
            probe._ops.append(_PendingCall(key, kind, scope, n, True, ins, outs, len(probe._ops)))
        return out


class FInspect:
    """Context manager of forward hooks that records every module's activation range.

    Args:
        model: the ``torch.nn.Module`` to watch, in FP32 (to predict FP16 overflow) or in FP16/BF16
            (to find where inf/NaN is born). It is never modified.
        ops: also record every aten op (``F.relu``, ``+``, ``matmul`` inside ``forward`` are
            invisible to module hooks) through a ``TorchDispatchMode``. Slower; off by default.
        fused: reduce each CUDA tensor with one Triton kernel (:mod:`fp16guard.inspect.triton_stats`).
            ``None`` (default) or True: wherever Triton is available; False: eager torch ops
            everywhere (the CPU always uses them).
        static: include the static weight check (:func:`fp16guard.static_check.check_module`) in
            the report.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        RuntimeError: :meth:`report` is called before anything ran.

    Example::

        with FInspect(model) as probe:
            model(x)                      # any number of forwards
        print(probe.report().transitions())
    """

    def __init__(self, model: torch.nn.Module, *, ops: bool = False, fused: bool | None = None,
                 static: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"FInspect needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.ops = ops
        self.static = static
        self._fused = fused
        self._depth = 0
        self._handles: list[Any] = []
        self._mode: _OpView | None = None
        self._paused = False
        self._weight_ids: set[int] = set()
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far (hooks stay installed if active)."""
        self._store = _StatsStore(self._fused)
        self._calls: list[_PendingCall] = []
        self._ops: list[_PendingCall] = []
        self._open: list[_PendingCall] = []
        self._stack: list[str] = []
        self._call_counts: dict[str, int] = {}
        self._op_counts: dict[str, int] = {}

    # -- context manager -----------------------------------------------------------------------
    def __enter__(self) -> "FInspect":
        self._depth += 1
        if self._depth == 1:
            try:
                self._install()
            except BaseException:
                self._uninstall()
                self._depth = 0
                raise
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._uninstall()

    def _install(self) -> None:
        leaves = {id(m) for m in self.model.modules() if next(m.children(), None) is None}
        self._weight_ids = {id(p) for p in self.model.parameters()} | {id(b) for b in self.model.buffers()}
        for name, module in self.model.named_modules():
            kind = type(module).__name__
            leaf = id(module) in leaves
            root = module is self.model
            self._handles.append(module.register_forward_pre_hook(
                self._make_pre_hook(name, kind, leaf), with_kwargs=True))
            self._handles.append(module.register_forward_hook(
                self._make_post_hook(root), with_kwargs=True, always_call=True))
        if self.ops:
            self._mode = _OpView(self)
            self._mode.__enter__()

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._open.clear()
        self._stack.clear()
        self._store.flush()

    # -- hooks ---------------------------------------------------------------------------------
    def _measure_all(self, obj: Any) -> list[int]:
        self._paused = True
        try:
            skip = self._weight_ids
            measure = self._store.measure
            if type(obj) is torch.Tensor:  # the common case, without the generic walk
                return [] if id(obj) in skip or not obj.is_floating_point() else [measure(obj)]
            rows = [measure(t) for t in iter_tensors(obj) if id(t) not in skip]
            return list(dict.fromkeys(rows)) if len(rows) > 1 else rows  # returned twice counts once
        finally:
            self._paused = False

    def _make_pre_hook(self, name: str, kind: str, leaf: bool) -> Callable:
        def pre_hook(module, args, kwargs):
            """Measure the inputs before the module runs (an in-place op would overwrite them)."""
            n = self._call_counts.get(name, 0)
            self._call_counts[name] = n + 1
            inputs = args[0] if len(args) == 1 and not kwargs else (args, kwargs)
            self._open.append(_PendingCall(name, kind, name, n, leaf, self._measure_all(inputs)))
            self._stack.append(name)

        return pre_hook

    def _make_post_hook(self, root: bool) -> Callable:
        def post_hook(module, args, kwargs, output):
            """Measure the outputs and close the call; the root's hook also stacks the rows."""
            if not self._open:  # hooks were installed while this module was already running
                return
            pending = self._open.pop()
            self._stack.pop()
            pending.outputs = self._measure_all(output)
            pending.index = len(self._calls)
            self._calls.append(pending)
            if root:
                self._paused = True
                try:
                    self._store.flush()
                finally:
                    self._paused = False

        return post_hook

    # -- results -------------------------------------------------------------------------------
    def _records(self, pending: list[_PendingCall]) -> tuple[CallRecord, ...]:
        store = self._store
        return tuple(
            CallRecord(p.index, p.name, p.kind, p.scope, p.call, store.stats(p.inputs),
                       store.stats(p.outputs), p.leaf)
            for p in pending
        )

    def report(self) -> InspectionReport:
        """Read the recorded statistics (one host sync per device) into an :class:`InspectionReport`.

        Raises:
            RuntimeError: no forward ran under this probe.
        """
        if not self._calls and not self._ops:
            raise RuntimeError(
                "FInspect recorded nothing: run the model inside the `with FInspect(model) as probe:` "
                "block before calling probe.report()")
        self._store.read()
        static = tuple(check_module(self.model)) if self.static else ()
        return InspectionReport(
            source=type(self.model).__name__,
            calls=self._records(self._calls),
            ops=self._records(self._ops),
            static=static,
        )


def run_torch(model: torch.nn.Module, inputs: Sequence[NamedInput], *, ops: bool = False,
              device: str = "cpu", half: bool = False):
    """Run ``model`` on every input under :class:`~fp16guard.FInspect` and return the report.

    The model runs in eval mode, as deployed. It is deep-copied
    (:func:`~fp16guard.torch_graph.inference_copy`) before it is moved to ``device``, cast to FP16,
    or put in eval mode (a module in train or mixed mode), so the caller's model is untouched: its
    state_dict (BatchNorm statistics included), training flags and hooks.

    Raises:
        InputError: the model rejects an input (wrong shape or dtype); the message gives the
            input's shapes and the model's first error line.
    """
    if device != "cpu" or half or any(m.training for m in model.modules()):
        model = inference_copy(model).to(device)
        if half:
            model = model.half()
    with torch.no_grad(), FInspect(model, ops=ops) as probe, \
            step(f"inspect: FP{16 if half else 32} forward on {len(inputs)} input(s), {device}",
                 total=len(inputs)) as advance:
        for item in inputs:
            tensors = [t.to(device) for t in torch_args(item)]
            if half:
                tensors = [t.half() if t.is_floating_point() else t for t in tensors]
            try:
                model(*tensors)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                shapes = ", ".join(str(list(t.shape)) for t in tensors)
                raise InputError(f"the model rejected input {item.label} of shape {shapes}: "
                                 f"{str(e).strip().splitlines()[0]}") from None
            advance()
    report = probe.report()
    return dataclasses.replace(report, inputs=tuple(i.label for i in inputs))
