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
writing into a preallocated device buffer. :meth:`FInspect.run` takes batches instead of
``model(x)`` calls. It merges the batches of one input signature, and on CUDA it captures the hooked
forward as one CUDA graph and replays it, with no Python per module (:mod:`fp16guard.inspect.replay`,
``docs/cuda-graphs.md``). ``benchmarks/inspect_overhead.py`` measures the overhead of both modes.

Hygiene. The inspector keeps all its state on the instance; nothing is stored on modules. On exit,
also when the forward raised, every hook is removed and the model's ``state_dict`` is untouched.
Instances nest (two probes on one model) and re-enter (the same probe entered twice counts once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from fp16guard import distributed
from fp16guard.errors import first_line
from fp16guard.inputs import NamedInput
from fp16guard.inspect import replay, triton_stats
from fp16guard.inspect.forward import probe_forward
from fp16guard.inspect.replay import (
    MAX_GRAPHS,
    CapturedForward,
    SignatureRecord,
    capture,
    describe_signature,
    input_signature,
    row_map,
    static_copy,
)
from fp16guard.inspect.report import CallRecord, InspectionReport
from fp16guard.inspect.static_check import check_module
from fp16guard.inspect.store import PendingCall, Recording, StatsStore, stats_of
from fp16guard.inspect.walk import floating_tensors, iter_tensors
from fp16guard.progress import step
from fp16guard.torch_graph import inference_copy

logger = logging.getLogger("fp16guard")


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
        rec = probe._rec
        ins = [rec.store.measure(t) for t in iter_tensors((args, kwargs)) if id(t) not in skip]
        out = func(*args, **kwargs)
        mutates = func._schema.is_mutable
        outs = [rec.store.measure(t, fresh=mutates) for t in iter_tensors(out)]
        if outs:
            scope = probe._open[-1].scope if probe._open else ""
            kind = func.overloadpacket.__name__
            key = f"{scope or '(model)'}::{kind}"
            n = rec.op_counts.get(key, 0)
            rec.op_counts[key] = n + 1
            rec.ops.append(PendingCall(key, kind, scope, n, True, ins, outs, len(rec.ops)))
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
        static: include the static weight check (:func:`fp16guard.inspect.static_check.check_module`) in
            the report.
        cuda_graph: None (default) captures the hooked forward as a CUDA graph on the second
            batch of an input signature and replays it for every later one, where that is
            possible (CUDA model, Triton, no autograd, ``ops=False``); True does the same and logs
            a warning when it is not possible; False never captures. On a CUDA model (unless
            False or ``ops``), ``model(x)`` inside the block goes through :meth:`run` itself
            (batches merged per input signature, graphs replayed): while the block is open the
            model's class is a subclass whose ``__call__`` does that, and it is restored on exit.
            On the CPU, ``model(x)`` records one set of rows per forward, as always.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        RuntimeError: :meth:`report` is called before anything ran; :meth:`run` outside the block.

    Example::

        with FInspect(model) as probe:
            model(x)                      # any number of forwards, one record set each
        print(probe.report().transitions())

        with torch.no_grad(), FInspect(model.cuda().half()) as probe:
            for x in loader:              # batches of one shape: captured once, then replayed
                probe.run(x.cuda().half())
        print(probe.report().mode)        # 'CUDA graph: 1 capture, 98 replays; eager: 2 forwards'
    """

    def __init__(self, model: torch.nn.Module, *, ops: bool = False, fused: bool | None = None,
                 static: bool = True, cuda_graph: bool | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"FInspect needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.ops = ops
        self.static = static
        self.cuda_graph = cuda_graph
        self._fused = fused
        self._depth = 0
        self._handles: list[Any] = []
        self._mode: _OpView | None = None
        self._paused = False
        self._weight_ids: set[int] = set()
        self._graph_pool: Any = None
        self._streams: dict[tuple, Any] = {}  # per (CUDA device, priority): the stream graphs are captured on
        self._stats_streams: dict[int, list] = {}  # ... and the ones their statistics run on
        self._routed: type | None = None  # the model's own class while model(x) goes through run()
        self._inside_run = False
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far (hooks stay installed if active)."""
        self._main = Recording(StatsStore(self._fused))  # what model(x) calls write into
        self._rec = self._main  # what the hooks write into now
        self._sources: list[Recording | SignatureRecord] = [self._main]  # in the order they began
        self._signatures: dict[tuple, SignatureRecord] = {}
        self._scratch: Recording | None = None  # reused by the eager forwards of run()
        self._open: list[PendingCall] = []  # calls begun and not yet returned, innermost last
        self._noted: set[str] = set()

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
        self._route_calls()

    def _route_calls(self) -> None:
        """On a CUDA model, make ``model(x)`` call :meth:`run` while the block is open: the model's
        class becomes a subclass (same name, same ``forward``) whose ``__call__`` hands the call to
        :meth:`run`, which calls the model again (then as the original class would). Restored by
        :meth:`_uninstall`; nothing else of the model changes."""
        if self.cuda_graph is False or self.ops or type(self.model).__call__ is not torch.nn.Module.__call__:
            return
        device = next((t.device for t in self.model.parameters()), None)
        if device is None or device.type != "cuda" or getattr(type(self.model), "_fp16guard_routed", False):
            return
        probe = self
        original = type(self.model)

        def __call__(module, *args, **kwargs):
            if module is not probe.model or probe._inside_run or probe._depth == 0:
                return original.__call__(module, *args, **kwargs)
            return probe.run(*args, **kwargs)

        routed = type(original.__name__, (original,), {"__call__": __call__, "_fp16guard_routed": True,
                                                       "__module__": original.__module__,
                                                       "__qualname__": original.__qualname__})
        self.model.__class__ = routed
        self._routed = original

    def _unroute_calls(self) -> None:
        """Give the model its own class back (see :meth:`_route_calls`)."""
        if self._routed is not None:
            self.model.__class__, self._routed = self._routed, None

    def _uninstall(self) -> None:
        self._unroute_calls()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._open.clear()
        self._rec = self._main
        self._main.store.flush()
        for record in self._signatures.values():  # graphs replay hooks; without hooks they must go
            if record.captured is not None:
                with self._bookkeeping():
                    record.release()
                record.eager_reason = None  # captured again if the probe is entered again
        self._graph_pool = None  # its graphs are gone; a new capture takes a new pool

    # -- hooks ---------------------------------------------------------------------------------
    def _measure_all(self, obj: Any) -> list[int]:
        """Rows of the floating tensors in ``obj`` (a hook's inputs or outputs), weights skipped,
        with the op view paused."""
        if self._mode is None:  # nothing watches torch ops: no need to pause
            return self._rows_of(obj)
        self._paused = True
        try:
            return self._rows_of(obj)
        finally:
            self._paused = False

    def _rows_of(self, obj: Any) -> list[int]:
        skip = self._weight_ids
        measure = self._rec.store.measure
        if type(obj) is torch.Tensor:  # the common case, without the generic walk
            return [] if id(obj) in skip or not obj.is_floating_point() else [measure(obj)]
        # Passed or returned twice counts once (``attn(y, y, y)``), also for inference tensors,
        # which have no version counter and so get a row per measurement.
        tensors = {id(t): t for t in floating_tensors(obj) if id(t) not in skip}
        return [measure(t) for t in tensors.values()]

    def _make_pre_hook(self, name: str, kind: str, leaf: bool) -> Callable:
        def pre_hook(module, args, kwargs):
            """Measure the inputs before the module runs (an in-place op would overwrite them)."""
            counts = self._rec.call_counts
            n = counts.get(name, 0)
            counts[name] = n + 1
            inputs = args[0] if len(args) == 1 and not kwargs else (args, kwargs)
            self._open.append(PendingCall(name, kind, name, n, leaf, self._measure_all(inputs)))

        return pre_hook

    def _make_post_hook(self, root: bool) -> Callable:
        def post_hook(module, args, kwargs, output):
            """Measure the outputs and close the call; the root's hook also stacks the rows."""
            if not self._open:  # hooks were installed while this module was already running
                return
            pending = self._open.pop()
            pending.outputs = self._measure_all(output)
            calls = self._rec.calls
            pending.index = len(calls)
            calls.append(pending)
            if root:
                self._paused = True
                try:
                    self._rec.store.flush()
                finally:
                    self._paused = False

        return post_hook

    # -- batches: merged per input signature, replayed as a CUDA graph -------------------------
    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model on one batch, merging its statistics with earlier batches of the same
        input signature (:mod:`fp16guard.inspect.replay`); on CUDA, replay a captured graph.

        The report then holds one record per call site and signature, merged over batches
        (amax: max; counts: sums), and memory does not grow with the number of batches. A batch
        whose forward takes another path than its signature's first one is kept as its own
        records. Returns what the model returns (a copy, when a graph was replayed).

        Raises:
            RuntimeError: the probe is not active (call it inside ``with FInspect(model) as probe``).
            Whatever the model raises on the batch.
        """
        if self._depth == 0:
            raise RuntimeError("FInspect.run needs the probe active: call it inside `with FInspect(model) as probe:`")
        if self._inside_run:  # run() called from inside a forward: a plain hooked call
            return self.model(*args, **kwargs)
        self._inside_run = True
        try:
            return self._run(args, kwargs)
        finally:
            self._inside_run = False

    def _run(self, args: tuple, kwargs: dict) -> Any:
        """The body of :meth:`run`."""
        signature = input_signature(args, kwargs)
        if signature is None or self._rec is not self._main:
            return self.model(*args, **kwargs)
        record = self._signatures.get(signature)
        if record is None:
            return self._first_forward(signature, args, kwargs)
        if record.captured is not None:
            with self._bookkeeping():
                return record.replay(args, kwargs)
        if record.eager_reason is None:
            record.eager_reason = self._graph_refusal(record)
            if record.eager_reason is None:
                return self._capture(record, args, kwargs)
        return self._merged_forward(record, args, kwargs)[0]

    @contextlib.contextmanager
    def _bookkeeping(self) -> Iterator[None]:
        """Torch ops of the probe's own (merging rows, copying inputs): unseen by the op view."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused

    @contextlib.contextmanager
    def _writing_into(self, recording: Recording) -> Iterator[None]:
        previous, self._rec = self._rec, recording
        try:
            yield
        finally:
            self._rec = previous

    def _eager_forward(self, args: tuple, kwargs: dict) -> tuple[Any, Recording]:
        """One hooked forward into the reusable scratch recording."""
        scratch, self._scratch = self._scratch or Recording(StatsStore(self._fused)), None
        scratch.clear()
        with self._writing_into(scratch):
            out = self.model(*args, **kwargs)
        return out, scratch

    def _first_forward(self, signature: tuple, args: tuple, kwargs: dict) -> Any:
        out, scratch = self._eager_forward(args, kwargs)
        with self._bookkeeping():
            rows = scratch.store.device_rows()
            if rows is None:  # no rows, or rows on several devices: keep this forward as it is
                self._sources.append(scratch)
                return out
            record = SignatureRecord.first(describe_signature(args, kwargs), scratch, rows)
        self._signatures[signature] = record
        self._sources.append(record)
        self._scratch = scratch
        return out

    def _merged_forward(self, record: SignatureRecord, args: tuple, kwargs: dict) -> tuple[Any, str | None]:
        """One eager forward merged into ``record``; returns its output and, when it took another
        path (then it is kept as its own records), how it differed."""
        out, scratch = self._eager_forward(args, kwargs)
        with self._bookkeeping():
            merged = record.merge(scratch)
            if merged:
                self._scratch = scratch
                return out, None
            self._sources.append(scratch)  # another path through the model: its own records
            return out, record.difference(scratch)

    def _graph_refusal(self, record: SignatureRecord) -> str | None:
        """Why this signature cannot be captured, or None; logged once per reason."""
        captured = sum(r.captured is not None for r in self._signatures.values())
        if self.cuda_graph is False:
            reason = "cuda_graph=False"
        elif record.rows.device.type != "cuda":
            reason = f"the model runs on {record.rows.device.type}, and CUDA graphs need CUDA"
        elif self._fused is False or triton_stats.triton is None or not record.in_arena:
            reason = ("the statistics are not all Triton reductions on one CUDA device (only those accumulate "
                      "across replays)")
        elif self.ops:
            reason = "the op view (ops=True) records in Python per aten op"
        elif torch.is_grad_enabled():
            reason = "autograd is on; run under torch.no_grad() or torch.inference_mode()"
        elif captured >= MAX_GRAPHS:
            reason = f"{MAX_GRAPHS} input signatures are captured already (memory stays bounded)"
        else:
            return None
        self._note(record, reason, warn=self.cuda_graph is True)
        return reason

    def _note(self, record: SignatureRecord, reason: str, *, warn: bool) -> None:
        """Log, once per reason, why batches run eagerly (naming the first signature it hit)."""
        if reason not in self._noted:
            self._noted.add(reason)
            logger.log(logging.WARNING if warn else logging.INFO, "FInspect runs eagerly: %s (inputs %s)",
                       reason, record.label)

    def _capture(self, record: SignatureRecord, args: tuple, kwargs: dict) -> Any:
        """Run this batch eagerly on the capture stream (the warm-up; merged like any batch), then
        capture the hooked forward for the batches after it. Returns this batch's output."""
        device = record.rows.device
        priority = -1 if replay.PRIORITIZE_MODEL else 0  # lower is higher (CUDA's convention)
        stream = self._streams.get((device.index, priority))
        if stream is None:
            stream = self._streams[device.index, priority] = torch.cuda.Stream(device, priority=priority)
        with self._bookkeeping():
            static_args, static_kwargs = tree_map_only(torch.Tensor, static_copy, (args, kwargs))
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # the warm-up: this batch, on the stream of the capture
            out, difference = self._merged_forward(record, static_args, static_kwargs)
        torch.cuda.current_stream(device).wait_stream(stream)
        if difference is not None:
            record.eager_reason = f"the second batch took another path than the first ({difference})"
            self._note(record, record.eager_reason, warn=True)
            return out
        try:
            captured, graph_rec = self._capture_versioned(record, static_args, static_kwargs, stream)
        except Exception as e:  # noqa: BLE001 - any capture failure means: stay eager
            self._after_failed_capture()
            record.eager_reason = f"CUDA graph capture failed: {first_line(e)}"
            self._note(record, record.eager_reason, warn=True)
            return out
        record.eager_reason = record.adopt(captured, graph_rec)
        if record.eager_reason is not None:
            self._note(record, record.eager_reason, warn=True)
        return out

    def _capture_versioned(self, record: SignatureRecord, args: tuple, kwargs: dict,
                           stream: torch.cuda.Stream) -> tuple[CapturedForward, Recording]:
        """:meth:`_capture_graph`; under ``torch.inference_mode()`` first under ``torch.no_grad()``,
        where activations have version counters (statistics beside the model, a tensor read twice
        reduced once; rows mapped by :func:`~fp16guard.inspect.replay.row_map`), and in inference
        mode where that fails or does not map (docs/cuda-graphs.md, "Inference mode")."""
        if replay.VERSIONED_CAPTURE and torch.is_inference_mode_enabled():
            try:
                with torch.inference_mode(False), torch.no_grad():
                    captured, graph_rec = self._capture_graph(record, args, kwargs, stream)
                if row_map(record.structure, graph_rec.structure) is not None:
                    return captured, graph_rec
                # Not kept, but `captured` holds the pool until the capture below holds it too.
                why = "its calls differ from the eager forward's outside inference mode"
            except Exception as e:  # noqa: BLE001 - captured in inference mode below instead
                self._after_failed_capture()
                why = first_line(e)
            logger.info("FInspect captures in inference mode (statistics on the model's stream): %s", why)
        return self._capture_graph(record, args, kwargs, stream)

    def _after_failed_capture(self) -> None:
        """Close the calls the failed capture left open; drop the pool if no graph holds it (it is
        freed, and capturing into it again trips the caching allocator's use_count assert)."""
        self._open.clear()
        if not any(r.captured is not None for r in self._signatures.values()):
            self._graph_pool = None

    def _capture_graph(self, record: SignatureRecord, args: tuple, kwargs: dict,
                       stream: torch.cuda.Stream) -> tuple[CapturedForward, Recording]:
        """Capture the hooked forward, the statistics on a second stream beside the model's
        (:data:`~fp16guard.inspect.replay.OVERLAP_STATISTICS`), in multi-tensor launches per group
        (:data:`~fp16guard.inspect.replay.GROUP_STATISTICS`). A tensor overwritten in place before
        its statistics were surely read (an in-place ReLU after the BatchNorm it measures) gets its
        row read on the model's stream, at the last hook that saw it unchanged, in a second capture."""
        device = record.rows.device
        sides: tuple = ()
        if replay.OVERLAP_STATISTICS:
            count = max(1, replay.STATISTICS_STREAMS)
            streams = self._stats_streams.setdefault(device.index, [])
            streams += [torch.cuda.Stream(device) for _ in range(count - len(streams))]
            sides = tuple(streams[:count])
        if self._graph_pool is None:  # one pool for all graphs of the probe
            self._graph_pool = torch.cuda.graph_pool_handle()
        deadlines: dict[int, int] = {}
        discarded = []  # kept until the next capture holds the pool (a pool no graph holds is freed)
        for _ in range(4):
            graph_rec = Recording(StatsStore(self._fused, compact=False, sides=sides, deadlines=deadlines,
                                             grouped=replay.GROUP_STATISTICS))
            graph_rec.store.reserve(device, len(record.numel))
            with self._writing_into(graph_rec):
                captured = capture(self.model, args, kwargs, pool=self._graph_pool, stream=stream)
            if not graph_rec.store.overwritten:
                graph_rec.store.fill_tables()
                return captured, graph_rec
            deadlines = {**deadlines, **graph_rec.store.overwritten}
            discarded.append(captured)
        raise RuntimeError("tensors kept changing in place while their statistics were read")

    # -- results -------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """How the forwards ran, e.g. ``CUDA graph: 1 capture, 30 replays; eager: 2 forwards``,
        with the reason when :meth:`run`'s batches ran eagerly."""
        eager = sum(r.forwards for r in self._signatures.values()) + sum(
            sum(c.name == "" for c in s.calls) for s in self._sources if isinstance(s, Recording))
        captures = sum(r.captures for r in self._signatures.values())
        replays = sum(r.replays for r in self._signatures.values())
        text = f"eager: {eager} forward{'s' * (eager != 1)}"
        if captures:
            text = f"CUDA graph: {captures} capture{'s' * (captures != 1)}, {replays} replay{'s' * (replays != 1)}; {text}"
        reasons = sorted({r.eager_reason for r in self._signatures.values()
                          if r.eager_reason and r.eager_reason != "cuda_graph=False"})
        return text + "".join(f" (no CUDA graph: {reason})" for reason in reasons)

    def report(self, *, reduce: bool | None = None) -> InspectionReport:
        """Read the recorded statistics (one host sync per device) into an :class:`InspectionReport`.

        Records of every source (``model(x)`` calls, then :meth:`run`'s signatures and kept
        forwards, in the order they began) are numbered together: ``index`` in that order and
        ``call`` per layer.

        Under a ``torch.distributed`` group, every rank's records are merged by call site (call it on
        every rank; ``reduce=False``: this rank's alone): :func:`fp16guard.inspect.merge.reduce_report`.

        Raises:
            RuntimeError: no forward ran under this probe (on any rank, when merged).
        """
        merged = reduce is not False and distributed.active()
        if not merged and not any(source.calls or source.ops for source in self._sources):
            raise RuntimeError(
                "FInspect recorded nothing: run the model inside the `with FInspect(model) as probe:` "
                "block before calling probe.report()")
        calls: list[CallRecord] = []
        ops: list[CallRecord] = []
        for source in self._sources:
            with self._bookkeeping():
                host, numel = source.host_rows()
            for pending, out in ((source.calls, calls), (source.ops, ops)):
                out += [CallRecord(p.index, p.name, p.kind, p.scope, p.call, stats_of(p.inputs, host, numel),
                                   stats_of(p.outputs, host, numel), p.leaf) for p in pending]
        static = tuple(check_module(self.model)) if self.static else ()
        report = InspectionReport(source=type(self.model).__name__, calls=_numbered(calls), ops=_numbered(ops),
                                  static=static, mode=self.mode)
        if merged:
            from fp16guard.inspect.merge import reduce_report

            report = reduce_report(report)
        return report


def _numbered(records: list[CallRecord]) -> tuple[CallRecord, ...]:
    """``index`` in list order and ``call`` counted per layer name, across sources."""
    seen: dict[str, int] = {}
    out = []
    for i, rec in enumerate(records):
        n = seen.get(rec.name, 0)
        seen[rec.name] = n + 1
        out.append(dataclasses.replace(rec, index=i, call=n))
    return tuple(out)


def run_torch(model: torch.nn.Module, inputs: Sequence[NamedInput], *, ops: bool = False,
              device: str = "cpu", half: bool = False, cuda_graph: bool | None = None):
    """Run ``model`` on every input under :class:`~fp16guard.FInspect` and return the report.

    The model runs in eval mode, as deployed, through :meth:`FInspect.run`: inputs of one shape
    are merged call by call, and on CUDA every batch after the second of a shape replays one CUDA
    graph of the hooked forward (the report's ``mode`` says what ran; ``cuda_graph`` as in
    :class:`FInspect`). It is deep-copied
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
    with torch.no_grad(), FInspect(model, ops=ops, cuda_graph=cuda_graph) as probe, \
            step(f"inspect: FP{16 if half else 32} forward on {len(inputs)} input(s), {device}",
                 total=len(inputs)) as advance:
        for item in inputs:
            probe_forward(probe, item, device, half)
            advance()
    report = probe.report(reduce=False)  # every input ran here: a rank's report is whole
    return dataclasses.replace(report, inputs=tuple(i.label for i in inputs))
