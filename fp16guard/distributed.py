"""Across processes with ``torch.distributed``: who this process is, and the reductions every stage
uses to merge per-process statistics into the single-process answer.

Under ``torchrun`` (or any initialized process group of more than one process) each rank measures
its own shard of the data set (:meth:`fp16guard.datasets.DataSource.indexed`: inputs
``rank::world_size``), then the statistics are merged before a report or a plan is made: the max
for amax (:func:`max_by_name`), sums for counts (:func:`reduce_rows`), unions for sets
(:func:`union`). Rank 0 alone writes files (:func:`is_main`); every rank gets the merged result.

Every reduction is a collective: all ranks call it, in the same order. Tensors go through the
process group's device: the CPU for gloo, the current CUDA device for NCCL (:func:`device`); names
and labels travel as Python objects (``all_gather_object``, which NCCL also carries once
``torch.cuda.set_device`` was called). torch is imported where used.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence


def _dist():
    """``torch.distributed`` when it is available, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - a torch build without distributed support
        return None
    return dist if dist.is_available() else None


def active() -> bool:
    """A process group of more than one process is initialized: statistics are merged across it."""
    dist = _dist()
    return bool(dist is not None and dist.is_initialized() and dist.get_world_size() > 1)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes the outputs: rank 0, or the only process."""
    return rank() == 0


def launched() -> bool:
    """The environment of a ``torchrun`` launch of more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group a ``torchrun`` launch describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), unless one is initialized already or there is none.

    Args:
        device: where the model runs: ``cuda...`` joins with NCCL (and makes ``cuda:LOCAL_RANK``
            the current device), anything else with gloo.

    Returns:
        True when this call initialized the group (the caller then ends it with :func:`finish`).
    """
    dist = _dist()
    if dist is None or dist.is_initialized() or not launched():
        return False
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def finish() -> None:
    """End the process group (after :func:`init_from_env`)."""
    dist = _dist()
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def backend() -> str:
    """The process group's backend (``gloo``, ``nccl``), or ``""`` without one."""
    return str(_dist().get_backend()) if active() else ""


def device():
    """The device a collective's tensors must be on: the current CUDA device for NCCL, else the CPU."""
    import torch

    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a group."""
    if not active():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool) -> bool:
    """Whether ``flag`` is true on every rank (one small collective)."""
    if not active():
        return bool(flag)
    import torch

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device())
    _dist().all_reduce(t, op=_dist().ReduceOp.MIN)
    return bool(t.item())


def ordered_union(keys: Iterable[Sequence[Any]]) -> list[Any]:
    """The keys of several lists, each once, in order of first appearance (rank 0's first)."""
    seen: dict[Any, None] = {}
    for part in keys:
        for k in part:
            seen.setdefault(k, None)
    return list(seen)


def reduce_rows(keys: Sequence[Any], rows: Mapping[Any, Sequence[float]], max_columns: Sequence[int]
                ) -> tuple[list[Any], list[list[float]]]:
    """Merge per-key rows of numbers across ranks: the max of ``max_columns``, the sum of the others.

    Args:
        keys: this rank's keys, in its order.
        rows: this rank's numbers per key (all rows of one length).
        max_columns: the columns merged by max (amax); every other column is summed (counts, exact
            in float64 up to 2**53).

    Returns:
        ``(keys, rows)``: the union of every rank's keys (rank 0's order, then the others' new
        ones) and their merged rows; a key a rank lacks counts as zeros there (amax >= 0, so zero
        is neutral for both). Without a process group, this rank's own.
    """
    if not active():
        return list(keys), [list(rows[k]) for k in keys]
    import torch

    union = ordered_union(gather(list(keys)))
    width = max(gather(max((len(r) for r in rows.values()), default=0)))
    if not union or not width:
        return union, [[] for _ in union]
    table = torch.zeros((len(union), width), dtype=torch.float64)
    for i, k in enumerate(union):
        if k in rows:
            table[i] = torch.tensor(list(rows[k]), dtype=torch.float64)
    is_max = torch.zeros(width, dtype=torch.bool)
    is_max[list(max_columns)] = True
    dist, dev = _dist(), device()
    peak, total = table[:, is_max].to(dev), table[:, ~is_max].to(dev)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    table[:, is_max], table[:, ~is_max] = peak.cpu(), total.cpu()
    return union, table.tolist()


def max_by_name(values: Mapping[str, float]) -> dict[str, float]:
    """``{name: max over ranks}`` (inf where any rank saw inf), names of every rank."""
    keys, rows = reduce_rows(list(values), {k: [v] for k, v in values.items()}, [0])
    return {k: row[0] for k, row in zip(keys, rows)}


def union(names: Iterable[str]) -> set[str]:
    """The union of every rank's ``names``."""
    return set().union(*(set(part) for part in gather(sorted(names))))


def interleave(indexed: Iterable[tuple[int, Any]]) -> list[Any]:
    """Every rank's ``(global index, value)`` pairs, gathered and put back in global order."""
    pairs = [p for part in gather(list(indexed)) for p in part]
    return [v for _, v in sorted(pairs, key=lambda p: p[0])]
