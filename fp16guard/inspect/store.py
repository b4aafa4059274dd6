"""Where FInspect's hooks write: device-side rows of statistics and the calls that own them.

* :class:`StatsStore`: one row of the five statistics (:data:`fp16guard.stats.STAT_FIELDS`) per
  measured tensor, kept on the tensor's device until :meth:`StatsStore.read` (one transfer per
  device). On CUDA each row is one Triton reduction into a preallocated arena
  (:mod:`fp16guard.inspect.triton_stats`); elsewhere it is :func:`fp16guard.stats.tensor_stats`.
* :class:`PendingCall`: one module (or aten op) call and the rows of its inputs and outputs.
* :class:`Recording`: a store with its calls; FInspect's hooks write into one recording at a time.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from fp16guard.inspect import triton_stats
from fp16guard.stats import RangeStats, tensor_stats

#: Columns of a device-side row table: amax, then the four counts (float64, exact up to 2**53).
ROW_WIDTH = 5


class StatsStore:
    """Device-side rows of statistics, one per measured tensor, read back in one go.

    ``measure`` returns a row number; rows are stacked into blocks at the end of every root
    forward (one small kernel, no sync) so a long calibration loop keeps a few tensors, not
    thousands.

    Args:
        fused: False forces the eager torch reduction everywhere; None or True use the Triton
            kernel where it is available (CUDA, float16/bfloat16/float32).
        compact: reduce the arenas' per-program slots at every :meth:`flush` (False for a store a
            CUDA graph is captured into: its replays accumulate in those slots).
        sides: CUDA streams to reduce on, taken in turn per tensor (empty: none), beside
            the model's stream, so the statistics overlap the model's next kernels (used while a
            CUDA graph is captured). Each tensor reduced
            there is held until :meth:`flush` joins the streams, so its memory is not reused
            meanwhile, and rows whose tensor was overwritten in place before the join are listed in
            :attr:`overwritten` (their numbers may be wrong: capture again with them in ``deadlines``).
        deadlines: row -> tick (the number of :meth:`measure` calls before the one at which the
            row's tensor was last seen unchanged): these rows are read on the model's stream by
            then (with ``grouped``: their group is launched at the end of that call; else each
            row is reduced at once, on the model's stream).
        grouped: reduce the Triton rows in multi-tensor launches
            (:meth:`~fp16guard.inspect.triton_stats.StatsArena.reduce_group`): one per group of
            up to :data:`~fp16guard.inspect.triton_stats.GROUP_BYTES`, each tensor kept alive until
            its group's launch; rows whose tensor changed in place before that are listed in
            :attr:`overwritten`. Used while a CUDA graph is captured, after :meth:`reserve`;
            the launch tables are filled by :meth:`fill_tables` after the capture.
    """

    def __init__(self, fused: bool | None, *, compact: bool = True,
                 sides: tuple[torch.cuda.Stream, ...] = (), deadlines: dict[int, int] | None = None,
                 grouped: bool = False):
        self._fused = fused is not False
        self._compact = compact
        self._sides = tuple(sides)
        self._side = self._sides[0] if self._sides else None  # group launches, and turn 0 of the tensors
        self._turn = 0  # the side stream the next per-tensor reduction goes to (round robin)
        self._deadlines = dict(deadlines or {})
        self._due = frozenset(self._deadlines.values())
        self._grouped = grouped
        self._track = grouped or bool(self._sides)
        self._group_ok: dict[int, bool] = {}  # by device index: the group kernel compiled and ran
        self._held: list[tuple[torch.Tensor, int, int]] = []  # (tensor, its version, row) read on a side stream
        # The side streams forked from the model's stream since the last join. Only these are joined:
        # during a capture, waiting on a side stream the capture never forked is a dependency on
        # uncaptured work, which CUDA refuses (cudaErrorStreamCaptureIsolation).
        self._forked: dict[int, torch.cuda.Stream] = {}
        self.overwritten: dict[int, int] = {}  # row -> tick it was last seen unchanged, for rows whose
        # tensor changed before its statistics were surely read
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] = []  # (device, host) group tables to fill
        self._table_block: torch.Tensor | None = None  # launch tables reserved before a capture
        self._arenas: dict[int, triton_stats.StatsArena] = {}  # by CUDA device index
        self.clear()

    def clear(self) -> None:
        """Forget every row; the arenas keep their memory (zeroed, on their stream, no sync)."""
        self._pending: list[torch.Tensor] = []
        self._pending_rows: list[int] = []
        self._blocks: list[tuple[torch.device, torch.Tensor, list[int]]] = []
        self._arena_rows: list[tuple[int, int, int]] = []  # (row, device index, arena slot)
        self.numel: list[int] = []
        # id(tensor) -> (weakref to it, its version counter, row)
        self._cache: dict[int, tuple[weakref.ref, int, int]] = {}
        self._host: list[tuple[float, ...]] | None = None
        # grouped: (device index, dtype, on the side stream) -> (tensors, versions, rows, slots, [bytes])
        self._groups: dict[tuple, tuple[list, list, list, list, list]] = {}
        self._seen: dict[int, int] = {}  # row -> the last tick its tensor was seen unchanged
        self._table_refs: list[torch.Tensor] = []  # device tables of the group launches
        self._tick = 0
        for arena in self._arenas.values():
            arena.clear()

    def reserve(self, device: torch.device, rows: int) -> None:
        """Allocate arena memory for ``rows`` rows on ``device`` now, so that measuring them later
        allocates nothing (needed while a CUDA graph is captured: the capture would record the
        zeroing and every replay would redo it)."""
        if self._fused and triton_stats.triton is not None and device.type == "cuda":
            arena = self._arena(device)
            if self._grouped and arena.device.index not in self._group_ok:
                self._group_ok[arena.device.index] = arena.warm_group()
            arena.reserve(rows)
            if self._grouped and self._group_ok.get(arena.device.index):
                # One launch table per possible group, allocated now, outside the graph's memory
                # pool. A table allocated during the capture may take the memory of an activation
                # freed earlier in the same forward: every replay writes that activation again and
                # clobbers the table, which is filled once, after the capture (seen on an H100:
                # wrong rows, then illegal addresses). One column more than a table keeps every
                # row 16-byte aligned (as Triton specialized the kernel's pointers when it compiled).
                with torch.inference_mode(False):  # filled in place after the capture, in any mode
                    self._table_block = torch.zeros(rows, 5 * triton_stats.GROUP_TENSORS + 2, dtype=torch.int64,
                                                    device=arena.device)

    def _arena(self, device: torch.device) -> triton_stats.StatsArena:
        index = device.index if device.index is not None else torch.cuda.current_device()
        arena = self._arenas.get(index)
        if arena is None:
            programs = triton_stats.SIDE_PROGRAMS_PER_SM if self._side is not None else None
            arena = self._arenas[index] = triton_stats.StatsArena(torch.device("cuda", index), programs_per_sm=programs)
        return arena

    def _reduce(self, t: torch.Tensor, row: int) -> None:
        # No torch.no_grad() here: tensor_stats detaches first and the Triton kernel is invisible
        # to autograd, and entering the context costs more than the kernel launch on a slow CPU.
        if self._fused and triton_stats.available(t):
            index = t.get_device()
            arena = self._arenas.get(index)
            if arena is None:
                arena = self._arena(t.device)
            if self._grouped and self._group_ok.get(index) and self._grouped_reduce(t, row, index, arena):
                return
            if self._side is not None and row not in self._deadlines and not t.is_inference():
                side = self._sides[self._turn]
                self._turn = (self._turn + 1) % len(self._sides)
                with self._forking(side, t.device):
                    self._arena_rows.append((row, index, arena.reduce(t)))
                self._held.append((t, t._version, row))
                return
            self._arena_rows.append((row, index, arena.reduce(t)))
        else:
            self._pending.append(tensor_stats(t))
            self._pending_rows.append(row)

    def _grouped_reduce(self, t: torch.Tensor, row: int, index: int, arena: triton_stats.StatsArena) -> bool:
        """Queue ``t`` in its group (launched when full, due or flushed); False where it cannot be
        grouped (then it is reduced alone): an inference tensor (no version counter to check), an
        empty, very large or unaligned one."""
        n = t.numel()
        if t.is_inference() or not 0 < n <= triton_stats.WIDE_ABOVE:
            return False
        limit = triton_stats.GROUP_TENSOR_BYTES
        if limit and n * t.element_size() > limit:
            return False
        if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
            t = t.contiguous()
        if t.data_ptr() % 16:
            return False
        slot = arena.take()
        self._arena_rows.append((row, index, slot))
        key = (index, t.dtype, self._side is not None and row not in self._deadlines)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = ([], [], [], [], [0])
        group[0].append(t)
        group[1].append(t._version)
        group[2].append(row)
        group[3].append(slot)
        group[4][0] += n * t.element_size()
        if group[4][0] >= triton_stats.GROUP_BYTES or len(group[0]) >= triton_stats.GROUP_TENSORS - 1:
            self._launch_group(key)
        return True

    def _launch_group(self, key: tuple) -> None:
        """Launch one group: on the side stream (its tensors then held until :meth:`flush` joins
        the streams) or on the model's stream. Rows whose tensor already changed go to
        :attr:`overwritten`."""
        tensors, versions, rows, slots, _ = self._groups.pop(key)
        index, _, side = key
        arena = self._arenas[index]
        for t, version, row in zip(tensors, versions, rows):
            if t._version != version:
                self.overwritten[row] = self._seen.get(row, -1)
        host, grid = arena.group_table(tensors, slots)
        if torch.cuda.is_current_stream_capturing():  # filled after the capture (fill_tables)
            block = self._table_block
            if block is None or len(self._tables) == len(block) or block.device != arena.device:
                # Not one allocated now: inside the capture's pool, a replay could overwrite it.
                raise RuntimeError("more statistics groups than tables reserved before the capture")
            table = block[len(self._tables), : host.numel()]
            self._tables.append((table, host))
        else:
            table = host.to(arena.device)
        self._table_refs.append(table)  # the launch reads it (every replay, for a graph): kept with the rows
        if side:
            with self._forking(self._side, arena.device):
                arena.reduce_group(tensors, slots, table, grid)
            self._held += zip(tensors, versions, rows)
        else:
            arena.reduce_group(tensors, slots, table, grid)

    def _forking(self, side: torch.cuda.Stream, device: torch.device):
        """Fork ``side`` from the model's stream on ``device`` (it waits for the work so far) and
        make it current; :meth:`flush` joins exactly the streams forked this way."""
        side.wait_stream(torch.cuda.current_stream(device))
        self._forked[id(side)] = side
        return torch.cuda.stream(side)

    def _launch_due(self) -> None:
        """Launch the groups of the model's stream (a row in them is due)."""
        for key in [k for k in self._groups if not k[2]]:
            self._launch_group(key)

    def fill_tables(self) -> None:
        """Copy the group launches' tables to the device (after a CUDA graph captured them, before
        its first replay)."""
        for table, host in self._tables:
            table.copy_(host)
        self._tables.clear()

    def measure(self, t: torch.Tensor, *, fresh: bool = False) -> int:
        """Row of ``t``'s statistics, computed now unless ``t`` is unchanged since last measured.

        Inference-mode tensors have no version counter, so they are always measured afresh, as is
        everything with ``fresh=True`` (outputs of in-place ops seen below autograd, where the
        version counter has not been bumped yet).
        """
        try:
            version = t._version
        except RuntimeError:  # an inference tensor: no version counter
            version = None
        hit = None if fresh else self._cache.get(id(t))
        if hit is not None and hit[1] == version and version is not None and hit[0]() is t:
            row = hit[2]
        else:
            row = len(self.numel)
            self.numel.append(t.numel())
            self._reduce(t, row)
            self._host = None
            if version is not None:
                self._cache[id(t)] = (weakref.ref(t), version, row)
        if self._track:
            tick = self._tick
            self._tick = tick + 1
            self._seen[row] = tick
            if tick in self._due:
                self._launch_due()
        return row

    @property
    def all_in_arena(self) -> bool:
        """True when every row so far is a Triton reduction on one device, row ``i`` in slot ``i``
        (what a CUDA-graph replay can accumulate into)."""
        return (not self._pending_rows and not self._blocks and len(self._arenas) == 1
                and all(row == slot for row, _, slot in self._arena_rows))

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
        for key in list(self._groups):
            self._launch_group(key)
        if self._held:  # join the side streams; only then may the held tensors' memory be reused
            current = torch.cuda.current_stream(self._held[0][0].device)
            for side in self._forked.values():
                current.wait_stream(side)
            self._forked.clear()
            for t, version, row in self._held:
                if t._version != version:
                    self.overwritten[row] = self._seen.get(row, -1)
            self._held.clear()
        for arena in self._arenas.values():
            arena.refresh()
            if self._compact:
                arena.compact()

    def device_rows(self) -> torch.Tensor | None:
        """Every row as one float64 tensor ``[rows, 5]`` on the device the rows live on, without a
        host sync; None when there are no rows or they live on several devices."""
        self.flush()
        used = [(index, arena) for index, arena in self._arenas.items() if arena.used]
        devices = {device for device, _, _ in self._blocks} | {arena.device for _, arena in used}
        if len(devices) != 1 or not self.numel:
            return None
        device = devices.pop()
        n = len(self.numel)
        if len(self._blocks) == 1 and not used and self._blocks[0][2] == list(range(n)):
            return self._blocks[0][1].double()
        if not self._blocks and self.all_in_arena:
            return used[0][1].device_rows()[:n]
        out = torch.zeros(n, ROW_WIDTH, dtype=torch.float64, device=device)
        for _, block, rows in self._blocks:
            out[torch.tensor(rows, device=device)] = block.double()
        if used:
            table = used[0][1].device_rows()
            rows = torch.tensor([r for r, _, _ in self._arena_rows], device=device)
            out[rows] = table[torch.tensor([s for _, _, s in self._arena_rows], device=device)]
        return out

    def read(self) -> list[tuple[float, ...]]:
        """Every row as host floats, in row order: one device-to-host copy per block."""
        self.flush()
        if self._host is None:
            host: list[tuple[float, ...]] = [()] * len(self.numel)
            for _, block, rows in self._blocks:
                for row, values in zip(rows, block.cpu().tolist()):
                    host[row] = tuple(values)
            arena_values = {device: arena.read() for device, arena in self._arenas.items()}
            for row, device, slot in self._arena_rows:
                host[row] = arena_values[device][slot]
            self._host = host
        return self._host


@dataclasses.dataclass(slots=True)
class PendingCall:
    """One call of a module (or aten op) as the hooks saw it: its rows, not yet read.

    Attributes:
        name, kind, scope, call, leaf: as in :class:`~fp16guard.inspect.report.CallRecord`.
        inputs, outputs: row numbers in the recording's store.
        index: position among the recording's finished calls.
    """

    name: str
    kind: str
    scope: str
    call: int
    leaf: bool
    inputs: list[int]
    outputs: list[int] = dataclasses.field(default_factory=list)
    index: int = -1

    @property
    def shape(self) -> tuple:
        """What must repeat for two forwards to be merged call by call."""
        return self.name, self.kind, tuple(self.inputs), tuple(self.outputs)


@dataclasses.dataclass
class Recording:
    """A store and the calls whose rows it holds: what the hooks write into during a forward."""

    store: StatsStore
    calls: list[PendingCall] = dataclasses.field(default_factory=list)
    ops: list[PendingCall] = dataclasses.field(default_factory=list)
    call_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    op_counts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def structure(self) -> tuple:
        """Calls, ops and tensor sizes: equal for two forwards that took the same path."""
        return (tuple(c.shape for c in self.calls), tuple(c.shape for c in self.ops), tuple(self.store.numel))

    def host_rows(self) -> tuple[list[tuple[float, ...]], list[int]]:
        """Host rows and the element count behind each (one device-to-host copy per block)."""
        return self.store.read(), self.store.numel

    def clear(self) -> None:
        """Forget all calls and rows (the store keeps its device memory)."""
        self.store.clear()
        self.calls.clear()
        self.ops.clear()
        self.call_counts.clear()
        self.op_counts.clear()


def stats_of(rows: list[int], host: list[tuple[float, ...]], numel: list[int]) -> RangeStats:
    """Merged :class:`RangeStats` of ``rows`` given the host rows and element counts."""
    return RangeStats.merge(RangeStats.from_row(host[r], numel[r]) for r in rows)
