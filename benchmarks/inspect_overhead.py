r"""Overhead of fp16guard's FInspect against a plain forward, side by side with two other ways.

    python benchmarks/inspect_overhead.py --device cuda --batch 32
    python benchmarks/inspect_overhead.py --device cpu --batch 32 --iters 3
    python benchmarks/inspect_overhead.py --graph --iters 20     # results_inspect_graph_h200.txt

``--graph``: ResNet-50 and ViT-B/16 (torchvision) and BERT-base (transformers' default config, seq
128), random weights, FP32 and FP16: plain eager, FInspect eager, the plain forward as a CUDA
graph, ``FInspect.run`` (the hooked forward captured once, then replayed) and plain ``model(x)``
inside the block (which goes through ``run`` by itself on CUDA), in interleaved
rounds; then the GPU time the statistics add inside the graph (FInspect graph replay - plain graph
replay) against the read floor: the bytes of every tensor measured over the read bandwidth measured
here. The statistics run in several variants (``--kernels``: ``triton_stats.REDUCTION``,
``replay.OVERLAP_STATISTICS``, ``triton_stats.GROUP_BYTES`` or one launch per tensor,
``triton_stats.GROUP_TENSOR_BYTES``); the first listed is the default, and the reports of all
variants must agree, amax and every count per element read (printed).

``--baseline DIR`` adds an earlier fp16guard as one more eager row, side by side. Make DIR with::

    git archive d7ada3f fp16guard | tar -x -C DIR && mv DIR/fp16guard DIR/fp16guard_base
    grep -rl fp16guard DIR/fp16guard_base | xargs sed -i \
        's/\bfp16guard\./fp16guard_base./g; s/from fp16guard import/from fp16guard_base import/g'

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
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp16guard import FInspect  # noqa: E402
from fp16guard.inspect import replay as _replay, triton_stats as _triton_stats  # noqa: E402


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


def noop_hooks(model):
    """A pre- and a post-hook that do nothing on every module: the floor of any hook-based tool."""
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(lambda mod, a, k: None, with_kwargs=True))
        handles.append(m.register_forward_hook(lambda mod, a, k, o: None, with_kwargs=True, always_call=True))
    return handles


class _Breakdown:
    """Extra FInspect variants that split its cost (``--breakdown``); they poke private state."""

    @staticmethod
    def no_reduction(probe):
        probe._main.store._reduce = lambda t, row: None  # hooks and bookkeeping, no kernel at all
        return probe

    @staticmethod
    def generic_launcher(probe):
        """After the first (warm-up) forward created the arena: Triton's kernel[grid](...) launch."""
        for arena in probe._main.store._arenas.values():
            arena._launch.direct = False


