"""FP16's precision floor of a model, apart from its range: is a pure FP16 fix possible at all?

A power-of-two scale rewrite is exact in real arithmetic, so the best any pure FP16 model can do is
FP16's 11-bit significand with unlimited exponent range. This script measures exactly that: the
FP32 model with every leaf module's output rounded to 11 significant bits (round to nearest even,
``torch.frexp`` / ``torch.ldexp``, no overflow, no subnormals) and compares it with FP32 (relative
L2 of the output), beside the FP32 fallback's error from ``fix_model`` (every value beyond FP16 kept
in FP32, the rest FP16) and the bar of issue 24 (1.5 x fallback + 2^-10). Rounding only module
outputs, not every functional op inside them, underestimates the floor: where even this misses the
bar, no FP16 rewrite meets it: the fallback's accuracy comes from FP32's precision, not its range.
BatchNorms are folded first (``torch.fx.experimental.optimization.fuse``), as ``fix`` folds them;
functional ops (residual adds, the SE product) are not rounded, which lowers the floor further.

It also shows why, for gated models: at each gate module (SE sigmoids, SiLU, hard-swish), the share
of outputs that the trunk's 11-bit rounding moves by more than 0.01 (gate inputs of magnitude 1e4
to 1e6 carry absolute errors far wider than the gate's transition, about |x| < 4).

    python benchmarks/precision_floor.py [ARCH ...]      # needs torchvision

Output: ``benchmarks/results_precision_floor_cpu16.txt`` (the lent machine's 16 CPU cores).
"""

from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import torch
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torchvision_families import _build, _inject, _worst, _wrap  # noqa: E402

SIGNIFICAND_BITS = 11  # IEEE binary16: 10 stored bits + the implicit one


def round_significand(x: torch.Tensor, bits: int = SIGNIFICAND_BITS) -> torch.Tensor:
    """``x`` rounded to ``bits`` significant bits, exponent unbounded (float32 in, float32 out)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return torch.ldexp(torch.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def floor_error(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, list[float]]:
    """Relative L2 error of the output with every leaf module's output rounded to 11 bits, and per
    gate (Sigmoid, SiLU, Hardsigmoid, Hardswish module) the share of its outputs moved by more
    than 0.01 from FP32 (there the trunk's rounding, not the gate's own, decides the gate)."""
    gate_of = {torch.nn.Sigmoid: torch.sigmoid, torch.nn.SiLU: torch.sigmoid,
               torch.nn.Hardsigmoid: torch.nn.functional.hardsigmoid, torch.nn.Hardswish: torch.nn.functional.hardsigmoid}
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    exact: dict[str, torch.Tensor] = {}
    moved: list[float] = []

    def capture(name):
        def hook(module, args, output):
            if type(module) in gate_of:
                exact[name] = gate_of[type(module)](args[0])  # the gate, exact input
        return hook

    def rounding(name):
        def hook(module, args, output):
            if name in exact:
                gate = gate_of[type(module)](args[0])  # the gate, input carrying the trunk's rounding
                moved.append(float(((gate - exact[name]).abs() > 0.01).float().mean()))
            return round_significand(output) if isinstance(output, torch.Tensor) and output.is_floating_point() else None
        return hook

    with torch.no_grad():
        handles = [m.register_forward_hook(capture(n)) for n, m in leaves]
        try:
            ref = model(x)
        finally:
            for h in handles:
                h.remove()
        handles = [m.register_forward_hook(rounding(n)) for n, m in leaves]
        try:
            got = model(x)
        finally:
            for h in handles:
                h.remove()
    rel = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))
    return rel, moved


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    from fp16guard.fixing import fix_model

    archs = sys.argv[1:] or ["regnet_y_400mf", "efficientnet_v2_s", "efficientnet_b0", "mobilenet_v3_large", "resnet50"]
    print("# the 11-bit floor (every module output rounded, unbounded exponent) against the FP32 fallback, "
          "worst over 3 inputs; fix_model route onnx")
    for arch in archs:
        model, images = _build(arch)
        model = _wrap(model)
        _inject(model, images[0])
        folded = fuse(copy.deepcopy(model))  # BatchNorms folded into convolutions, as fix does
        floors, shares = [], []
        for image in images:
            rel, moved = floor_error(folded, image)
            floors.append(rel)
            shares += moved
        r = fix_model(model, [i.numpy() for i in images[:2]], validation=[images[2].numpy()], output="onnx")
        fallback = _worst(r.fallback)
        bar = 1.5 * fallback + 2**-10
        print(f"{arch:22s} 11-bit floor {max(floors):9.3g}  fallback {fallback:9.3g}  bar {bar:9.3g}  "
              f"floor {'MISSES' if max(floors) > bar else 'meets'} the bar  written: {r.delivered} "
              f"({len(r.conversion.fp32_nodes)} FP32 nodes, fallback {len(r.plan.fallback_fp32)}), "
              f"{_worst(r.verification):.3g}; gate outputs moved > 0.01 by the trunk's rounding: "
              f"{(np.mean(shares) if shares else 0):.2%} on average, {max(shares, default=0):.2%} at most "
              f"({len(shares) // len(images)} gates)",
              flush=True)


if __name__ == "__main__":
    main()
