"""Transformer encoders from ``transformers`` configs (random weights, no hub), with the overflow
patterns users report, for ``tests/test_transformers.py`` and ``benchmarks/fix_patterns.py``.

Each case is an FP32 ``torch.nn.Module`` taking ``(input_ids int64 [batch, seq], attention_mask
int64 [batch, seq])`` and returning the last hidden state (float32 [batch, seq, hidden]).
Batches are padded as tokenizers pad: row 1 ends in padding, row 2 is padding only.
"""

import warnings

import numpy as np
import torch

VOCAB = 1000


class LastHidden(torch.nn.Module):
    """``model(input_ids, attention_mask).last_hidden_state`` as a plain function of two tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def token_batch(seed: int, batch: int = 3, seq: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``: random tokens; row 1 padded after 10 tokens, row 2 fully padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[1, 10:] = 0
    mask[2, :] = 0
    return ids, mask


def bert(growth: float) -> torch.nn.Module:
    """A 2-layer BERT whose first attention output projection is ``growth`` times larger: the
    residual sum before that layer's LayerNorm reaches ``~0.1 * growth`` (about 2000 at 2e4:
    ``Pow(x - mean, 2)`` overflows; 1.2e5 at 1e6). The 5.x mask is ``finfo(float32).min``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=64, attn_implementation="eager")
    model = BertModel(cfg).eval()
    with torch.no_grad():
        dense = model.encoder.layer[0].attention.output.dense
        dense.weight *= growth
        dense.bias *= growth
    return LastHidden(model).eval()


def t5(growth: float, feed_forward: str = "relu") -> torch.nn.Module:
    """A 3-layer T5 encoder whose second FFN ``wo`` is ``growth`` times larger, as in
    transformers #5651 (the residual stream passes 65504 from that layer on; ~3 * growth). The
    position bias is masked with ``finfo(float32).min`` and its buckets take ``log(0)``."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=3, num_heads=4,
                   feed_forward_proj=feed_forward)
    model = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        model.encoder.block[1].layer[1].DenseReluDense.wo.weight *= growth
    return LastHidden(model).eval()


def to_onnx(model: torch.nn.Module, path, opset: int) -> str:
    """Export with ``torch.onnx`` (TorchScript exporter: opset < 17 decomposes LayerNorm) and
    dynamic batch and sequence axes; the path as a string."""
    ids, mask = token_batch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          opset_version=opset, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask")})
    return str(path)


class LastHiddenImage(torch.nn.Module):
    """``model(pixel_values).last_hidden_state`` as a plain function of one tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state


def vit(growth: float) -> torch.nn.Module:
    """A 2-layer ViT (32x32 images, 8x8 patches, a class token concatenated to the patches)
    whose first attention output projection is ``growth`` times larger (the residual stream
    reaches ~0.04 * growth: 3.7e5 at 1e7, tied to embeddings of ~1). Input float32 [batch, 3, 32, 32]."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=192, attn_implementation="eager")
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    layer = model.layers[0] if hasattr(model, "layers") else model.encoder.layer[0]
    dense = layer.attention.o_proj if hasattr(layer.attention, "o_proj") else layer.attention.output.dense
    with torch.no_grad():
        dense.weight *= growth
        dense.bias *= growth
    return LastHiddenImage(model).eval()


def image_batch(seed: int) -> np.ndarray:
    """float32 [2, 3, 32, 32], normalized pixels."""
    return np.random.default_rng(seed).normal(size=(2, 3, 32, 32)).astype(np.float32)


def to_onnx_image(model: torch.nn.Module, path, opset: int = 14) -> str:
    """Export an image model (input ``pixel_values``, dynamic batch) with ``torch.onnx``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(image_batch(0)),), str(path), input_names=["pixel_values"],
                          output_names=["last_hidden_state"], opset_version=opset, dynamo=False,
                          dynamic_axes={"pixel_values": {0: "batch"}})
    return str(path)


def decoder_or_encoder(arch: str, growth: float) -> torch.nn.Module:
    """A 2-layer ``gpt2`` (Conv1D: ``addmm``; causal mask), ``llama`` (RMSNorm, rotary embedding,
    gated MLP) or ``distilbert`` (``masked_fill`` mask) from a config, eager attention, whose
    middle linear layer (GPT-2: the first MLP projection, Llama: the first ``down_proj``,
    DistilBERT: the first ``lin2``) is ``growth`` times larger. Same inputs and output as :func:`bert`."""
    import transformers as tf

    torch.manual_seed(0)
    configs = {
        "gpt2": (tf.GPT2Config, tf.GPT2Model, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
        "llama": (tf.LlamaConfig, tf.LlamaModel, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=4,
                                                      max_position_embeddings=64)),
        "distilbert": (tf.DistilBertConfig, tf.DistilBertModel, dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                                     max_position_embeddings=64)),
    }
    config, model_class, sizes = configs[arch]
    model = model_class(config(vocab_size=VOCAB, **sizes)).eval()
    model.set_attn_implementation("eager")
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    with torch.no_grad():
        grown = layers[len(layers) // 2 - 1]
        grown.weight.mul_(growth)
        if grown.bias is not None:
            grown.bias.mul_(growth)
    return LastHidden(model).eval()
