"""Range statistics of one tensor, computed where the tensor lives.

:func:`tensor_stats` reduces a tensor of any shape to a 5-vector on the tensor's own device, with no
host synchronisation; :class:`RangeStats` is the host-side value once a report is read.
:func:`array_stats` does the same for a numpy array (weights, ONNX initializers).

The five statistics, in :data:`STAT_FIELDS` order:

``amax``
    largest *finite* magnitude, ``max |x|`` over finite elements (0 for an empty tensor).
``nonfinite``
    number of inf or NaN elements.
``nonzero``
    number of finite nonzero elements (the denominator of the underflow fractions).
``flush_to_zero``
    finite nonzero elements with ``|x| < 2**-24``: FP16 rounds them to zero (or to its smallest
    subnormal).
``subnormal``
    elements with ``2**-24 <= |x| < 2**-14``: FP16 keeps them as subnormals, with reduced precision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import torch

from fp16guard.fp16 import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, headroom_bits

STAT_FIELDS = ("amax", "nonfinite", "nonzero", "flush_to_zero", "subnormal")


#: Elements per chunk of :func:`tensor_stats` on the CPU: 1 MiB of FP32, so the abs, the
#: comparisons and the amax of a chunk read it from the cache and the tensor crosses memory once
#: (on 2 cores, 16M FP32 elements: 65 -> 25 ms; 128M: 718 -> 200 ms; the eager FInspect of
#: ResNet-50, batch 32, went from 2.79x to 1.93x the plain forward, ``benchmarks/results_cpu.txt``).
CPU_CHUNK = 1 << 18


def _cpu_chunked_stats(x: torch.Tensor) -> torch.Tensor:
    """:func:`tensor_stats` of a CPU tensor, one :data:`CPU_CHUNK` at a time, through numpy (the
    same numbers).

    Per chunk: ``|x|`` into a reused buffer, its max (NaN and inf propagate: only a chunk that holds
    them counts its finite elements and takes the max over those), and the comparisons with
    2**-14, 2**-24 and 0, each only while the one before found something (zero < 2**-24 < 2**-14).
    numpy's comparison and count run 3-5x faster than torch's on a cached chunk (2 cores, 256K
    float32: ``np.less`` + ``np.count_nonzero`` 20 us, ``torch.lt`` + ``torch.count_nonzero`` 100 us).
    float16 and bfloat16 chunks are widened to float32 first (exact; numpy's float16 arithmetic is
    slow and it has no bfloat16)."""
    flat = x.reshape(-1).resolve_neg().resolve_conj()
    n = flat.numel()
    if not n:
        return torch.zeros(5, dtype=torch.float64)
    k = min(n, CPU_CHUNK)
    widen = flat.dtype not in (torch.float32, torch.float64)
    dtype = np.float64 if flat.dtype == torch.float64 else np.float32
    fmax = np.finfo(dtype).max
    a, b = np.empty(k, dtype), np.empty(k, np.bool_)
    staging = torch.empty(k, dtype=torch.float32) if widen else None
    src = None if widen else flat.numpy()
    amax, nonfinite, zero, tiny, small = 0.0, 0, 0, 0, 0
    for start in range(0, n, k):
        m = min(k, n - start)
        if widen:
            staging[:m].copy_(flat[start:start + m])
            chunk = staging.numpy()[:m]
        else:
            chunk = src[start:start + m]
        av, bv = np.abs(chunk, out=a[:m]), b[:m]
        top = av.max()
        if not top <= fmax:  # NaN or inf in this chunk
            ok = np.less_equal(av, fmax, out=bv)
            finite = int(np.count_nonzero(ok))
            nonfinite += m - finite
            top = av[ok].max() if finite else 0.0
        amax = max(amax, float(top))
        below = int(np.count_nonzero(np.less(av, FP16_MIN_NORMAL, out=bv)))  # zeros included
        if below:
            small += below
            below = int(np.count_nonzero(np.less(av, FP16_MIN_SUBNORMAL, out=bv)))  # zeros included
            if below:
                tiny += below
                zero += int(np.count_nonzero(np.equal(av, 0, out=bv)))
    return torch.tensor([amax, nonfinite, n - nonfinite - zero, tiny - zero, small - tiny], dtype=torch.float64)


def tensor_stats(x: torch.Tensor) -> torch.Tensor:
    """Reduce ``x`` to its range statistics, on ``x.device``, without a host sync.

    Written as one ``abs``, one ``amax`` and four ``count_nonzero`` of comparisons (no bool
    ``sum``, no ``isfinite``, both several times slower on the CPU): NaN fails every comparison, so
    ``|x| <= finfo.max`` counts exactly the finite elements. A CPU tensor is reduced one
    :data:`CPU_CHUNK` at a time through numpy (:func:`_cpu_chunked_stats`: one pass over memory
    instead of about eleven, and numpy's comparisons are faster than torch's on the CPU).

    Args:
        x: floating tensor of any shape and dtype (float16, bfloat16, float32, float64).

    Returns:
        float64 tensor of shape ``[5]`` on ``x.device``, fields in :data:`STAT_FIELDS` order.
        Counts are exact up to 2**53 elements.
    """
    if x.device.type == "cpu":
        return _cpu_chunked_stats(x.detach())
    a = x.detach().abs()
    n = a.numel()
    finite = torch.count_nonzero(a <= torch.finfo(a.dtype).max)
    zero = torch.count_nonzero(a == 0)
    below_subnormal = torch.count_nonzero(a < FP16_MIN_SUBNORMAL)  # zeros included
    below_normal = torch.count_nonzero(a < FP16_MIN_NORMAL)  # zeros included
    if n:
        amax = torch.nan_to_num(a, nan=0.0, posinf=0.0).amax()
    else:
        amax = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.stack(
        [
            amax.double(),
            (n - finite).double(),
            (finite - zero).double(),
            (below_subnormal - zero).double(),
            (below_normal - below_subnormal).double(),
        ]
    )


@dataclass(frozen=True)
class RangeStats:
    """Range statistics of one tensor, or of several merged (max of ``amax``, sum of counts).

    Attributes:
        amax: largest finite magnitude (same unit as the tensor).
        numel: number of elements.
        nonfinite: inf/NaN elements.
        nonzero: finite nonzero elements.
        flush_to_zero: finite nonzero elements with ``|x| < 2**-24``.
        subnormal: elements with ``2**-24 <= |x| < 2**-14``.
    """

    amax: float = 0.0
    numel: int = 0
    nonfinite: int = 0
    nonzero: int = 0
    flush_to_zero: int = 0
    subnormal: int = 0

    @classmethod
    def from_row(cls, row: Iterable[float], numel: int) -> "RangeStats":
        """Build from a :func:`tensor_stats` row (5 numbers) and the tensor's element count."""
        amax, nonfinite, nonzero, ftz, sub = (float(v) for v in row)
        return cls(amax, int(numel), int(nonfinite), int(nonzero), int(ftz), int(sub))

    @classmethod
    def merge(cls, items: Iterable["RangeStats"]) -> "RangeStats":
        """Combine the statistics of several tensors; an empty iterable gives all zeros."""
        items = list(items)
        if not items:
            return cls()
        return cls(
            amax=max(s.amax for s in items),
            numel=sum(s.numel for s in items),
            nonfinite=sum(s.nonfinite for s in items),
            nonzero=sum(s.nonzero for s in items),
            flush_to_zero=sum(s.flush_to_zero for s in items),
            subnormal=sum(s.subnormal for s in items),
        )

    @property
    def overflows(self) -> bool:
        """True when a finite value exceeds 65504: an FP16 copy would hold inf."""
        return self.amax > FP16_MAX

    @property
    def out_of_range(self) -> bool:
        """True when the tensor overflows FP16 or already holds inf/NaN."""
        return self.overflows or self.nonfinite > 0

    @property
    def headroom(self) -> float:
        """``log2(65504 / amax)`` in bits; see :func:`fp16guard.fp16.headroom_bits`."""
        return headroom_bits(self.amax)

    @property
    def flush_to_zero_fraction(self) -> float:
        """Fraction of finite nonzero elements that FP16 flushes to zero (0 when none are nonzero)."""
        return self.flush_to_zero / self.nonzero if self.nonzero else 0.0

    @property
    def subnormal_fraction(self) -> float:
        """Fraction of finite nonzero elements that FP16 keeps only as subnormals."""
        return self.subnormal / self.nonzero if self.nonzero else 0.0

    def to_json(self) -> dict:
        """JSON-ready dict: the fields plus ``headroom`` (null when infinite) and the fractions."""
        d = asdict(self)
        h = self.headroom
        d["headroom"] = None if math.isinf(h) else round(h, 4)
        d["flush_to_zero_fraction"] = self.flush_to_zero_fraction
        d["subnormal_fraction"] = self.subnormal_fraction
        return d


def array_stats(a: np.ndarray) -> RangeStats:
    """:class:`RangeStats` of a numpy array (weights, ONNX initializers), computed in float64.

    Args:
        a: array of any shape; non-floating arrays are measured after conversion to float64.
    """
    x = np.abs(np.asarray(a, dtype=np.float64))
    finite = np.isfinite(x)
    nonzero = finite & (x != 0)
    tiny = x < FP16_MIN_SUBNORMAL
    small = x < FP16_MIN_NORMAL
    return RangeStats(
        amax=float(x[finite].max()) if finite.any() else 0.0,
        numel=int(x.size),
        nonfinite=int((~finite).sum()),
        nonzero=int(nonzero.sum()),
        flush_to_zero=int((nonzero & tiny).sum()),
        subnormal=int((nonzero & small & ~tiny).sum()),
    )
