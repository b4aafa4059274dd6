r"""Calibration on a streamed data set: peak memory and wall time on 1,000 and 10,000 inputs.

    python benchmarks/calibrate_stream.py                      # results_calibrate_stream_cpu.txt
    python benchmarks/calibrate_stream.py --counts 1000 10000 --shape 1 3 16 16

A small residual conv net (three conv/BatchNorm blocks, its last block writing about 2e5, beyond
FP16) exported to ONNX is calibrated (``fp16guard.calibrate``) on generated normal inputs of
``--shape``, two ways, each in a fresh process so every peak is its own:

* ``stream``: a generator, read one input at a time (``fp16guard.fixing.streaming``: blocks of 256,
  running max of the ranges);
* ``list``: the same inputs made first, in one list (the data set in memory).

For each it prints the wall time of the ``calibrate`` call, the process's peak resident memory
(``ru_maxrss``: Python, numpy, torch and ONNX Runtime together, the imports included) and, in a
second fresh process, the peak of Python-traced memory during the call (``tracemalloc``: numpy's
arrays included, the import baseline not), and the bytes of the inputs themselves. Then it checks
that the streamed plan of the largest count equals the list's, value for value.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings


def _model(shape):
    """The ONNX model: conv stem, three residual conv/BN/ReLU blocks, the last one's BN weight 2e5."""
    import torch
    import torch.nn as nn

    from fp16guard.torch_onnx import export_onnx

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    net = nn.Sequential(nn.Conv2d(shape[1], 8, 3, padding=1), Block(8), Block(8), Block(8), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        net[3].bn.weight.fill_(2e5)
        net[4].weight.mul_(1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(net, (torch.zeros(shape),))


def _inputs(n, shape):
    """``n`` normal float32 inputs of ``shape``, one at a time (seeded)."""
    import numpy as np

    rng = np.random.default_rng(1)
    for _ in range(n):
        yield rng.normal(size=shape).astype(np.float32)


def _child(way: str, n: int, shape, traced: bool) -> dict:
    """One calibration in this process: ``{"seconds", "rss_mb", "traced_mb", "plan"}``."""
    import tracemalloc

    import fp16guard

    model = _model(shape)
    fp16guard.calibrate(model, _inputs(4, shape))  # warm: imports, the first sessions
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    data = _inputs(n, shape) if way == "stream" else list(_inputs(n, shape))
    plan = fp16guard.calibrate(model, data)
    seconds = time.perf_counter() - t0
    traced_mb = tracemalloc.get_traced_memory()[1] / 2**20 if traced else None
    return {"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "traced_mb": traced_mb, "plan": plan.to_json()}


def _run(way: str, n: int, shape, traced: bool) -> dict:
    """:func:`_child` in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--child", way, str(n), *map(str, shape)]
                          + (["--traced"] if traced else []), capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--shape", type=int, nargs=4, default=[1, 3, 16, 16])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        way, n, *shape = args.child
        warnings.simplefilter("ignore")
        print(json.dumps(_child(way, int(n), tuple(int(s) for s in shape), args.traced)))
        return
    import torch

    shape = tuple(args.shape)
    mb_per_input = 4 * shape[0] * shape[1] * shape[2] * shape[3] / 2**20
    print(f"fp16guard calibrate, streamed vs one list: ONNX residual conv net, inputs float32 {list(shape)}, "
          f"CPU x{os.cpu_count()}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"{'way':6} {'inputs':>7} {'data MB':>8} {'seconds':>8} {'peak RSS MB':>12} {'peak traced MB':>15}")
    plans = {}
    for way in ("stream", "list"):
        for n in args.counts:
            timed = _run(way, n, shape, traced=False)
            traced = _run(way, n, shape, traced=True)
            plans[way, n] = timed["plan"]
            print(f"{way:6} {n:7d} {n * mb_per_input:8.1f} {timed['seconds']:8.1f} {timed['rss_mb']:12.1f} "
                  f"{traced['traced_mb']:15.2f}", flush=True)
    largest = max(args.counts)
    same = plans["stream", largest] == plans["list", largest]
    print(f"streamed plan of {largest} inputs == the plan of the same inputs in one list: {same}")


if __name__ == "__main__":
    main()
