"""Seven transformer architectures from ``transformers`` configs (random weights, no hub), each with
one middle linear layer made ``growth`` times larger, fixed through ONNX (opset 14) and through
``torch.export``: the worst relative L2 error against FP32 of naive FP16, the fix and the FP32
fallback, and how many nodes the fix keeps in FP32 (strict CPU emulation). A row is ``OK`` when
the fix is within 1.5x the fallback's error plus 1e-3. Output for this machine:
``benchmarks/results_transformers_sweep_cpu.txt``.

    python benchmarks/transformers_sweep.py [ARCH,ARCH,...]
"""

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")

from transformer_cases import VOCAB, LastHidden, to_onnx, token_batch  # noqa: E402

from fp16guard.fixing import fix_model  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)
ARCHS = {
    "roberta": (tf.RobertaConfig, tf.RobertaModel, SMALL),
    "distilbert": (tf.DistilBertConfig, tf.DistilBertModel, dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                                 max_position_embeddings=64)),
    "gpt2": (tf.GPT2Config, tf.GPT2Model, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                               eos_token_id=0)),
    "albert": (tf.AlbertConfig, tf.AlbertModel, dict(SMALL, embedding_size=32)),
    "electra": (tf.ElectraConfig, tf.ElectraModel, dict(SMALL, embedding_size=32)),
    "mt5": (tf.MT5Config, tf.MT5EncoderModel, dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)),
    "llama": (tf.LlamaConfig, tf.LlamaModel, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=4,
                                                  max_position_embeddings=64)),
}


def build(arch: str, growth: float) -> tuple[torch.nn.Module, str]:
    """The model and the name of the layer made ``growth`` times larger."""
    config, model_class, sizes = ARCHS[arch]
    torch.manual_seed(0)
    model = model_class(config(vocab_size=VOCAB, **sizes)).eval()
    model.set_attn_implementation("eager")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    name, layer = layers[len(layers) // 2 - 1]
    with torch.no_grad():
        layer.weight.mul_(growth)
        if layer.bias is not None:
            layer.bias.mul_(growth)
    return LastHidden(model).eval(), name


def main() -> None:
    """One line per architecture, growth and graph."""
    archs = sys.argv[1].split(",") if len(sys.argv) > 1 else list(ARCHS)
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        print(f"transformers_sweep.py: unknown architecture {unknown[0]!r}; give some of {','.join(ARCHS)}",
              file=sys.stderr)
        sys.exit(2)
    calib, val = [token_batch(s) for s in range(3)], [token_batch(s) for s in range(10, 12)]
    print(f"# python benchmarks/transformers_sweep.py, torch {torch.__version__}, transformers {tf.__version__}, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for growth in (3e4, 3e6):
                for graph in ("onnx", "torch"):
                    model, grown = build(arch, growth)
                    src = to_onnx(model, Path(tmp) / f"{arch}.onnx", 14) if graph == "onnx" else model
                    r = fix_model(src, calib, validation=val, force=True)
                    fixed, fallback, naive = (max(x.rel_l2 for x in v.rows) for v in (r.verification, r.fallback,
                                                                                        r.naive))
                    ok = "OK " if np.isfinite(fixed) and fixed <= 1.5 * fallback + 1e-3 else "BAD"
                    print(f"{ok} {arch:10s} {graph:5s} x{growth:.0e} {grown:55s} naive {naive:.3g} fixed {fixed:.3g} "
                          f"fallback {fallback:.3g} FP32 nodes {len(r.conversion.fp32_nodes)}", flush=True)


if __name__ == "__main__":
    main()
