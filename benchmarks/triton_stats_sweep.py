"""Tuning sweep of the Triton statistics kernel on ResNet-50's real activations (GPU only).

    python benchmarks/triton_stats_sweep.py        # results_triton_sweep_h100.txt

Captures the conv/BN/ReLU outputs of one batch-32 ResNet-50 forward (FP32 and FP16) and prints
their total size: the bytes any after-the-fact reduction must read, the overhead floor discussed in
the README. Then, for torch.amax (reference) and for fp16guard's kernel in every launch
configuration (tile size, warps, unroll, programs per SM) and with 32- or 64-bit offsets, it times
the reductions of all of them replayed as one CUDA graph (median of 20 replays): GPU time only, with no Python launch cost
(an earlier version of this sweep timed eager launches, which on the H100's host measured the
launch rate, not the kernel). The configuration in fp16guard/inspect/triton_stats.py comes from here.
"""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspect_overhead import graph_replay_ms, make_resnet50  # noqa: E402

import fp16guard.inspect.triton_stats as T  # noqa: E402


def activations(dev):
    """{dtype: [conv/BN/ReLU outputs of one batch-32 forward]}."""
    base, _ = make_resnet50()
    base = base.eval().to(dev)
    acts = {}
    with torch.no_grad():
        for dt in (torch.float32, torch.float16):
            m = base.to(dt)
            got = []
            hooks = [mod.register_forward_hook(lambda mod, a, o: got.append(o.clone())
                                               if type(mod).__name__ in ("Conv2d", "BatchNorm2d", "ReLU") else None)
                     for mod in m.modules()]
            m(torch.randn(32, 3, 224, 224, device=dev, dtype=dt))
            for h in hooks:
                h.remove()
            acts[dt] = got
    return acts


def main():
    dev = torch.device("cuda")
    acts = activations(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    amax = torch.zeros(4096, device=dev)
    counts = torch.zeros(4096, 4, dtype=torch.int64, device=dev)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {T.triton.__version__}; "
          "GPU-only times (CUDA graph replay)")
    for dt, ts in acts.items():
        gb = sum(t.numel() * t.element_size() for t in ts) / 1e9
        ref = graph_replay_ms(lambda: [torch.amax(t) for t in ts], 20)
        print(f"{dt}: {len(ts)} conv/bn/relu outputs, {gb:.2f} GB (reading them at 3.35 TB/s: {gb / 3.35:.2f} ms); "
              f"torch.amax over all: {ref:.2f} ms ({gb / ref * 1e3:.0f} GB/s)")

    def reduce_all(ts, block, warps, unroll, pps, wide):
        def fn():
            for i, t in enumerate(ts):
                n = t.numel()
                grid = min((n + block * unroll - 1) // (block * unroll), pps * sms)
                T._stats_kernel[(grid,)](t, amax, counts, n, i, BLOCK=block, UNROLL=unroll, WIDE=wide,
                                         num_warps=warps)
        return graph_replay_ms(fn, 20)

    results = []
    for block, warps, unroll, pps, wide in itertools.product([1024, 2048, 4096], [4, 8], [1, 2, 4], [4, 8, 16],
                                                             [False, True]):
        ms = [reduce_all(ts, block, warps, unroll, pps, wide) for ts in acts.values()]
        results.append((sum(ms), block, warps, unroll, pps, wide, ms))
    results.sort()
    gb = [sum(t.numel() * t.element_size() for t in ts) / 1e9 for ts in acts.values()]
    for total, block, warps, unroll, pps, wide, ms in results:
        mark = "  <- fp16guard" if (block, warps, unroll, pps, wide) == (T.BLOCK, T.NUM_WARPS, T.UNROLL,
                                                                          T.PROGRAMS_PER_SM, False) else ""
        print(f"block {block} warps {warps} unroll {unroll} pps {pps} {'64' if wide else '32'}-bit offsets: "
              f"fp32 {ms[0]:.2f} ms ({gb[0] / ms[0] * 1e3:.0f} GB/s) fp16 {ms[1]:.2f} ms "
              f"({gb[1] / ms[1] * 1e3:.0f} GB/s){mark}")


if __name__ == "__main__":
    main()
