"""One-launch range statistics for CUDA tensors (Triton): the hot path of FInspect on the GPU.

The eager :func:`fp16guard.stats.tensor_stats` launches about twenty small kernels per tensor; at
two hundred tensors per forward their launch cost, not their arithmetic, dominates a fast GPU
model. :class:`StatsArena` instead reduces each tensor with one Triton kernel that reads it once.
Each program of the launch adds its five numbers into its own slot of the tensor's row in a
preallocated device buffer (no atomics: :data:`REDUCTION`). Adding rather than storing lets
CUDA-graph replays accumulate (:mod:`fp16guard.inspect.replay`). The slots are reduced when the
rows are read back together.

Speed. Inside a CUDA graph the kernels take 1.4-1.8x (FP32) and 2.6-3.4x (FP16) of the time needed
to read their bytes once (H200, ``benchmarks/inspect_overhead.py --graph``). A one-pass read launched
once per tensor cannot do much better: the simplest load-and-max kernel, one launch per tensor,
takes 1.43x / 2.08x on ResNet-50's activations. One launch over all of them takes 0.98x / 1.13x
(``benchmarks/triton_stats_sweep.py``).

Groups. While a CUDA graph is captured, :class:`~fp16guard.inspect.store.StatsStore` queues the
tensors and reduces each group of up to :data:`GROUP_BYTES` in one launch of ``_group_kernel``
(:meth:`StatsArena.reduce_group`): a table of the tensors' offsets, sizes and slot rows, read
by a grid of at most :data:`PROGRAMS_PER_SM` programs per SM, each over one contiguous range of
chunks. Each program adds into slot ``[row, program]`` of the rows it touches, so the numbers are
those of the per-tensor kernel exactly.

Launch cost. Triton's generic launcher (``kernel[grid](...)``) binds and specializes every
argument on every call, some 20 us of Python. A hook launches one kernel per tensor, so
:class:`_Launcher` keeps the compiled kernel for each specialization it can meet (input dtype,
16-byte alignment of the input pointer, 32- or 64-bit offsets) and calls its C launcher directly,
the same call Triton's ``JITFunction.run`` ends with. The direct call is used only on Triton
versions whose launcher signature was checked (:data:`DIRECT_LAUNCH_VERSIONS`); elsewhere the
generic launcher runs.

Semantics are those of :data:`fp16guard.stats.STAT_FIELDS`; ``tests/test_gpu.py`` checks
the two paths agree on the GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager path is used
    triton = None

#: Tensors of these dtypes take the Triton path (float64 stays eager).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Triton (major, minor) versions whose ``CompiledKernel.run`` takes
#: ``(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata, enter_hook,
#: exit_hook, *all_arguments_including_constexprs)``.
DIRECT_LAUNCH_VERSIONS = ((3, 6),)  # read in its source and tested on the H100; add others once checked

#: Launch configuration, tuned by GPU-only time on an H100 and again on an H200 (the reductions of
#: ResNet-50's activations replayed as a CUDA graph: ``benchmarks/triton_stats_sweep.py``; on the
#: H200 four tiles per step took FP16 from 3.8x to 3.1x the read floor, FP32 from 2.0x to 1.8x).
BLOCK = 1024
UNROLL = 4
NUM_WARPS = 8
#: Programs per streaming multiprocessor: enough loads in flight to saturate HBM, few atomics.
PROGRAMS_PER_SM = 4
#: ... for the kernels of a captured graph that run on side streams, beside the model's kernels
#: (:data:`fp16guard.inspect.replay.STATISTICS_STREAMS`): fewer, so they take fewer of the
#: multiprocessors the model's kernels could use. On a lent H100 (three side streams, the model's
#: stream first) 3 per SM took ResNet-50 FP16's statistics from 1.35x to 1.29x the read floor and
#: BERT-base FP16's from 1.07x to 1.03x (``benchmarks/results_inspect_graph_h100.txt``).
SIDE_PROGRAMS_PER_SM = 3
#: Tensors with more elements than this use 64-bit offsets (32-bit ones could overflow near 2**31).
WIDE_ABOVE = 2**30
#: How a program's five partial results reach its row: ``"partials"`` (default) stores them in the
#: program's own slot of the row (``[rows, programs]``; read-modify-write, so CUDA-graph replays
#: accumulate; no atomics, nothing contended) and the slots are reduced when the rows are read;
#: ``"atomic"`` folds them into the row with five atomics per program (every program of a launch
#: hits the same five addresses). Read when an arena is created.
REDUCTION = "partials"
#: Multi-tensor launches (:meth:`StatsArena.reduce_group`, used while a CUDA graph is captured):
#: at most this many tensors per launch (the kernel's table width, a power of two; one more entry
#: holds the end) ...
GROUP_TENSORS = 128
#: ... and a group is launched once it holds this many bytes (tensors are kept alive until their
#: group's launch, so this bounds the extra memory a group holds).
GROUP_BYTES = 32 << 20
#: ... and only tensors of at most this many bytes join a group (0: any size); larger ones get their
#: own launch, whose ramp and drain are small next to their read.
GROUP_TENSOR_BYTES = 0

if triton is not None:

    @triton.jit
    def _partials(x_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr, WIDE: tl.constexpr):
        # Each program strides over the tensor, UNROLL independent tiles per step (loads in
        # flight), keeping per-lane partials, and returns its five numbers.
        # Offsets are 32-bit unless WIDE (tensors of more than 2**30 elements): 64-bit index
        # arithmetic cost 4-7% of the kernel's time on the H100 (benchmarks/triton_stats_sweep.py).
        # Four threshold counts per element and no per-lane bounds test: lanes past the end load
        # 0.0, which is finite and zero, so it adds 1 to `finite` and `zero` and cancels in
        # `finite - zero`, `tiny - zero`, `small - tiny`; `finite` itself is turned into the
        # non-finite count with the number of lanes the program visited (`visited - finite`).
        # This form has about half the instructions of counting each statistic under its masks, yet
        # it took only 4% off on an H200: the kernel waits on its loads and on each launch's ramp and
        # drain, not on arithmetic (the module docstring; four tiles per step helped more).
        pid = tl.program_id(0)
        step = tl.num_programs(0) * (BLOCK * UNROLL)
        if WIDE:
            pid = pid.to(tl.int64)
            step = step.to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        finite = tl.zeros((BLOCK,), dtype=tl.int32)
        zero = tl.zeros((BLOCK,), dtype=tl.int32)
        tiny = tl.zeros((BLOCK,), dtype=tl.int32)
        small = tl.zeros((BLOCK,), dtype=tl.int32)
        visited = 0
        for start in range(pid * (BLOCK * UNROLL), n, step):
            visited += BLOCK * UNROLL
            for u in tl.static_range(UNROLL):
                offs = start + u * BLOCK + lanes
                a = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
                ok = a <= 3.4028234663852886e38  # float32 max: NaN and inf fail
                amax = tl.maximum(amax, tl.where(ok, a, 0.0))
                finite += ok.to(tl.int32)
                zero += (a == 0.0).to(tl.int32)
                tiny += (a < 5.960464477539063e-08).to(tl.int32)  # 2**-24, fp16.FP16_MIN_SUBNORMAL
                small += (a < 6.103515625e-05).to(tl.int32)  # 2**-14, fp16.FP16_MIN_NORMAL
        finite_n = tl.sum(finite.to(tl.int64), axis=0)
        zero_n = tl.sum(zero.to(tl.int64), axis=0)
        tiny_n = tl.sum(tiny.to(tl.int64), axis=0)
        return (tl.max(amax, axis=0), visited - finite_n, finite_n - zero_n, tiny_n - zero_n,
                tl.sum(small.to(tl.int64), axis=0) - tiny_n)

    @triton.jit(do_not_specialize=["n", "row"])
    def _stats_kernel(x_ptr, amax_ptr, count_ptr, n, row, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
                      WIDE: tl.constexpr):
        """REDUCTION = "atomic": five atomics per program into row ``row``."""
        amax, nonfinite, nonzero, flushed, subnormal = _partials(x_ptr, n, BLOCK, UNROLL, WIDE)
        counts = count_ptr + row * 4
        tl.atomic_max(amax_ptr + row, amax)
        tl.atomic_add(counts + 0, nonfinite)
        tl.atomic_add(counts + 1, nonzero)
        tl.atomic_add(counts + 2, flushed)
        tl.atomic_add(counts + 3, subnormal)

    @triton.jit(do_not_specialize=["n", "row"])
    def _stats_partials_kernel(x_ptr, amax_ptr, count_ptr, n, row, PROGRAMS: tl.constexpr, BLOCK: tl.constexpr,
                               UNROLL: tl.constexpr, WIDE: tl.constexpr):
        """REDUCTION = "partials": program p adds into slot ``[row, p]``, which no other program of
        the launch touches (launches of one stream run in order, so plain loads and stores do)."""
        amax, nonfinite, nonzero, flushed, subnormal = _partials(x_ptr, n, BLOCK, UNROLL, WIDE)
        slot = row * PROGRAMS + tl.program_id(0)
        tl.store(amax_ptr + slot, tl.maximum(tl.load(amax_ptr + slot), amax))
        counts = count_ptr + slot * 4
        tl.store(counts + 0, tl.load(counts + 0) + nonfinite)
        tl.store(counts + 1, tl.load(counts + 1) + nonzero)
        tl.store(counts + 2, tl.load(counts + 2) + flushed)
        tl.store(counts + 3, tl.load(counts + 3) + subnormal)


    @triton.jit
    def _accumulate(a, amax, finite, zero, tiny, small):
        # One tile of magnitudes (float32) into the per-lane partials (as in _partials).
        ok = a <= 3.4028234663852886e38  # float32 max: NaN and inf fail
        amax = tl.maximum(amax, tl.where(ok, a, 0.0))
        finite += ok.to(tl.int32)
        zero += (a == 0.0).to(tl.int32)
        tiny += (a < 5.960464477539063e-08).to(tl.int32)  # 2**-24
        small += (a < 6.103515625e-05).to(tl.int32)  # 2**-14
        return amax, finite, zero, tiny, small

    @triton.jit
    def _group_kernel(x_base, amax_base, count_base, table, KMAX: tl.constexpr, VEC: tl.constexpr,
                      BLOCK: tl.constexpr, UNROLL: tl.constexpr):
        """GROUP: the statistics of up to KMAX - 1 tensors of one dtype in one launch.

        ``table`` (int64, ``[5 * KMAX + 1]``) holds, per tensor t: row 0 its element offset from
        ``x_base`` (a multiple of VEC: 16-byte aligned), row 1 the cumulative chunk count (chunks
        of BLOCK * UNROLL elements; entry t is where tensor t starts; padded with 2**62), row 2
        its element count, row 3 its amax slot row's offset from ``amax_base`` and row 4 its count
        slot row's offset from ``count_base``; the last entry is the total chunk count. The
        chunks are split into one contiguous range per program, so a program visits few tensors
        and adds its partials into slot [row, program] of each (no other program touches it)."""
        CHUNK: tl.constexpr = BLOCK * UNROLL
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        idx = tl.arange(0, KMAX)
        cum = tl.load(table + KMAX + idx)
        total = tl.load(table + 5 * KMAX)
        per = (total + nprog - 1) // nprog
        c = pid.to(tl.int64) * per
        cend = tl.minimum(c + per, total)
        t = tl.sum((cum <= c).to(tl.int64), axis=0) - 1
        lanes = tl.arange(0, BLOCK)
        while c < cend:
            base = tl.load(table + KMAX + t)
            stop = tl.minimum(tl.load(table + KMAX + t + 1), cend)
            off = tl.multiple_of(tl.load(table + t), VEC)
            n = tl.load(table + 2 * KMAX + t).to(tl.int32)
            x_ptr = x_base + off
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            finite = tl.zeros((BLOCK,), dtype=tl.int32)
            zero = tl.zeros((BLOCK,), dtype=tl.int32)
            tiny = tl.zeros((BLOCK,), dtype=tl.int32)
            small = tl.zeros((BLOCK,), dtype=tl.int32)
            for k in range(c - base, stop - base):
                start = k.to(tl.int32) * CHUNK
                if start + CHUNK <= n:  # a whole chunk: no mask, 16-byte loads
                    for u in tl.static_range(UNROLL):
                        a = tl.abs(tl.load(x_ptr + (start + u * BLOCK) + lanes).to(tl.float32))
                        amax, finite, zero, tiny, small = _accumulate(a, amax, finite, zero, tiny, small)
                else:  # the tensor's last chunk: lanes past the end load 0.0 (they cancel, see _partials)
                    for u in tl.static_range(UNROLL):
                        offs = (start + u * BLOCK) + lanes
                        a = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
                        amax, finite, zero, tiny, small = _accumulate(a, amax, finite, zero, tiny, small)
            visited = (stop - c) * CHUNK
            finite_n = tl.sum(finite.to(tl.int64), axis=0)
            zero_n = tl.sum(zero.to(tl.int64), axis=0)
            tiny_n = tl.sum(tiny.to(tl.int64), axis=0)
            small_n = tl.sum(small.to(tl.int64), axis=0)
            slot = amax_base + tl.load(table + 3 * KMAX + t) + pid
            tl.store(slot, tl.maximum(tl.load(slot), tl.max(amax, axis=0)))
            counts = count_base + tl.load(table + 4 * KMAX + t) + pid * 4
            tl.store(counts + 0, tl.load(counts + 0) + (visited - finite_n))
            tl.store(counts + 1, tl.load(counts + 1) + (finite_n - zero_n))
            tl.store(counts + 2, tl.load(counts + 2) + (tiny_n - zero_n))
            tl.store(counts + 3, tl.load(counts + 3) + (small_n - tiny_n))
            c = stop
            t += 1


def available(t: torch.Tensor) -> bool:
    """True when ``t`` can be reduced by the Triton kernel (CUDA, fp16/bf16/fp32, Triton present)."""
    return triton is not None and t.is_cuda and t.dtype in DTYPES


def _direct_launch_supported() -> bool:
    if triton is None:
        return False
    try:
        major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in DIRECT_LAUNCH_VERSIONS


def _launch_hooks_active() -> bool:
    """Whether a profiler (e.g. Proton) hooks Triton launches: then the generic launcher runs."""
    knobs = getattr(triton, "knobs", None)
    hook = getattr(getattr(knobs, "runtime", None), "launch_enter_hook", None)
    return bool(getattr(hook, "calls", hook))  # a HookChain (3.4+) is never None, maybe empty


class _Launcher:
    """Launches the statistics kernel on one device, bypassing Triton's per-call argument binding
    where it can.

    The first launch of each specialization goes through ``kernel[grid](...)``, which compiles
    (or loads from Triton's cache) and returns the ``CompiledKernel``; later launches with the
    same specialization call that kernel's C launcher directly, with raw device pointers (ints:
    the C launcher then skips a ``data_ptr()`` call per tensor).

    Everything that does not change between launches (the device index, the program cap, whether
    a profiler hooks launches) is looked up once, or once per forward in :meth:`refresh`: on a
    slow host CPU each Python attribute chain in this path costs microseconds, and a forward
    launches hundreds of these kernels.

    Args:
        device: the CUDA device.
        direct: force (True) or forbid (False) the direct launch; None decides by Triton version.
        reduction: ``"partials"`` or ``"atomic"`` (:data:`REDUCTION`).
        programs_per_sm: the grid's cap per multiprocessor (None: :data:`PROGRAMS_PER_SM`).
    """

    def __init__(self, device: torch.device, direct: bool | None = None, reduction: str = "partials",
                 programs_per_sm: int | None = None):
        self.direct = _direct_launch_supported() if direct is None else direct
        self.partials = reduction == "partials"
        self._compiled: dict[tuple, object] = {}
        self._index = device.index if device.index is not None else torch.cuda.current_device()
        sms = torch.cuda.get_device_properties(self._index).multi_processor_count
        self.max_programs = (programs_per_sm or PROGRAMS_PER_SM) * sms
        try:
            self._stream = torch._C._cuda_getCurrentRawStream  # what Triton's own driver calls
        except AttributeError:  # pragma: no cover - very old torch
            self._stream = lambda index: torch.cuda.current_stream(index).cuda_stream
        self.refresh()

    def refresh(self) -> None:
        """Re-read whether a profiler hooks Triton launches (then every launch is generic)."""
        self._generic = _launch_hooks_active()

    def __call__(self, x: torch.Tensor, amax: torch.Tensor, counts: torch.Tensor, row: int,
                 amax_ptr: int, counts_ptr: int) -> None:
        n = x.numel()
        grid = min((n + BLOCK * UNROLL - 1) // (BLOCK * UNROLL), self.max_programs)
        ptr = x.data_ptr()
        wide = n > WIDE_ABOVE
        key = (x.dtype, ptr % 16 == 0, wide)
        compiled = None if self._generic or not self.direct else self._compiled.get(key)
        programs = (self.max_programs,) if self.partials else ()
        if compiled is None:
            kernel = _stats_partials_kernel if self.partials else _stats_kernel
            self._compiled[key] = kernel[(grid,)](x, amax, counts, n, row, *programs, BLOCK=BLOCK, UNROLL=UNROLL,
                                                  WIDE=wide, num_warps=NUM_WARPS)
            return
        compiled.run(grid, 1, 1, self._stream(self._index), compiled.function,
                     compiled.packed_metadata, None, None, None, ptr, amax_ptr, counts_ptr, n, row, *programs,
                     BLOCK, UNROLL, wide)


class StatsArena:
    """Preallocated device rows that Triton reductions write into; grows by blocks of ``rows``.

    ``reduce(t)`` returns a slot number; ``read()`` returns all slots as host rows of five floats
    in :data:`~fp16guard.stats.STAT_FIELDS` order, one device-to-host copy per block. Reducing
    into a slot that already holds numbers adds to them (max for amax, sums for the counts): that
    is how CUDA-graph replays accumulate.

    Args:
        device: the CUDA device of the tensors to reduce.
        rows: slots per preallocated block: float32 amax ``[rows, P]`` and int64 counts
            ``[rows, P, 4]``, P the launch's program cap with :data:`REDUCTION` ``"partials"``
            (528 on a 132-SM GPU at 4 per SM: about 19 MB per block of 1024), P = 1 with ``"atomic"``.
        direct: force (True) or forbid (False) the direct launch; None decides by Triton version.
        programs_per_sm: the launches' grid cap per multiprocessor (None: :data:`PROGRAMS_PER_SM`;
            :data:`SIDE_PROGRAMS_PER_SM` for statistics beside a captured graph's kernels).
    """

    def __init__(self, device: torch.device, rows: int = 1024, direct: bool | None = None,
                 programs_per_sm: int | None = None):
        self.device = device
        self.rows = rows
        self._launch = _Launcher(device, direct, REDUCTION, programs_per_sm)
        self._programs = self._launch.max_programs if self._launch.partials else 1
        # (amax [rows, P] float32, counts [rows, P, 4] int64, and their device pointers)
        self._blocks: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        self._compacted: list[torch.Tensor] = []  # float64 [k, 5] rows moved out of the blocks
        self._first = 0  # slot held by row 0 of the first block
        self.used = 0

    @property
    def direct(self) -> bool:
        """Whether launches bypass Triton's generic launcher (see :class:`_Launcher`)."""
        return self._launch.direct

    def refresh(self) -> None:
        """Re-read launch settings that may change between forwards (a profiler attaching)."""
        self._launch.refresh()

    def reduce(self, t: torch.Tensor) -> int:
        """Launch the reduction of ``t`` into a fresh slot (no host sync); returns the slot.

        Args:
            t: a CUDA tensor on this arena's device, dtype in :data:`DTYPES`, any shape and
                strides (a non-dense view is copied first).
        """
        slot = self.used
        self.used = slot + 1
        block, row = divmod(slot - self._first, self.rows)
        if block == len(self._blocks):
            self._new_block()
        if t.numel():
            # Statistics ignore element order: any dense layout is read in place.
            if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
                t = t.contiguous()
            amax, counts, amax_ptr, counts_ptr = self._blocks[block]
            self._launch(t, amax, counts, row, amax_ptr, counts_ptr)
        return slot

    def take(self) -> int:
        """A fresh slot, allocated but not written (a later :meth:`reduce_group` fills it)."""
        slot = self.used
        self.used = slot + 1
        if (slot - self._first) // self.rows == len(self._blocks):
            self._new_block()
        return slot

    def group_table(self, tensors: list[torch.Tensor], slots: list[int]) -> tuple[torch.Tensor, list[int], int]:
        """The table :meth:`reduce_group` launches with, as a host int64 tensor ``[5 * GROUP_TENSORS + 1]``
        (see ``_group_kernel``), and the grid size.

        Args:
            tensors: up to ``GROUP_TENSORS - 1`` dense CUDA tensors of one dtype, each non-empty,
                at most :data:`WIDE_ABOVE` elements, 16-byte aligned. ``tensors[0]`` is the base
                pointer the launch passes.
            slots: their slots (from :meth:`take`).
        """
        k, width = len(tensors), GROUP_TENSORS
        assert 0 < k < width and len(slots) == k
        chunk = BLOCK * UNROLL
        size = tensors[0].element_size()
        base = tensors[0].data_ptr()
        amax0, counts0 = self._blocks[0][2], self._blocks[0][3]
        table = [0] * (5 * width + 1)
        cum = 0
        for i, (t, slot) in enumerate(zip(tensors, slots)):
            n = t.numel()
            block, row = divmod(slot - self._first, self.rows)
            _, _, amax_ptr, counts_ptr = self._blocks[block]
            table[i] = (t.data_ptr() - base) // size
            table[width + i] = cum
            table[2 * width + i] = n
            table[3 * width + i] = (amax_ptr - amax0) // 4 + row * self._programs
            table[4 * width + i] = (counts_ptr - counts0) // 8 + row * self._programs * 4
            cum += (n + chunk - 1) // chunk
        table[width + k: 2 * width] = [1 << 62] * (width - k)
        table[5 * width] = cum
        return torch.tensor(table, dtype=torch.int64), min(cum, self._launch.max_programs)

    def reduce_group(self, tensors: list[torch.Tensor], slots: list[int], table: torch.Tensor, grid: int) -> None:
        """One launch that reduces every tensor of a group into its slot (no host sync).

        Args:
            tensors, slots: as in :meth:`group_table`.
            table: the device copy of :meth:`group_table`'s table (while a CUDA graph is captured,
                it may be filled after the capture and before the first replay: the kernel reads it
                when it runs).
            grid: programs, from :meth:`group_table`.
        """
        amax, counts = self._blocks[0][0], self._blocks[0][1]
        _group_kernel[(grid,)](tensors[0], amax, counts, table, KMAX=GROUP_TENSORS, VEC=16 // tensors[0].element_size(),
                               BLOCK=BLOCK, UNROLL=UNROLL, num_warps=NUM_WARPS)

    def warm_group(self) -> bool:
        """Compile the group kernel for every dtype of :data:`DTYPES` now (not inside a capture);
        False when it does not compile or run (then groups are not used)."""
        if not self._blocks:
            self._new_block()
        try:
            for dtype in DTYPES:
                x = torch.zeros(64, dtype=dtype, device=self.device)
                slot = self.take()
                host, grid = self.group_table([x], [slot])
                self.reduce_group([x], [slot], host.to(self.device), grid)
                self.used -= 1  # give the slot back, zeroed
                block, row = divmod(slot - self._first, self.rows)
                self._blocks[block][0][row].zero_()
                self._blocks[block][1][row].zero_()
        except Exception:  # noqa: BLE001 - any compile or launch failure: per-tensor launches
            return False
        return True

    def reserve(self, rows: int) -> None:
        """Allocate blocks until ``rows`` more slots fit (reducing into them allocates nothing)."""
        while len(self._blocks) * self.rows < self.used - self._first + rows:
            self._new_block()

    def _new_block(self) -> None:
        # Normal tensors also when first used under torch.inference_mode(): they are zeroed in place
        # later, maybe outside it, which inference tensors refuse.
        with torch.inference_mode(False):
            amax = torch.zeros(self.rows, self._programs, dtype=torch.float32, device=self.device)
            counts = torch.zeros(self.rows, self._programs, 4, dtype=torch.int64, device=self.device)
        self._blocks.append((amax, counts, amax.data_ptr(), counts.data_ptr()))

    def _zero_blocks(self) -> None:
        for amax, counts, _, _ in self._blocks[: (self.used - self._first + self.rows - 1) // self.rows]:
            amax.zero_()
            counts.zero_()

    def clear(self) -> None:
        """Zero the used slots (on the current stream, no sync) and start again at slot 0."""
        self._zero_blocks()
        self._compacted.clear()
        self._first = self.used = 0

    def compact(self) -> None:
        """Move the filled slots out of the blocks as reduced rows (a few kernels, no sync) and
        zero the blocks for the next slots: eager forwards then keep 40 bytes per slot, not the
        blocks' 36 per program. Not while a CUDA graph is captured (replays must accumulate in
        the blocks)."""
        if self.used > self._first:
            self._compacted.append(self._reduced())
            self._zero_blocks()
            self._first = self.used

    def _reduced(self) -> torch.Tensor:
        """The filled slots of the blocks, each program's partials reduced: float64 ``[k, 5]``."""
        left, parts = self.used - self._first, []
        for amax, counts, _, _ in self._blocks:
            if left <= 0:
                break
            amax, counts = amax[:left], counts[:left]
            parts.append(torch.cat([amax.amax(1)[:, None].double(), counts.sum(1).double()], 1))
            left -= len(amax)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def device_rows(self) -> torch.Tensor:
        """Every used slot as float64 ``[used, 5]`` on the device (no sync), the programs'
        partials reduced."""
        parts = list(self._compacted)
        if self.used > self._first:
            parts.append(self._reduced())
        if not parts:
            return torch.zeros(0, 5, dtype=torch.float64, device=self.device)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def read(self) -> list[tuple[float, ...]]:
        """Every used slot as ``(amax, nonfinite, nonzero, flush_to_zero, subnormal)``."""
        return [tuple(r) for r in self.device_rows().cpu().tolist()]
