"""The issue-14 development cases through ``fix_model``: naive FP16 against the fixed model.

Runs the small models the tests build (``tests/test_fix.py``, ``tests/test_torch_rewrite.py``:
decomposed LayerNorm, T5 RMSNorm, logits beyond FP16, an input beyond FP16, a ``finfo.min``
attention mask) and prints the relative L2 error against FP32 of each input, on the strict CPU
emulation. The tests assert bounds on these numbers; this prints them. Output for this machine:
``benchmarks/results_fix_patterns_cpu.txt``.

    python benchmarks/fix_patterns.py
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")

from test_fix import _big_input_model, _decomposed_layernorm, _masked_attention, _x  # noqa: E402
from test_torch_rewrite import _RMSNorm  # noqa: E402

from fp16guard.fix import fix_model  # noqa: E402
from fp16guard.inputs import NamedInput  # noqa: E402


def _errors(rows) -> str:
    return "[" + ", ".join(f"{r.rel_l2:.2g}" for r in rows) + "]"


def _row(name, result, naive=None) -> None:
    naive = naive if naive is not None else result.naive
    print(f"{name:32s} naive {_errors(naive.rows):28s} fixed {_errors(result.verification.rows)}")


def main() -> None:
    """Print one line per case."""
    x = [_x(s, (1, 8, 16)) for s in (1, 2, 3)]
    r = fix_model(_decomposed_layernorm(300.0), x[:1], validation=x[1:])
    _row("decomposed LN", r)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), _RMSNorm(64), nn.Linear(64, 4)).eval()
    with torch.no_grad():
        m[0].weight.mul_(300)
    xt = [np.random.default_rng(s).normal(size=(1, 8, 16)).astype(np.float32) for s in (1, 2, 3)]
    r = fix_model(m, xt[:1], validation=xt[1:])
    _row("RMSNorm .pt2", r)
    r = fix_model(m, xt[:1], validation=xt[1:], output="onnx")
    _row("RMSNorm onnx", r)
    torch.manual_seed(0)
    c = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        c[2].weight.mul_(3e5)
    xc = [np.random.default_rng(s).normal(size=(2, 8)).astype(np.float32) for s in (1, 2)]
    r = fix_model(c, xc[:1], validation=xc[1:])
    _row("logits .pt2", r)
    r = fix_model(c, xc[:1], validation=xc[1:], output="onnx")
    _row("logits onnx", r)
    xb = [_x(s, (1, 3, 4, 4)) * 1e8 for s in (1, 2)]
    r = fix_model(_big_input_model(), xb[:1], validation=xb[1:])
    _row("input 3e8 onnx", r)
    xa = [_x(s, (2, 4, 8)) for s in (1, 2, 3)]
    pad = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int64)
    ins = [NamedInput(f"b{s}", (xa[s - 1], pad)) for s in (1, 2, 3)]
    r = fix_model(_masked_attention(), ins[:1], validation=ins[1:])
    _row("mask finfo.min", r)
    r = fix_model(_masked_attention(-1e4), ins[:1], validation=ins[1:], force=True)
    print(f"{'mask -1e4 (fits FP16): rounding':32s} naive {_errors(r.naive.rows)}")


if __name__ == "__main__":
    main()
