"""Overhead of fp16guard's FInspect against a plain forward, side by side with two other ways.

    python benchmarks/inspect_overhead.py --device cuda --batch 32
    python benchmarks/inspect_overhead.py --device cpu --batch 32 --iters 3

ResNet-50 (torchvision's when it imports, else benchmarks/_resnet50.py), random weights, eval
mode, under torch.no_grad(), FP32 and FP16. For each dtype, four variants run in interleaved
rounds (plain, fp16guard, seed-style, Hugging Face) so drift hits all alike; each variant's time is
the median over rounds, and the printed ratio is variant / plain.

* fp16guard: ``FInspect(model)`` hooks installed once; the report is read once at the end (its cost
  is printed separately). On CUDA, ``fp16guard-eager`` is the same with ``fused=False`` (eager
  torch reductions instead of the Triton kernel).
* seed-style: the seed's ``fp16_check`` forward hook on every module: ``torch.abs(x).max()``
  compared with 65504 in Python, i.e. one host sync per tensor per module.
* hf: transformers' ``DebugUnderflowOverflow`` (when transformers imports), on a copy of the model
  since it cannot remove its hooks.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp16guard import FInspect  # noqa: E402


def make_resnet50() -> tuple[torch.nn.Module, str]:
    try:
        from torchvision.models import resnet50

        return resnet50(), "torchvision"
    except Exception:
        from _resnet50 import resnet50

        return resnet50(), "benchmarks/_resnet50.py"


def seed_style_hooks(model):
    """The seed's check as a hook on every module (one sync per tensor per module)."""

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                yield from walk(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                yield from walk(o)

    flags = []

    def hook(module, inputs, output):
        for i in walk(inputs):
            for o in walk(output):
                if torch.abs(i).max() < 65504 and torch.abs(o).max() > 65504:
                    flags.append(("from", module))
                if torch.abs(i).max() > 65504 and torch.abs(o).max() < 65504:
                    flags.append(("to", module))

    return [m.register_forward_hook(hook) for m in model.modules()]


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(dtype, device, batch, iters, warmup):
    base, source = make_resnet50()
    base = base.eval().to(device=device, dtype=dtype)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    variants: dict = {"plain": (base, None)}

    guarded = copy.deepcopy(base)
    probe = FInspect(guarded, static=False)
    variants["fp16guard"] = (guarded, probe)
    eager_model = copy.deepcopy(base)
    eager_probe = FInspect(eager_model, static=False, fused=False)
    if device.type == "cuda":
        variants["fp16guard-eager"] = (eager_model, eager_probe)

    seed_model = copy.deepcopy(base)
    seed_handles = seed_style_hooks(seed_model)
    variants["seed-style"] = (seed_model, None)

    try:
        from transformers.debug_utils import DebugUnderflowOverflow

        hf_model = copy.deepcopy(base)
        DebugUnderflowOverflow(hf_model, max_frames_to_save=21)
        variants["hf"] = (hf_model, None)
    except Exception as e:  # transformers missing or incompatible
        print(f"  (Hugging Face DebugUnderflowOverflow skipped: {type(e).__name__}: {e})")

    times = {k: [] for k in variants}
    with torch.no_grad(), probe, eager_probe:  # hooks installed once, for every round
        for r in range(warmup + iters):
            for name, (model, _) in variants.items():
                dt = timed(lambda: model(x), device)
                if r >= warmup:
                    times[name].append(dt)
    t_report = timed(lambda: probe.report(), device)
    for h in seed_handles:
        h.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    return source, med, t_report, len(probe.report().calls)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,float16")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"fp16guard inspect overhead: ResNet-50, batch {args.batch}, {name}, torch {torch.__version__}, "
          f"{args.iters} timed rounds after {args.warmup} warm-up")
    print(f"{'dtype':8} {'variant':11} {'ms/forward':>11} {'x plain':>8}")
    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        source, med, t_report, n_calls = bench(dtype, device, args.batch, args.iters, args.warmup)
        for k, v in med.items():
            print(f"{dt_name:8} {k:11} {v * 1e3:11.2f} {v / med['plain']:8.2f}")
        print(f"{dt_name:8} report()    {t_report * 1e3:11.2f}  (once, for {n_calls} calls; model from {source})")


if __name__ == "__main__":
    main()
