"""Tuning sweep of the Triton statistics kernel on ResNet-50's real activations (GPU only).

    python benchmarks/triton_stats_sweep.py        # results_triton_sweep_h100.txt

Captures the conv/BN/ReLU outputs of one batch-32 ResNet-50 forward (FP32 and FP16), prints their
total size (the bytes any after-the-fact reduction must read: the overhead floor discussed in the
README) and the time torch.amax takes over all of them, then times fp16guard's StatsArena over
all of them for every launch configuration (tile size, warps, unroll, programs per SM) and prints
the best. The configuration in fp16guard/triton_stats.py comes from this sweep.
"""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fp16guard.triton_stats as T  # noqa: E402
from inspect_overhead import make_resnet50  # noqa: E402

dev = torch.device("cuda")
base, _ = make_resnet50(); base = base.eval().to(dev)
acts = {}
with torch.no_grad():
    for dt in (torch.float32, torch.float16):
        m = base.to(dt); got = []
        hs = [mod.register_forward_hook(lambda mod, a, o: got.append(o.clone()) if type(mod).__name__ in ("Conv2d", "BatchNorm2d", "ReLU") else None) for mod in m.modules()]
        m(torch.randn(32, 3, 224, 224, device=dev, dtype=dt)); [h.remove() for h in hs]
        acts[dt] = got
def total(ts, n=5):
    ar = T.StatsArena(dev, rows=4096)
    for t in ts: ar.reduce(t)
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        for t in ts: ar.reduce(t)
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n
for dt, ts in acts.items():
    gb = sum(t.numel() * t.element_size() for t in ts) / 1e9
    ref_s = torch.cuda.Event(enable_timing=True); ref_e = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); ref_s.record()
    for t in ts: torch.amax(t)
    ref_e.record(); torch.cuda.synchronize(); ref = ref_s.elapsed_time(ref_e)
    print(f"{dt}: {len(ts)} conv/bn/relu outputs, {gb:.2f} GB; torch.amax over all: {ref:.2f} ms")
best = None
for block, warps, unroll, pps in itertools.product([512, 1024, 2048], [4, 8], [1, 2, 4, 8], [2, 4, 8]):
    T.BLOCK, T.NUM_WARPS, T.UNROLL, T.PROGRAMS_PER_SM = block, warps, unroll, pps
    ms = [total(ts) for ts in acts.values()]
    gbs = [sum(t.numel() * t.element_size() for t in ts) / 1e6 / m for ts, m in zip(acts.values(), ms)]
    line = f"block {block} warps {warps} unroll {unroll} pps {pps}: fp32 {ms[0]:.2f} ms ({gbs[0]:.0f} GB/s) fp16 {ms[1]:.2f} ms ({gbs[1]:.0f} GB/s)"
    if best is None or sum(ms) < best[0]:
        best = (sum(ms), (block, warps, unroll, pps), line)
    print(line)
print("BEST", *best[1], "|", best[2])
