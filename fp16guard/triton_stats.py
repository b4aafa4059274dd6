"""One-launch range statistics for CUDA tensors (Triton): the hot path of FInspect on the GPU.

The eager :func:`fp16guard.stats.tensor_stats` launches about twenty small kernels per tensor; at
two hundred tensors per forward their launch cost, not their arithmetic, dominates a fast GPU
model. :class:`StatsArena` instead reduces each tensor with one Triton kernel that reads it once
and folds its block's results into one row of a preallocated device buffer with atomics
(``atomic_max`` for amax, int64 ``atomic_add`` for the counts). Rows are read back together.

Semantics are those of :data:`fp16guard.stats.STAT_FIELDS`; ``tests/test_inspector.py`` checks
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

if triton is not None:

    @triton.jit
    def _stats_kernel(x_ptr, amax_ptr, count_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        a = tl.abs(tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32))
        finite = a <= 3.4028234663852886e38  # float32 max: NaN and inf fail
        zero = a == 0.0
        tiny = a < 5.960464477539063e-08  # 2**-24, fp16guard.fp16.FP16_MIN_SUBNORMAL
        small = a < 6.103515625e-05  # 2**-14, fp16guard.fp16.FP16_MIN_NORMAL
        tl.atomic_max(amax_ptr, tl.max(tl.where(finite & inside, a, 0.0), axis=0))
        tl.atomic_add(count_ptr + 0, tl.sum((inside & ~finite).to(tl.int64), axis=0))
        tl.atomic_add(count_ptr + 1, tl.sum((inside & finite & ~zero).to(tl.int64), axis=0))
        tl.atomic_add(count_ptr + 2, tl.sum((inside & tiny & ~zero).to(tl.int64), axis=0))
        tl.atomic_add(count_ptr + 3, tl.sum((inside & small & ~tiny).to(tl.int64), axis=0))


def available(t: torch.Tensor) -> bool:
    """True when ``t`` can be reduced by the Triton kernel (CUDA, fp16/bf16/fp32, Triton present)."""
    return triton is not None and t.is_cuda and t.dtype in DTYPES


class StatsArena:
    """Preallocated device rows that Triton reductions write into; grows by blocks of ``rows``.

    ``reduce(t)`` returns a slot number; ``read()`` returns all slots as host rows of five floats
    in :data:`~fp16guard.stats.STAT_FIELDS` order, one device-to-host copy per block.
    """

    BLOCK = 4096

    def __init__(self, device: torch.device, rows: int = 1024):
        self.device = device
        self.rows = rows
        self._blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.used = 0

    def reduce(self, t: torch.Tensor) -> int:
        """Launch the reduction of ``t`` into a fresh slot (no host sync); returns the slot."""
        slot = self.used
        block, row = divmod(slot, self.rows)
        if block == len(self._blocks):
            self._blocks.append((torch.zeros(self.rows, dtype=torch.float32, device=self.device),
                                 torch.zeros(self.rows, 4, dtype=torch.int64, device=self.device)))
        amax, counts = self._blocks[block]
        x = t.detach().reshape(-1)
        n = x.numel()
        if n:
            _stats_kernel[(triton.cdiv(n, self.BLOCK),)](x, amax[row:], counts[row], n, BLOCK=self.BLOCK)
        self.used += 1
        return slot

    def read(self) -> list[tuple[float, ...]]:
        """Every used slot as ``(amax, nonfinite, nonzero, flush_to_zero, subnormal)``."""
        out: list[tuple[float, ...]] = []
        for amax, counts in self._blocks:
            a, c = amax.cpu().tolist(), counts.cpu().tolist()
            out += [(a[i], *map(float, c[i])) for i in range(len(a))]
        return out[: self.used]
