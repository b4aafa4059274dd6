"""The development cases of issue 24 ("fix always delivers") through ``fix_model``, both routes.

Each case is a small model the tests build (``tests/test_saturation.py``,
``tests/test_scaled_constants.py``, ``tests/test_control_flow.py`` and ``tests/test_delivery.py``,
through the helper module ``tests/fix_cases.py``), one per pattern: SE / hard-swish / SiLU / GELU
regions beyond FP16, a clamp bound before a log inside a scaled region, a weight that would be
scaled beyond 65504, an FP32 exp island, int16 PCM and power-mel inputs, a model at its own FP16 floor, a residual
offset that scaling cannot keep, ``If``/``Loop`` models and the TorchScript ``squeeze`` ``If``.
Every row gives, per route, the worst relative L2 error over the case's inputs of the naive FP16
conversion, the written model and the FP32 fallback, the FP32 node counts of the written model and
of the fallback, what was written (``fixed``: pure FP16 with the plan's own islands; ``islands``:
the fewest islands that meet the bar; ``fallback``), and whether the bar (1.5 x fallback + 2^-10
on each input) is met. Strict CPU emulation.

    python benchmarks/fix_always_delivers.py

Output for this machine: ``benchmarks/results_fix_always_delivers_cpu.txt``.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # its helper modules, not its test modules
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

from fp16guard.compare import misses_bar  # noqa: E402
from fp16guard.fixing import fix_model  # noqa: E402


def _worst(v) -> float:
    if v is None:
        return math.nan
    return max((r.rel_l2 if not r.nonfinite else math.inf for r in v.rows), default=math.nan)


def cases():
    """``(name, model, calibration, validation, routes)`` for every development case."""
    import fix_cases as c
    from models import pcm

    x = c.gate_inputs(4)
    yield "SE/hard-swish/SiLU/GELU gates, pre-activations ~1e6", c.GatedNet().eval(), x[:2], x[2:], ("onnx", "torch")
    for add in (False, True):
        yield (f"{'x + 1e-7' if add else 'clamp(min=1.19e-7)'} -> log in a 2^-7 region", c.ClampLog(add).eval(),
               [c.positive(i) for i in range(2)], [c.positive(i) for i in (5, 6)], ("onnx", "torch"))
    for gain in (2000.0, 2e4):
        yield (f"weight {gain:g} closing a region (EfficientNetV2 kind)", c.BigWeight(gain).eval(),
               [c.small_image(i) for i in range(2)], [c.small_image(i) for i in (5, 6)], ("onnx", "torch"))
    for log in (False, True):
        xs = [np.random.default_rng(s).normal(size=(2, 16)).astype(np.float32) for s in range(4)]
        yield f"exp island ~1e11 then {'log' if log else 'sum-normalize'}", c.ExpIsland(log).eval(), xs[:2], xs[2:], \
            ("onnx", "torch")
    yield ("int16-scale PCM -> conv + LayerNorm", c.SpeechEncoder().eval(), [pcm(i, 32767.0) for i in range(2)],
           [pcm(i, 32767.0) for i in (5, 6)], ("onnx", "torch"))
    yield ("power mel to 1e9, quiet frames 0.1", c.MelEncoder().eval(), [c.power_mel(i) for i in range(2)],
           [c.power_mel(i) for i in (5, 6)], ("onnx", "torch"))
    xs = c.vector_inputs()
    yield "peaked 384-bin softmax (FP16 floor 0.19)", c.PeakedSoftmax(), xs[:2], xs[2:], ("onnx", "torch")
    yield "1e6 residual offset read by LayerNorm", c.OffsetResidual(), xs[:2], xs[2:], ("onnx", "torch")
    for name, (make, inputs, _) in c.CONTROL_FLOW.items():
        xs = inputs()
        yield f"ONNX control flow: {name}", make(), xs[:2], xs[2:], ("onnx",)


def main() -> None:
    print(f"{'case':56s} {'route':5s} {'naive':>9s} {'written':>9s} {'fallback':>9s} {'fp32':>4s} {'fb':>4s} "
          f"{'written as':10s} bar")
    for name, model, calibration, validation, routes in cases():
        for route in routes:
            t0 = time.perf_counter()
            try:
                r = fix_model(model, calibration, validation=validation, output=route)
            except Exception as e:  # noqa: BLE001 - one row per failure
                print(f"{name:56s} {route:5s} {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            met = misses_bar(r.verification, r.fallback, None) is None
            print(f"{name:56s} {route:5s} {_worst(r.naive):9.3g} {_worst(r.verification):9.3g} "
                  f"{_worst(r.fallback):9.3g} {len(r.conversion.fp32_nodes):4d} {len(r.plan.fallback_fp32):4d} "
                  f"{r.delivered:10s} {'met' if met else 'MISSED'}  ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
