"""The issue-14 development cases through ``fix_model``: naive FP16 against the fixed model.

Runs the small models the tests build (``tests/test_fix.py`` and ``tests/test_torch_pass.py``,
through the helper module ``tests/fix_cases.py``: decomposed LayerNorm, T5 RMSNorm, logits beyond
FP16, an input beyond FP16, a ``finfo.min`` attention mask) and the transformer and audio cases
(``tests/test_transformers.py``, ``tests/test_underflow.py``, through the helper modules
``tests/transformer_cases.py`` and ``tests/models.py``), and prints the relative L2 error against
FP32 of each input (naive FP16, fixed, FP32 fallback) and the number of nodes the fixed model keeps
in FP32, on the strict CPU emulation. The tests assert bounds on these numbers; this prints them. Output for this machine:
``benchmarks/results_fix_patterns_cpu.txt``; the ``.pt2`` cases on an H200's FP16 kernels:
``benchmarks/results_fix_patterns_h200.txt``.

    python benchmarks/fix_patterns.py [--backend torch]
"""

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # its helper modules, not its test modules
warnings.filterwarnings("ignore")

from fix_cases import big_input_model, decomposed_layernorm, masked_attention, normal, rms_norm_net  # noqa: E402
from models import LogMelFrontEnd, pcm  # noqa: E402
from transformer_cases import bert, t5, to_onnx, token_batch  # noqa: E402

from fp16guard.fixing import fix_model  # noqa: E402
from fp16guard.inputs import NamedInput  # noqa: E402


def _errors(rows) -> str:
    return "[" + ", ".join(f"{r.rel_l2:.2g}" for r in rows) + "]"


def _row(name, result, naive=None) -> None:
    naive = naive if naive is not None else result.naive
    fallback = f" fallback {_errors(result.fallback.rows)}" if result.fallback else ""
    fp32 = len(result.conversion.fp32_nodes)
    print(f"{name:32s} naive {_errors(naive.rows):28s} fixed {_errors(result.verification.rows)}{fallback}"
          f" FP32 nodes {fp32}", flush=True)


def transformers_and_audio(tmp: Path, backend: str = "emulate") -> None:
    """The issue-14 real-model cases (``tests/test_transformers.py``, ``tests/test_underflow.py``);
    ``backend`` verifies the ``.pt2`` programs (``torch``: PyTorch's FP16 CUDA kernels)."""
    calib = [token_batch(s) for s in range(4)]
    val = [token_batch(s) for s in range(10, 13)]
    for opset in (14, 17) if backend == "emulate" else ():
        for growth in (2e4, 1e6):
            path = to_onnx(bert(growth), tmp / "bert.onnx", opset)
            _row(f"BERT opset {opset} x{growth:.0e}", fix_model(path, calib, validation=val))
    for ff in ("relu", "gated-gelu") if backend == "emulate" else ():
        path = to_onnx(t5(1e5, ff), tmp / "t5.onnx", 14)
        _row(f"T5 {ff} wo x1e5 onnx", fix_model(path, calib, validation=val))
    for attention in ("eager", "sdpa"):
        for name, model in (("BERT x1e6", bert(1e6)), ("T5 wo x3000", t5(3000))):
            model.model.set_attn_implementation(attention)
            _row(f"{name} {attention} .pt2", fix_model(model, calib, validation=val, backend=backend, force=True))
    for scale, silence in ((32767.0, False), (32767.0, True), (1.0, True)):
        xs = [pcm(s, scale, silence) for s in (0, 1, 2, 5, 6, 7)]
        r = fix_model(LogMelFrontEnd().eval(), xs[:3], validation=xs[3:], backend=backend, force=True)
        _row(f"log-mel x{scale:g}{' silence' if silence else ''} .pt2", r)


def main() -> None:
    """Print one line per case (``--backend torch``: the ``.pt2`` cases on PyTorch's CUDA FP16
    kernels, alone, for a GPU machine)."""
    import argparse

    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--backend", default="emulate", choices=("emulate", "torch"))
    backend = args.parse_args().backend
    print(f"# python benchmarks/fix_patterns.py --backend {backend}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}", flush=True)
    if backend != "emulate":
        with tempfile.TemporaryDirectory() as tmp:
            transformers_and_audio(Path(tmp), backend)
        return
    x = [normal(s, (1, 8, 16)) for s in (1, 2, 3)]
    r = fix_model(decomposed_layernorm(300.0), x[:1], validation=x[1:])
    _row("decomposed LN", r)
    m, xt = rms_norm_net()
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
    xb = [normal(s, (1, 3, 4, 4)) * 1e8 for s in (1, 2)]
    r = fix_model(big_input_model(), xb[:1], validation=xb[1:])
    _row("input 3e8 onnx", r)
    xa = [normal(s, (2, 4, 8)) for s in (1, 2, 3)]
    pad = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int64)
    ins = [NamedInput(f"b{s}", (xa[s - 1], pad)) for s in (1, 2, 3)]
    r = fix_model(masked_attention(), ins[:1], validation=ins[1:])
    _row("mask finfo.min", r)
    r = fix_model(masked_attention(-1e4), ins[:1], validation=ins[1:], force=True)
    print(f"{'mask -1e4 (fits FP16): rounding':32s} naive {_errors(r.naive.rows)}")
    with tempfile.TemporaryDirectory() as tmp:
        transformers_and_audio(Path(tmp))


if __name__ == "__main__":
    main()
