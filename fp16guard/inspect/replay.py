"""Batches of one input signature: statistics merged call by call, and on CUDA one CUDA graph.

:meth:`fp16guard.FInspect.run` keys every batch by its *input signature* (the shapes, dtypes and
devices of its tensors and the values of everything else). The first batch of a signature runs
eagerly and fixes the calls and rows (a :class:`SignatureRecord`); later batches that take the
same path merge into those rows on the device (amax by max, counts by sum), so a calibration
loop of a thousand batches keeps one row per measured tensor, not a thousand.

On CUDA the second batch of a signature also captures the hooked forward as one CUDA graph
(:func:`capture`): the hooks run once more in Python while the capture records their Triton
launches, each writing into a fixed arena slot. Every later batch is copied into the captured
input buffers and replayed; each kernel adds into its slots (max for amax, sums for the counts),
so the replays accumulate and no Python runs per batch at all. See ``docs/cuda-graphs.md`` for what is and is
not captured.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only

from fp16guard.inspect.store import PendingCall, Recording, StatsStore

#: Reduce on a second stream while a graph is captured, so that the statistics run beside the
#: model's next kernels instead of between them (rows overwritten in place stay on the model's
#: stream: :class:`~fp16guard.inspect.store.StatsStore`).
OVERLAP_STATISTICS = True

#: How many side streams the statistics of a captured graph take turns on (one kernel per tensor,
#: round robin): with more than one, a kernel's ramp and drain overlap the next one's reads
#: instead of running one after the other. Every row has its own slot, so the kernels never race.
STATISTICS_STREAMS = 3

#: Capture the model's kernels on a stream of higher priority than the statistics' side streams,
#: so that where both wait for a free multiprocessor, the model's kernel goes first (graph kernel
#: nodes keep the priority of the stream they were captured on). Measured on a lent H100
#: (``benchmarks/results_inspect_graph_h100.txt``, GPU-only time the statistics add over the read
#: floor): ResNet-50 FP16 1.74x with one side stream, 1.40x with the model first, 1.29x with the
#: model first, three side streams and :data:`~fp16guard.inspect.triton_stats.SIDE_PROGRAMS_PER_SM`
#: at 3; BERT-base FP16 1.21x, 1.18x, 1.03x.
PRIORITIZE_MODEL = True

#: While a graph is captured, reduce the tensors in multi-tensor launches, one per group of
#: :data:`~fp16guard.inspect.triton_stats.GROUP_BYTES` (and at every point where a measured tensor
#: is about to be overwritten in place), instead of one launch per tensor. Off by default: on a lent
#: H100 (``benchmarks/results_inspect_graph_h100.txt``) groups of 32 MiB made the statistics
#: slower than one launch per tensor on the side stream for ResNet-50, ViT-B/16 and BERT-base in
#: FP32 and FP16 (e.g. 1.25x against 1.13x the read floor, ResNet-50 FP32): inside a graph a launch
#: costs little, and per-tensor kernels start as soon as their tensor exists, beside the model's
#: next kernels. Grouped and per-tensor reports are equal value for value (``tests/test_cuda_graph.py``).
GROUP_STATISTICS = False

#: Where the caller is in ``torch.inference_mode()``, capture the forward under ``torch.no_grad()``
#: instead, so that its activations have version counters: their statistics can then run on the
#: side streams, and a tensor read by two calls is reduced once
#: (:meth:`~fp16guard.inspect.hooks.FInspect._capture_versioned`). The forward falls back to a
#: capture in inference mode where it needs it.
VERSIONED_CAPTURE = True

#: At most this many input signatures are captured per probe; they share one memory pool, so the
#: memory held is about one forward's activations plus the static inputs and outputs.
MAX_GRAPHS = 8


def input_signature(args: tuple, kwargs: dict) -> tuple | None:
    """A hashable key of everything a CUDA graph freezes about a call's arguments.

    Tensors count by shape, dtype, device, ``requires_grad`` and dense layout; other leaves by
    type and value. Returns None when a leaf is not hashable (the batch then runs eagerly).
    """
    leaves, spec = tree_flatten((args, kwargs))
    key: list[tuple] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("tensor", tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, leaf.device,
                        leaf.requires_grad, leaf.is_inference()))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append(("value", type(leaf), leaf))
    return str(spec), tuple(key)


def describe_signature(args: tuple, kwargs: dict) -> str:
    """Short text of a call's tensor arguments, e.g. ``[32, 3, 224, 224] float16``."""
    parts = [f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"
             for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return ", ".join(parts) or "no tensors"


class CapturedForward:
    """One CUDA graph of the hooked forward, with its static input and output buffers.

    Args:
        graph: the captured ``torch.cuda.CUDAGraph``.
        static_leaves: the flattened ``(args, kwargs)`` the graph reads (tensors are its buffers).
        static_output: what the captured forward returned (overwritten by every replay).
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, static_leaves: list, static_output: Any):
        self._graph = graph
        self._static_leaves = static_leaves
        self._static_output = static_output

    def replay(self, args: tuple, kwargs: dict) -> Any:
        """Copy the batch into the input buffers, replay, and return a copy of the outputs (the
        next replay overwrites the buffers)."""
        for static, leaf in zip(self._static_leaves, tree_leaves((args, kwargs))):
            if isinstance(static, torch.Tensor):
                with torch.inference_mode(static.is_inference()):  # where an in-place copy is allowed
                    static.copy_(leaf)
        self._graph.replay()
        return tree_map_only(torch.Tensor, torch.clone, self._static_output)


def static_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` to capture a graph on, an inference tensor exactly when ``t`` is one (the
    hooks measure inference tensors afresh where they reuse a normal tensor's row, so the copy
    must take the path ``t`` took)."""
    with torch.inference_mode(t.is_inference()):
        return t.clone()


def capture(forward: Callable[..., Any], args: tuple, kwargs: dict, *, pool: Any,
            stream: torch.cuda.Stream) -> CapturedForward:
    """Capture ``forward(*args, **kwargs)`` as one CUDA graph on ``stream`` (warm it up there
    first). A failed capture leaves the current stream, the allocator and the CUDA random
    generator as they were.

    Raises:
        RuntimeError: the forward cannot be captured (a host sync such as ``.item()`` or
            ``.cpu()``, a CPU tensor created per call, an allocation outside the pool).
    """
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize(stream.device)
    with torch.cuda.stream(stream):  # restored on the way out, also when the capture fails
        try:
            graph.capture_begin(pool=pool)
            output = forward(*args, **kwargs)
        except BaseException:
            _abandon(graph, stream.device)
            raise
        try:
            graph.capture_end()
        except BaseException:
            _reset_generators(stream.device)
            raise
    return CapturedForward(graph, tree_leaves((args, kwargs)), output)


def _abandon(graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
    try:
        graph.capture_end()  # ends the stream's capture; fails after an error inside it
    except RuntimeError:
        pass
    _reset_generators(device)


def _reset_generators(device: torch.device) -> None:
    """After a failed capture the CUDA random generator still counts offsets for it, and its next
    draw (``torch.randn`` on the device) raises "Offset increment outside graph capture"; one
    successful capture resets it (measured on an H200 with torch 2.11)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.zeros(1, device=device).add_(1)


def _fold(rows: torch.Tensor, more: torch.Tensor) -> None:
    """Merge ``more`` into ``rows`` in place (float64 ``[rows, 5]``): amax by max, counts by sum."""
    rows[:, 0] = torch.maximum(rows[:, 0], more[:, 0])
    rows[:, 1:] += more[:, 1:]


def row_map(first: tuple, other: tuple) -> list[int] | None:
    """For each row of the forward whose :attr:`Recording.structure` is ``first``, the row of
    ``other`` (a forward through the same calls) that measured the same tensor at the same place.

    Two forwards through the same calls number their rows differently where one of them measured a
    tensor afresh and the other reused a row: under ``torch.inference_mode()`` every measurement is
    fresh (inference tensors have no version counter), under ``torch.no_grad()`` a tensor unchanged
    since it was measured keeps its row (the output of one module read again as the next one's
    input). Both rows then hold the statistics of the same values.

    Returns:
        ``mapping`` with ``len(mapping) == len(first's rows)``, or None when the calls differ (name,
        kind, number of inputs or outputs), a tensor's size differs, a row of ``first`` would map to
        two rows of ``other``, op-level rows are present, or a row of ``first`` belongs to no call.
    """
    calls, ops, numel = first
    other_calls, other_ops, other_numel = other
    if ops or other_ops or len(calls) != len(other_calls):
        return None
    mapping = [-1] * len(numel)
    for (name, kind, inputs, outputs), (o_name, o_kind, o_inputs, o_outputs) in zip(calls, other_calls):
        if (name, kind, len(inputs), len(outputs)) != (o_name, o_kind, len(o_inputs), len(o_outputs)):
            return None
        for row, o_row in zip(inputs + outputs, o_inputs + o_outputs):
            if numel[row] != other_numel[o_row] or mapping[row] not in (-1, o_row):
                return None
            mapping[row] = o_row
    return None if -1 in mapping else mapping


@dataclasses.dataclass(eq=False)
class SignatureRecord:
    """The merged statistics of every batch of one input signature.

    Attributes:
        label: the signature in words (:func:`describe_signature`).
        calls, ops: the calls of the first forward; their row numbers index :attr:`rows`.
        structure: what a later forward must repeat to merge (:attr:`Recording.structure`); its
            last part is :attr:`numel`.
        rows: float64 ``[rows, 5]`` on the model's device, eager forwards merged.
        in_arena: every row of the first forward was a Triton reduction (a graph can accumulate).
        forwards: eager forwards merged into :attr:`rows`.
        replays: CUDA-graph replays, in :attr:`graph_store` or folded into :attr:`rows`.
        captures: CUDA graphs captured for this signature (one per entry of the probe).
        graph_store: the arena the live graph's kernels write into (None when there is none).
        graph_rows: per row of :attr:`rows`, the row of :attr:`graph_store` that holds it (None:
            the same numbering; see :func:`row_map`), a long tensor on the model's device.
        captured: the live graph (released, its numbers folded into :attr:`rows`, when the probe
            exits).
        eager_reason: why this signature runs eagerly (None: not decided yet, or captured).
    """

    label: str
    calls: list[PendingCall]
    ops: list[PendingCall]
    structure: tuple
    rows: torch.Tensor
    in_arena: bool
    forwards: int = 1
    replays: int = 0
    captures: int = 0
    graph_store: StatsStore | None = None
    graph_rows: torch.Tensor | None = None
    captured: CapturedForward | None = None
    eager_reason: str | None = None

    @classmethod
    def first(cls, label: str, recording: Recording, rows: torch.Tensor) -> "SignatureRecord":
        """The record of a signature's first forward (copied out of ``recording``)."""
        with torch.inference_mode(False):  # a normal tensor: later forwards fold into it in any mode
            rows = rows.clone()
        return cls(label, list(recording.calls), list(recording.ops), recording.structure, rows,
                   recording.store.all_in_arena)

    @property
    def numel(self) -> tuple[int, ...]:
        """Elements of each row's tensor in one forward."""
        return self.structure[2]

    def difference(self, recording: Recording) -> str:
        """What in ``recording`` differs from this signature's first forward, in words."""
        calls, ops, numel = recording.structure
        for what, mine, theirs in (("call", self.structure[0], calls), ("op", self.structure[1], ops)):
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if a != b:
                    return f"{what} {i} is {b[:2]} with rows {b[2:]}, was {a[:2]} with rows {a[2:]}"
            if len(mine) != len(theirs):
                return f"{len(theirs)} {what}s, was {len(mine)}"
        if numel != self.numel:
            return "the measured tensors have other sizes"
        return "its statistics live on another device"

    def merge(self, recording: Recording) -> bool:
        """Merge one more eager forward into :attr:`rows` on the device (no sync); False, and
        nothing merged, when it took another path or its rows live elsewhere."""
        if recording.structure != self.structure:
            return False
        new = recording.store.device_rows()
        if new is None or new.device != self.rows.device:
            return False
        _fold(self.rows, new)
        self.forwards += 1
        return True

    def adopt(self, captured: CapturedForward, recording: Recording) -> str | None:
        """Keep a graph captured into ``recording`` if it measured what the first forward did, in
        arena slots, its rows numbered alike or mapped by :func:`row_map`; otherwise say why not."""
        graph_rows = None
        if recording.structure != self.structure:
            mapping = row_map(self.structure, recording.structure)
            if mapping is None:
                return "the captured forward took another path than the first one (control flow in Python)"
            graph_rows = torch.tensor(mapping, dtype=torch.long, device=self.rows.device)
        if not recording.store.all_in_arena:
            return "a measured tensor is not float16/bfloat16/float32 on one CUDA device"
        self.captured, self.graph_store, self.graph_rows = captured, recording.store, graph_rows
        self.captures += 1
        return None

    def _graph_numbers(self) -> torch.Tensor:
        """The live graph's rows, numbered as :attr:`rows` (float64 ``[rows, 5]``, on the device)."""
        assert self.graph_store is not None
        rows = self.graph_store.device_rows()
        return rows if self.graph_rows is None else rows[self.graph_rows]

    def release(self) -> None:
        """Drop the graph (and its memory) and fold what its replays measured into :attr:`rows`."""
        if self.graph_store is not None:
            _fold(self.rows, self._graph_numbers())
        self.captured = self.graph_store = self.graph_rows = None

    def replay(self, args: tuple, kwargs: dict) -> Any:
        """Run one batch through the captured graph; its statistics accumulate in the arena."""
        assert self.captured is not None
        output = self.captured.replay(args, kwargs)
        self.replays += 1
        return output

    def host_rows(self) -> tuple[list[tuple[float, ...]], list[int]]:
        """Host rows (eager forwards and replays merged) and the elements behind each row."""
        rows = self.rows
        if self.graph_store is not None:  # the live graph's numbers, beside the folded ones
            rows = rows.clone()
            _fold(rows, self._graph_numbers())
        host = [tuple(r) for r in rows.cpu().tolist()]
        runs = self.forwards + self.replays
        return host, [n * runs for n in self.numel]
