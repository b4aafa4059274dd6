"""Tuning sweep of the Triton statistics kernel on ResNet-50's real activations (GPU only).

    python benchmarks/triton_stats_sweep.py        # results_triton_sweep_h200.txt

Captures the conv/BN/ReLU outputs of one batch-32 ResNet-50 forward (FP32 and FP16) and prints
their total size and the read floor (bytes over the read bandwidth measured here, as in
``inspect_overhead.py --graph``). Then, for every launch configuration of fp16guard's kernel
(unroll, warps, programs per SM; ``triton_stats.REDUCTION`` as configured), it
times the reductions of all of them replayed as one CUDA graph (median of 20 replays): GPU time
only, with no Python launch cost. The configuration in fp16guard/inspect/triton_stats.py comes from
here. Each configuration runs through a fresh ``StatsArena``, the launcher FInspect uses.
"""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspect_overhead import graph_replay_ms, make_resnet50, read_bandwidth  # noqa: E402

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


@T.triton.jit
def _empty_kernel(x_ptr, n):
    pass


@T.triton.jit
def _read_max_kernel(x_ptr, out_ptr, n, BLOCK: T.tl.constexpr):
    """The least a one-pass statistic can do: read every element, keep a max, one atomic."""
    pid = T.tl.program_id(0)
    acc = T.tl.zeros((BLOCK,), dtype=T.tl.float32)
    for start in T.tl.range(pid * BLOCK, n, T.tl.num_programs(0) * BLOCK):
        offs = start + T.tl.arange(0, BLOCK)
        acc = T.tl.maximum(acc, T.tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(T.tl.float32))
    T.tl.atomic_max(out_ptr, T.tl.max(acc, axis=0))


def references_ms(ts) -> dict[str, float]:
    """What bounds a reduction launched per tensor, as hooks must: the same read-and-max kernel
    over all the bytes in one launch (the floor a single pass reaches) and once per tensor, an
    empty kernel per tensor (launch and stream-order cost alone), and torch.amax per tensor."""
    sms = torch.cuda.get_device_properties(ts[0].device).multi_processor_count
    out = torch.zeros(1, device=ts[0].device)

    def grid(t):
        return (min((t.numel() + 4095) // 4096, T.PROGRAMS_PER_SM * sms),)

    whole = torch.cat([t.reshape(-1) for t in ts])  # every byte in one buffer: one launch reads all
    return {
        "read+max kernel, one launch over all": graph_replay_ms(
            lambda: _read_max_kernel[grid(whole)](whole, out, whole.numel(), BLOCK=4096, num_warps=8), 20),
        "empty kernel per tensor": graph_replay_ms(lambda: [_empty_kernel[grid(t)](t, t.numel()) for t in ts], 20),
        "read+max kernel per tensor": graph_replay_ms(
            lambda: [_read_max_kernel[grid(t)](t, out, t.numel(), BLOCK=4096, num_warps=8) for t in ts], 20),
        "torch.amax per tensor": graph_replay_ms(lambda: [torch.amax(t) for t in ts], 20),
    }


def reduce_all_ms(ts, config) -> float:
    """GPU milliseconds of reducing every tensor of ``ts`` once with ``config`` applied."""
    for name, value in config.items():
        setattr(T, name, value)
    arena = T.StatsArena(ts[0].device, rows=len(ts))

    def fn():
        arena.clear()
        for t in ts:
            arena.reduce(t)

    return graph_replay_ms(fn, 20)


def main():
    dev = torch.device("cuda")
    acts = activations(dev)
    bandwidth = read_bandwidth(dev)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {T.triton.__version__}; "
          f"GPU-only times (CUDA graph replay); reduction {T.REDUCTION}; read bandwidth {bandwidth / 1e12:.2f} TB/s")
    floors = {}
    for dt, ts in acts.items():
        nbytes = sum(t.numel() * t.element_size() for t in ts)
        floors[dt] = nbytes / bandwidth * 1e3
        print(f"{dt}: {len(ts)} conv/bn/relu outputs, {nbytes / 1e9:.2f} GB, read floor {floors[dt]:.3f} ms")
    for dt, ts in acts.items():
        for what, ms in references_ms(ts).items():
            print(f"{str(dt).replace('torch.', '')} {what}: {ms:.3f} ms ({ms / floors[dt]:.2f}x floor)")
    default = {k: getattr(T, k) for k in ("UNROLL", "NUM_WARPS", "PROGRAMS_PER_SM")}
    results = []
    for unroll, warps, pps in itertools.product([1, 2, 4, 8], [4, 8], [4, 8]):
        config = {"UNROLL": unroll, "NUM_WARPS": warps, "PROGRAMS_PER_SM": pps}
        try:
            ms = {dt: reduce_all_ms(ts, config) for dt, ts in acts.items()}
        except Exception as e:  # a configuration that does not compile or fit
            print(f"{config}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        results.append((sum(ms[dt] / floors[dt] for dt in ms), config, ms))
    for name, value in default.items():
        setattr(T, name, value)
    results.sort(key=lambda r: r[0])
    for _, config, ms in results:
        mark = "  <- fp16guard" if config == default else ""
        print(" ".join(f"{k.lower()} {v}" for k, v in config.items()) + ": " + "  ".join(
            f"{str(dt).replace('torch.', '')} {t:.3f} ms ({t / floors[dt]:.2f}x floor)" for dt, t in ms.items()) + mark)


if __name__ == "__main__":
    main()