def graph_replay_ms(fn, iters) -> float:
    """Median time of ``fn``'s CUDA work captured once as a CUDA graph and replayed ``iters`` times:
    GPU work with no Python launch cost (milliseconds)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (allocations, autotuning)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    device = torch.device("cuda")
    times = [timed(graph.replay, device) for _ in range(iters)]
    return statistics.median(times) * 1e3


def bench(dtype, device, batch, iters, warmup, breakdown=False):
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

    extra = []
    if breakdown:
        hooks_model = copy.deepcopy(base)
        extra += noop_hooks(hooks_model)
        variants["hooks-only"] = (hooks_model, None)
        nr_model = copy.deepcopy(base)
        variants["no-reduction"] = (nr_model, _Breakdown.no_reduction(FInspect(nr_model, static=False)))
        if device.type == "cuda":
            tl_model = copy.deepcopy(base)
            tl_probe = FInspect(tl_model, static=False)
            variants["triton-launch"] = (tl_model, tl_probe)

    if BASELINE is not None:  # an earlier fp16guard, side by side (--baseline)
        old_model = copy.deepcopy(base)
        variants["fp16guard@baseline"] = (old_model, BASELINE(old_model, static=False))

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
    probes = [p for _, p in variants.values() if p is not None]
    with contextlib.ExitStack() as stack:  # hooks installed once, for every round
        stack.enter_context(torch.no_grad())
        for p in probes:
            stack.enter_context(p)
        for r in range(warmup + iters):
            for name, (model, _) in variants.items():
                dt = timed(lambda: model(x), device)
                if r >= warmup:
                    times[name].append(dt)
                if name == "triton-launch" and r == 0:
                    _Breakdown.generic_launcher(variants[name][1])
    t_report = timed(lambda: probe.report(), device)
    for h in seed_handles + extra:
        h.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    MINIMA.update({k: min(v) for k, v in times.items()})
    gpu_ms = None
    if breakdown and device.type == "cuda":
        with torch.no_grad():
            gpu_ms = graph_replay_ms(lambda: base(x), iters)
    return source, med, t_report, len(probe.report().calls), gpu_ms


# -- graph mode: FInspect.run replaying one CUDA graph, three models ------------------------------
def make_model(name: str, batch: int, device, dtype):
    """(model, args, kwargs): ResNet-50 / ViT-B/16 from torchvision, BERT-base from transformers'
    default config (random weights: activations of the right sizes, no download)."""
    if name == "bert-base":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig())
        ids = torch.randint(0, 30522, (batch, 128), device=device)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return model.eval().to(device=device, dtype=dtype), (), kwargs
    if name == "vit_b_16":
        from torchvision.models import vit_b_16

        model = vit_b_16()
    else:
        model, _ = make_resnet50()
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    return model.eval().to(device=device, dtype=dtype), (x,), {}


def read_bandwidth(device) -> float:
    """The device's read bandwidth in bytes/s: the best of torch.amax and torch.sum over 4 GiB
    (float16 and float32), each a plain streaming read, timed as CUDA-graph replays."""
    best = 0.0
    for dtype in (torch.float16, torch.float32):
        x = torch.ones(2**32 // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
        for op in (torch.amax, lambda t: torch.sum(t, dtype=torch.float32)):
            ms = graph_replay_ms(lambda: op(x), 10)  # noqa: B023 - run here, in this iteration
            best = max(best, 2**32 / (ms / 1e3))
        x = None  # noqa: F841 - free the 4 GiB before the next dtype
    return best


def _record_of(probe):
    """The one signature record of a probe (benchmark-only access to private state)."""
    (record,) = probe._signatures.values()
    return record


def _graph_of(probe):
    """The CUDA graph FInspect.run captured (benchmark-only access to private state)."""
    return _record_of(probe).captured._graph


def bench_graph(name: str, dtype, device, batch: int, iters: int, bandwidth: float, kernels: list[tuple]):
    """Rows: plain eager, FInspect eager, plain CUDA graph, FInspect graph (probe.run); then the
    GPU-only time the statistics add inside the graph against the read floor of what they read."""
    model, args, kwargs = make_model(name, batch, device, dtype)
    with torch.no_grad():
        plain_graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(plain_graph):
            model(*args, **kwargs)
    eager_model = copy.deepcopy(model)  # each probe hooks its own copy: model() stays plain
    eager_probe = FInspect(eager_model, static=False, cuda_graph=False)
    called_model = copy.deepcopy(model)  # model(x) inside the block: replays by itself (issue 26)
    called_probe = FInspect(called_model, static=False)
    probes = {}
    for key in kernels:
        probes[key] = FInspect(copy.deepcopy(model), static=False)
    # The shipped kernels under torch.inference_mode(): captured with version counters (as shipped)
    # and in inference mode (replay.VERSIONED_CAPTURE off, as before the fourth session of issue 26).
    inference = {versioned: FInspect(copy.deepcopy(model), static=False) for versioned in (True, False)}
    first = probes[kernels[0]]
    variants = {
        "plain eager": lambda: model(*args, **kwargs),
        "FInspect eager": lambda: eager_model(*args, **kwargs),
        "plain graph": plain_graph.replay,
        "FInspect graph": lambda: first.run(*args, **kwargs),
        "FInspect model()": lambda: called_model(*args, **kwargs),
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        with contextlib.ExitStack() as stack:
            for p in [eager_probe, called_probe, *probes.values(), *inference.values()]:
                stack.enter_context(p)
            called_model(*args, **kwargs)  # eager, then warm-up + capture: later calls replay
            called_model(*args, **kwargs)
            for key, p in probes.items():  # eager, then warm-up + capture: later runs replay
                set_kernel(key)
                p.run(*args, **kwargs)
                p.run(*args, **kwargs)
            set_kernel(kernels[0])
            for versioned, p in inference.items():
                _replay.VERSIONED_CAPTURE = versioned
                with torch.inference_mode():
                    p.run(*args, **kwargs)
                    p.run(*args, **kwargs)
            _replay.VERSIONED_CAPTURE = True
            for r in range(3 + iters):
                for k, fn in variants.items():
                    dt = timed(fn, device)
                    if r >= 3:
                        times[k].append(dt)
            if any(r.captured is None for p in probes.values() for r in p._signatures.values()):
                print(f"{name:10} {str(dtype):8} not captured: {first.mode}")
                return
            # Read before graph_ms: its raw replays add into the rows behind the probes' backs.
            reports = {key: as_rows(p.report()) for key, p in probes.items()}
            inference_rows = {versioned: as_rows(p.report()) for versioned, p in inference.items()}
            gpu = {key: graph_ms(_graph_of(p), iters) for key, p in probes.items()}
            inference_gpu = {versioned: (graph_ms(_graph_of(p), iters), len(_record_of(p).graph_store.numel))
                             for versioned, p in inference.items() if _record_of(p).captured is not None}
        plain_gpu = graph_ms(plain_graph, iters)
        sizes = list(first._signatures[next(iter(first._signatures))].numel)
        numel = sum(sizes)
        bound = {how: read_beside_ms(model, args, kwargs, sizes, dtype, iters, how)
                 for how in ("after", "beside, one launch", "beside, per tensor")}
    eager_rows = as_rows(eager_probe.report())
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    floor = nbytes / bandwidth * 1e3
    dt_name = str(dtype).replace("torch.", "")
    for k, v in med.items():
        print(f"{name:10} {dt_name:8} {k:16} {v:8.2f} ms {v / med['plain eager']:6.2f}x plain eager")
    print(f"{name:10} {dt_name:8} {'mode':16} {first.mode}")
    print(f"{name:10} {dt_name:8} {'mode model()':16} {called_probe.mode}")
    for key, ms in gpu.items():
        extra = ms - plain_gpu
        print(f"{name:10} {dt_name:8} GPU-only: plain graph {plain_gpu:.3f} ms, FInspect graph {ms:.3f} ms "
              f"({ms / plain_gpu:.2f}x); statistics {extra:.3f} ms for {nbytes / 1e9:.3f} GB = "
              f"{extra / floor:.2f}x the read floor {floor:.3f} ms [{kernel_label(key)}]")
    for versioned, (ms, rows) in inference_gpu.items():
        how = "captured under no_grad (shipped)" if versioned else "captured in inference mode (before)"
        print(f"{name:10} {dt_name:8} GPU-only under torch.inference_mode, {how}: FInspect graph {ms:.3f} ms "
              f"({ms / plain_gpu:.2f}x plain graph), {rows} reductions per forward")
    if len(inference_rows) == 2:
        a, b = (per_element(rows) for rows in inference_rows.values())
        print(f"{name:10} {dt_name:8} inference-mode reports equal to each other value for value: {a == b}; "
              f"same calls as the first variant: {[r[:2] for r in a] == [r[:2] for r in per_element(reports[kernels[0]])]}")
    print(f"{name:10} {dt_name:8} bound: the plain forward and a read of the same {nbytes / 1e9:.3f} GB from another "
          f"buffer (torch.amax), GPU-only: " + ", ".join(f"{how} {ms:.3f} ms ({ms / plain_gpu:.2f}x)"
                                                        for how, ms in bound.items()))
    # The probes ran different numbers of batches (the first one also ran the timed rounds), all
    # of the same input, so amax and every count as a fraction of the elements read are compared.
    # Each probe's model is a copy captured on its own: cuDNN and cuBLAS may pick other algorithms
    # for it, whose results differ in the last bits, so exact equality is not expected here
    # (tests/test_cuda_graph.py checks graph against eager on one model value for value).
    fractions = {key: per_element(rows) for key, rows in reports.items()}
    ref = fractions[kernels[0]]
    same = sum(rows == ref for rows in fractions.values())
    amax_diff = max((abs(a - b) / max(abs(b), 1e-30) for rows in fractions.values()
                     for (_, _, *x), (_, _, *y) in zip(rows, ref) for u, v in zip(x, y) for a, b in zip(u[:1], v[:1])),
                    default=0.0)
    calls = [(n, k) for n, k, _, _ in eager_rows[:len(ref)]] == [(n, k) for n, k, _, _ in reports[kernels[0]]]
    print(f"{name:10} {dt_name:8} reports equal to the first variant's value for value: {same} of {len(fractions)}; "
          f"largest relative amax difference {amax_diff:.2g}; same calls as eager: {calls}")


def per_element(rows):
    """``as_rows`` with each RangeStats as (amax, count / numel for every count): equal for two
    probes that measured the same batch a different number of times."""
    def stats(r):
        return (r.amax, r.nonfinite / r.numel, r.nonzero / r.numel, r.flush_to_zero / r.numel,
                r.subnormal / r.numel) if r.numel else (r.amax,)
    return [(n, k, stats(i), stats(o)) for n, k, i, o in rows]


def as_rows(report):
    """(name, kind, inputs, outputs) of every call: what two ways of measuring must agree on."""
    return [(r.name, r.kind, r.inputs, r.outputs) for r in report.calls]


#: Knobs as fp16guard ships them, read once at import (a variant's settings are applied over them).
DEFAULT_KNOBS = {"streams": _replay.STATISTICS_STREAMS, "programs": _triton_stats.SIDE_PROGRAMS_PER_SM,
                 "priority": _replay.PRIORITIZE_MODEL}


def parse_kernel(spec: str) -> tuple:
    """One ``--kernels`` entry, ``REDUCTION:side|inline:GROUP_MiB[:MAX_TENSOR_KiB][:sN][:pN][:prio|noprio]``
    (unset options: as fp16guard ships),
    as (REDUCTION, side stream?, group bytes (0: per tensor), largest grouped tensor's bytes (0: any),
    side streams, programs per SM, model stream prioritized?); None when malformed."""
    parts = spec.split(":")
    if len(parts) < 3 or parts[0] not in ("partials", "atomic") or parts[1] not in ("side", "inline"):
        return None
    numbers = [p for p in parts[2:4] if p.isdigit()]
    options = parts[2 + len(numbers):]
    if not numbers:
        return None
    knobs = dict(DEFAULT_KNOBS)
    for option in options:
        if option in ("prio", "noprio"):
            knobs["priority"] = option == "prio"
        elif option[:1] in ("s", "p") and option[1:].isdigit() and int(option[1:]) > 0:
            knobs["streams" if option[0] == "s" else "programs"] = int(option[1:])
        else:
            return None
    group, below = (int(n) for n in (numbers + ["0"])[:2])
    return (parts[0], parts[1] == "side", group << 20, below << 10, knobs["streams"], knobs["programs"],
            knobs["priority"])


def set_kernel(key):
    """Select how the statistics run (a :func:`parse_kernel` tuple) for the probes captured next."""
    import fp16guard.inspect.triton_stats as T
    from fp16guard.inspect import replay

    T.REDUCTION, replay.OVERLAP_STATISTICS, group, below, streams, programs, priority = key
    replay.GROUP_STATISTICS = bool(group)
    if group:
        T.GROUP_BYTES = group
    T.GROUP_TENSOR_BYTES = below
    replay.STATISTICS_STREAMS = streams
    T.SIDE_PROGRAMS_PER_SM = programs
    replay.PRIORITIZE_MODEL = priority


def kernel_label(key) -> str:
    reduction, overlap, group, below, streams, programs, priority = key
    launch = f"groups of {group >> 20} MiB" if group else "per tensor"
    if group and below:
        launch += f" of tensors up to {below >> 10} KiB"
    where = "inline" if not overlap else f"{streams} side stream{'s' * (streams > 1)} of {programs} programs per SM"
    return f"{reduction}, {where}, {launch}, {'model first' if priority else 'no priorities'}"


def read_beside_ms(model, args, kwargs, sizes: list[int], dtype, iters: int, how: str) -> float:
    """GPU-only milliseconds of one CUDA graph holding the plain forward and a read of
    ``sum(sizes)`` elements of ``dtype`` from a buffer of its own (``torch.amax``, the kernel the
    read floor is measured with): the cost of reading the activations' bytes once more from HBM,
    with no statistics kernel, no hook and no wait for the activations to exist.

    ``how``: ``"after"`` reads on the forward's stream once it ends (no overlap); ``"beside, one
    launch"`` and ``"beside, per tensor"`` read from the forward's start on a side stream of the
    lowest priority, the forward on one of the highest (as ``replay.PRIORITIZE_MODEL`` captures it),
    in one launch or one launch per measured tensor (``sizes``). A statistics scheme that reads each
    activation from HBM after the model wrote it cannot beat the best of these by much: it has the
    same bytes to read and less freedom in when to read them (only reads that hit L2 escape it)."""
    buffer = torch.ones(sum(sizes), dtype=dtype, device="cuda")
    pieces = [buffer] if how != "beside, per tensor" else list(torch.split(buffer, sizes))
    high, low = torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=0)

    def forward_and_read():
        if how == "after":
            model(*args, **kwargs)
            return [torch.amax(p) for p in pieces]
        low.wait_stream(high)
        with torch.cuda.stream(low):
            out = [torch.amax(p) for p in pieces]
        model(*args, **kwargs)
        high.wait_stream(low)
        return out

    high.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(high):  # warm-up outside the capture
            forward_and_read()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=high):
            forward_and_read()
    torch.cuda.current_stream().wait_stream(high)
    ms = graph_ms(graph, iters)
    del graph, buffer, pieces
    return ms


def graph_ms(graph, iters) -> float:
    """Median milliseconds of replaying a captured graph (GPU time: no Python per kernel)."""
    device = torch.device("cuda")
    for _ in range(3):
        graph.replay()
    return statistics.median(timed(graph.replay, device) for _ in range(iters)) * 1e3


def main_graph(args):
    device = torch.device("cuda")
    bandwidth = read_bandwidth(device)
    import triton

    print(f"fp16guard inspect, CUDA graph mode: batch {args.batch}, {torch.cuda.get_device_name(device)}, "
          f"torch {torch.__version__}, triton {triton.__version__}; medians of {args.iters} interleaved rounds")
    print(f"measured read bandwidth: {bandwidth / 1e12:.2f} TB/s (best of torch.amax / torch.sum over 4 GiB)")
    kernels = [parse_kernel(k) for k in args.kernels.split(",")]
    for name in args.models.split(","):
        for dt_name in args.dtypes.split(","):
            bench_graph(name, getattr(torch, dt_name), device, args.batch, args.iters, bandwidth, kernels)
            torch.cuda.empty_cache()


#: FInspect of an earlier fp16guard for side-by-side rows (see --baseline), or None.
BASELINE = None
#: Each variant's fastest round (seconds) of the last :func:`bench`: on a loaded machine the
#: minimum is the steadier number.
MINIMA: dict = {}
MODELS = ("resnet50", "vit_b_16", "bert-base")


def bad_input(message: str) -> None:
    """One line on stderr and exit 2 (bad arguments), before any model is built."""
    print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_args(models: str, dtypes: str, *, cuda: bool, kernels: str = "", batch: int = 1, iters: int = 1,
               warmup: int = 0) -> None:
    """Exit 2 with one line for arguments no run could use: an unknown model or dtype (comma
    lists), a CUDA run where torch sees no GPU, a malformed ``--kernels`` entry, a batch or
    number of timed rounds below 1, a negative warm-up."""
    for flag, value, least in (("--batch", batch, 1), ("--iters", iters, 1), ("--warmup", warmup, 0)):
        if value < least:
            bad_input(f"{flag} {value}: give {least} or more")
    for name in models.split(","):
        if name not in MODELS:
            bad_input(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in dtypes.split(","):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            bad_input(f"unknown floating dtype {name!r}; e.g. float16,float32")
    if cuda and not torch.cuda.is_available():
        bad_input("this needs a CUDA GPU and torch sees none; use --device cpu (not with --graph)")
    for spec in kernels.split(",") if kernels else ():
        if parse_kernel(spec) is None:
            bad_input(f"bad --kernels entry {spec!r}; write REDUCTION:side|inline:GROUP_MiB[:MAX_TENSOR_KiB]"
                      "[:sSTREAMS][:pPROGRAMS_PER_SM][:prio|noprio], e.g. partials:side:0:s2")


def main():
    global BASELINE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--breakdown", action="store_true",
                    help="add variants that split fp16guard's cost: no-op hooks, hooks without "
                         "reductions, Triton's generic launcher, and the plain forward's GPU-only time")
    ap.add_argument("--graph", action="store_true",
                    help="CUDA graph mode instead: plain and FInspect, eager and graph, on --models, with the "
                         "statistics' GPU time against the measured read floor")
    ap.add_argument("--models", default="resnet50,vit_b_16,bert-base")
    ap.add_argument("--kernels", default="partials:side:0,partials:side:0:s1:p4:noprio,partials:side:0:s2,partials:side:0:s4,"
                    "partials:side:0:p2,partials:side:0:p4,partials:side:32:2048",
                    help="--graph: statistics variants REDUCTION:side|inline:GROUP_MiB[:MAX_TENSOR_KiB][:sN][:pN][:prio|noprio] "
                         "(GROUP_MiB 0: one launch per tensor; MAX_TENSOR_KiB: only smaller tensors join groups; "
                         "sN: N side streams in turn; pN: N programs per SM on them; prio|noprio: the model's stream above them or not; "
                         "unset: as shipped), "
                         "the first the default; each is captured and timed")
    ap.add_argument("--baseline", metavar="DIR",
                    help="a folder holding an earlier fp16guard renamed to the package fp16guard_base (e.g. "
                         "`git archive REV fp16guard` with its imports renamed): adds its FInspect as a row")
    args = ap.parse_args()
    check_args(args.models, args.dtypes, cuda=args.graph or args.device.startswith("cuda"),
               kernels=args.kernels if args.graph else "", batch=args.batch, iters=args.iters, warmup=args.warmup)
    if args.baseline:
        sys.path.append(args.baseline)
        from fp16guard_base import FInspect as BASELINE  # noqa: N811
    if args.graph:
        return main_graph(args)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"fp16guard inspect overhead: ResNet-50, batch {args.batch}, {name}, torch {torch.__version__}, "
          f"{args.iters} timed rounds after {args.warmup} warm-up")
    print(f"{'dtype':8} {'variant':15} {'ms/forward':>11} {'x plain':>8} {'min ms':>11} {'x plain':>8}  (median, min)")
    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        source, med, t_report, n_calls, gpu_ms = bench(dtype, device, args.batch, args.iters, args.warmup,
                                                       args.breakdown)
        for k, v in med.items():
            print(f"{dt_name:8} {k:15} {v * 1e3:11.2f} {v / med['plain']:8.2f} {MINIMA[k] * 1e3:11.2f} "
                  f"{MINIMA[k] / MINIMA['plain']:8.2f}")
        if gpu_ms is not None:
            print(f"{dt_name:8} {'plain GPU-only':15} {gpu_ms:11.2f} {gpu_ms / 1e3 / med['plain']:8.2f}"
                  "  (CUDA graph replay: below 1.00, the plain forward is bound by Python, not the GPU)")
        print(f"{dt_name:8} {'report()':15} {t_report * 1e3:11.2f}  (once, for {n_calls} calls; model from {source})")


if __name__ == "__main__":
    main()
