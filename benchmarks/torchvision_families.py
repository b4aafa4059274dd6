"""torchvision's model families with one injected overflow, through ``fix`` (issue 24).

Each architecture is built with random weights (``weights=None``; no hub), in eval mode, and gets
one overflow the way users meet it: the weight of its first convolution is multiplied by a gain
that brings the first activations to about 1e6 (16x beyond FP16; the BatchNorm after it, fresh
running statistics, passes them on). ``fix_model`` then rewrites it (``.onnx`` and ``.pt2``
routes) on two calibration images and verifies it on a third, on the strict CPU emulation. Each
row prints the worst relative L2 error over the three inputs of the naive FP16 conversion, the
written model and the FP32 fallback, the FP32 node counts of the written model and of the fallback,
what was written (``fixed``: pure FP16 scaling; ``islands``: the fewest FP32 islands that meet the
bar; ``fallback``: the FP32 fallback), and the bar (1.5 x the fallback + 2^-10) met or not.

Needs torchvision (on this project's machines it imports only beside torch 2.14.1; the lent GPU
machine has it). Runs one architecture per process, ``--jobs`` at a time::

    python benchmarks/torchvision_families.py [--jobs 16] [--routes onnx,torch] [ARCH ...]

Outputs: ``benchmarks/results_torchvision_families_cpu16_before.txt`` (all 26, the lent machine's
16 CPU cores, before the saturation law) and ``benchmarks/results_torchvision_families_cpu2_after.txt``
(the families issue 24 named, this machine's 2 cores, torch 2.14.1 + torchvision 0.29.1).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time
import traceback
import warnings

#: The families of issue 24 (SE gates, hard-swish, SiLU, windowed attention, EfficientNetV2's
#: scaled constants, LR-ASPP) and the ones that were already fixed, for regressions.
ARCHS = ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf",
         "mnasnet0_5", "swin_t", "maxvit_t", "resnet18", "resnet50", "mobilenet_v2", "densenet121", "vgg11_bn",
         "shufflenet_v2_x0_5", "squeezenet1_0", "convnext_tiny", "vit_b_16", "googlenet", "regnet_x_400mf",
         "wide_resnet50_2", "resnext50_32x4d", "alexnet", "inception_v3", "efficientnet_b1", "mnasnet1_0",
         "lraspp_mobilenet_v3_large"]

TARGET_AMAX = 1e6


def _build(arch: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    if arch.startswith("lraspp"):
        model = torchvision.models.segmentation.__dict__[arch](weights=None, weights_backbone=None, num_classes=21)
    elif arch == "inception_v3":
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    else:
        model = torchvision.models.__dict__[arch](weights=None)
    model.eval()
    size = 299 if arch == "inception_v3" else 224
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(1, 3, size, size, generator=g) * 2 - 1 for _ in range(3)]
    return model, images


def _inject(model, x) -> float:
    """Multiply the first convolution's weight so its output reaches about TARGET_AMAX; returns the gain."""
    import torch

    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = {}

    def record(module, args, output):
        seen.setdefault("amax", float(output.abs().max()))  # returns None: the output stays as it is

    handle = conv.register_forward_hook(record)
    with torch.no_grad():
        model(x)
    handle.remove()
    gain = TARGET_AMAX / max(seen["amax"], 1e-6)
    with torch.no_grad():
        conv.weight.mul_(gain)
    return gain


def _wrap(model):
    """The model returning tensors (LR-ASPP returns a dict; fp16guard's routes want tensors)."""
    import torch

    class Out(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            return y["out"] if isinstance(y, dict) else y

    return Out(model).eval()


def _worst(v) -> float:
    if v is None:
        return math.nan
    return max((r.rel_l2 if not r.nonfinite else math.inf for r in v.rows), default=math.nan)


def run_one(job: tuple[str, str]) -> str:
    """One architecture through one route: its row, or the error it stopped with."""
    arch, route = job
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from fp16guard.compare import misses_bar
    from fp16guard.fixing import fix_model

    t0 = time.perf_counter()
    try:
        model, images = _build(arch)
        model = _wrap(model)
        gain = _inject(model, images[0])
        x = [i.numpy() for i in images]
        r = fix_model(model, x[:2], validation=x[2:], output=route)
        ref = r.fallback
        met = misses_bar(r.verification, ref, None) is None
        return (f"{arch:28s} {route:5s} gain {gain:8.3g}  naive {_worst(r.naive):9.3g}  written {_worst(r.verification):9.3g}"
                f"  fallback {_worst(ref):9.3g}  fp32 nodes {len(r.conversion.fp32_nodes):3d} (fallback "
                f"{len(r.plan.fallback_fp32):3d})  {r.delivered:8s} bar {'met' if met else 'MISSED'}  "
                f"{time.perf_counter() - t0:6.1f} s")
    except Exception as e:  # noqa: BLE001 - a row per failure
        last = traceback.extract_tb(e.__traceback__)[-1]
        return (f"{arch:28s} {route:5s} {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''} "
                f"[{last.filename.rsplit('/', 1)[-1]}:{last.lineno}]  {time.perf_counter() - t0:6.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archs", nargs="*", default=ARCHS)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--routes", default="onnx,torch")
    args = p.parse_args()
    jobs = [(a, r) for a in args.archs for r in args.routes.split(",")]
    print(f"# {len(jobs)} runs, {args.jobs} at a time; worst relative L2 over 3 inputs (2 calibration, 1 validation)")
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        for line in pool.imap(run_one, jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
