r"""Where FInspect's eager forward spends its time (issue 26 item 3): plain, no-op hooks, FInspect
without reductions, FInspect (``cuda_graph=False``), medians (and minima) of interleaved rounds;
then a cProfile of FInspect.

    python benchmarks/eager_breakdown.py --device cuda --models resnet50,bert-base --dtype float16
    python benchmarks/eager_breakdown.py --device cpu --models resnet50 --dtype float32 --batch 32 --iters 3

Each model's first line counts what one hooked forward measures: module calls, tensors reduced (one
kernel launch each on CUDA), and how many of those tensors are overwritten in place later in the
same forward (an in-place ReLU after a BatchNorm, ``out += identity``). Only the others could wait
for a shared multi-tensor launch in eager mode: a reduction must run before the write, and an eager
forward cannot know, at a hook, whether code between it and the next hook will write.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import pstats
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspect_overhead import check_args, make_model, noop_hooks, timed  # noqa: E402

from fp16guard import FInspect  # noqa: E402


def count_in_place(model, a, kw) -> tuple[int, int, int]:
    """(module calls, tensors reduced, tensors overwritten in place later in the forward) of one
    hooked forward (no_grad); the reduced tensors are held to the end to read their version counters."""
    from fp16guard.inspect.store import StatsStore

    held = []
    store_measure = StatsStore.measure

    def measure(store, t, *, fresh=False):
        row = store_measure(store, t, fresh=fresh)
        if row == len(store.numel) - 1 and (not held or held[-1][2] != row):
            held.append((t, None if t.is_inference() else t._version, row))
        return row

    probe = FInspect(model, static=False, cuda_graph=False)
    StatsStore.measure = measure
    try:
        with torch.no_grad(), probe:
            model(*a, **kw)
    finally:
        StatsStore.measure = store_measure
    changed = sum(v is not None and t._version != v for t, v, _ in held)
    return len(probe._main.calls), len(held), changed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="resnet50,vit_b_16,bert-base")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--profile", type=int, default=15, help="rows of the cProfile table (0: none)")
    ap.add_argument("--baseline", metavar="DIR", help="an earlier fp16guard as package fp16guard_base (see "
                    "inspect_overhead.py): adds its FInspect as a row")
    args = ap.parse_args()
    check_args(args.models, args.dtype, cuda=args.device.startswith("cuda"))
    base_cls = None
    if args.baseline:
        sys.path.append(args.baseline)
        from fp16guard_base import FInspect as base_cls
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    for name in args.models.split(","):
        model, a, kw = make_model(name, args.batch, device, dtype)
        calls, reduced, changed = count_in_place(model, a, kw)
        print(f"{name:10} {args.dtype:8} one forward: {calls} module calls, {reduced} tensors reduced, "
              f"{changed} of them overwritten in place later in the forward")
        hooked = copy.deepcopy(model)
        handles = noop_hooks(hooked)
        bare = copy.deepcopy(model)
        bare_probe = FInspect(bare, static=False, cuda_graph=False)
        bare_probe._main.store._reduce = lambda t, row: None
        full = copy.deepcopy(model)
        probe = FInspect(full, static=False, cuda_graph=False)
        variants = {"plain": model, "no-op hooks": hooked, "FInspect, no reductions": bare, "FInspect": full}
        probes = [bare_probe, probe]
        if base_cls is not None:
            old = copy.deepcopy(model)
            probes.append(base_cls(old, static=False, cuda_graph=False))
            variants["FInspect@baseline"] = old
        times = {k: [] for k in variants}
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for p in probes:
                stack.enter_context(p)
            for r in range(2 + args.iters):
                for k, m in variants.items():
                    dt = timed(lambda: m(*a, **kw), device)  # noqa: B023
                    if r >= 2:
                        times[k].append(dt)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            low = {k: min(v) * 1e3 for k, v in times.items()}
            for k, v in med.items():
                print(f"{name:10} {args.dtype:8} {k:24} {v:9.2f} ms {v / med['plain']:5.2f}x plain   "
                      f"(min {low[k]:9.2f} ms {low[k] / low['plain']:5.2f}x)")
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(3):
                    full(*a, **kw)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
                print("\n".join(out.getvalue().splitlines()[:args.profile + 12]))
        for h in handles:
            h.remove()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
