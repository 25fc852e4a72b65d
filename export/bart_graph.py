"""BART (BartForConditionalGeneration) -> encoder.onnx + decoder.onnx, for the device's greedy loop.

The two graphs are small torch modules that read the Hugging Face model's weights and are traced
with the TorchScript exporter: HF's own forward threads Cache objects and mask helpers through the
trace, while these say exactly what goes in and out.

  encoder.onnx  input_ids, attention_mask [batch, src] (int64)
                -> cross.{i}.key, cross.{i}.value [batch, heads, src, head_dim] for every decoder layer:
                   the cross-attention K/V, computed once per question instead of at every step.
  decoder.onnx  input_ids [batch, tgt], encoder_attention_mask [batch, src] (int64),
                past.{i}.key/value [batch, heads, past, head_dim] (past may be 0), cross.{i}.key/value
                -> logits [batch, vocab] (last position only), present.{i}.key/value [batch, heads, past+tgt, head_dim]

Decoder positions are past + arange(tgt): one graph serves the first step and the cached ones.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

OPSET = 17
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
# finite, so that a row whose keys are all masked gives a uniform softmax rather than NaN
MASKED = torch.finfo(torch.float32).min


def _check(model) -> None:
    config = model.config
    if config.model_type != "bart":
        raise ValueError(f"export_encoder_decoder writes BART graphs, not {config.model_type!r}")
    # pre-LayerNorm variants (mBART-style) put a LayerNorm before each block and one after the stack
    for flag in ("normalize_before", "add_final_layer_norm"):
        if getattr(config, flag, None):
            raise ValueError(f"config.{flag}={getattr(config, flag)!r} (pre-LayerNorm BART) is not supported")
    for stack in (model.model.encoder, model.model.decoder):
        if getattr(stack, "layer_norm", None) is not None:
            raise ValueError("a final LayerNorm after the layer stack (pre-LayerNorm BART) is not supported")
    if config.d_model % config.decoder_attention_heads or config.d_model % config.encoder_attention_heads:
        raise ValueError("d_model must be divisible by the number of attention heads")


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, len, heads*head_dim] -> [batch, heads, len, head_dim]."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attend(q, k, v, bias) -> torch.Tensor:
    """Softmax attention with an additive mask; q is already scaled. -> [batch, len, heads*head_dim]."""
    weights = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
    out = (weights @ v).transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """[batch, src] of 1/0 -> additive [batch, 1, 1, src]."""
    return (1.0 - mask[:, None, None, :].to(torch.float32)) * MASKED


class _Embed(nn.Module):
    """Token embedding * embed_scale + learned position (offset 2) -> layernorm_embedding."""

    def __init__(self, stack, config):
        super().__init__()
        self.tokens, self.positions, self.norm = stack.embed_tokens.weight, stack.embed_positions, stack.layernorm_embedding
        self.offset = getattr(stack.embed_positions, "offset", 2)
        self.scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0

    def forward(self, input_ids, start=0):
        positions = torch.arange(input_ids.shape[1], dtype=torch.int64) + start + self.offset
        x = F.embedding(input_ids, self.tokens) * self.scale + F.embedding(positions, self.positions.weight)[None]
        return self.norm(x)


def _self_attention(layer, x, heads: int, bias, past_key=None, past_value=None):
    """A post-LayerNorm self-attention block -> (x, keys, values), the past (if any) before the new."""
    attn = layer.self_attn
    q, k, v = (_split(proj(x), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    return layer.self_attn_layer_norm(x + attn.out_proj(_attend(q * attn.scaling, k, v, bias))), k, v


def _mlp(layer, x):
    return layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))


class EncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        config, encoder = model.config, model.model.encoder
        self.embed = _Embed(encoder, config)
        self.layers = encoder.layers
        self.cross = nn.ModuleList(layer.encoder_attn for layer in model.model.decoder.layers)
        self.heads, self.cross_heads = config.encoder_attention_heads, config.decoder_attention_heads

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        bias = _padding_bias(attention_mask)
        for layer in self.layers:
            x, _, _ = _self_attention(layer, x, self.heads, bias)
            x = _mlp(layer, x)
        out = []
        for attn in self.cross:
            out += [_split(attn.k_proj(x), self.cross_heads), _split(attn.v_proj(x), self.cross_heads)]
        return tuple(out)


class DecoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        config, decoder = model.config, model.model.decoder
        self.embed = _Embed(decoder, config)
        self.layers = decoder.layers
        self.heads = config.decoder_attention_heads
        self.head_weight, self.head_bias = model.lm_head.weight, model.final_logits_bias

    def forward(self, input_ids, encoder_attention_mask, *caches):
        n = len(self.layers)
        past, cross = caches[:2 * n], caches[2 * n:]
        start, tgt = past[0].shape[2], input_ids.shape[1]
        x = self.embed(input_ids, start)
        # query i (position start+i) sees every past position and the new ones up to itself
        keys = torch.arange(start + tgt, dtype=torch.int64)[None, :]
        queries = torch.arange(tgt, dtype=torch.int64)[:, None] + start
        self_bias = (keys > queries).to(torch.float32)[None, None] * MASKED
        cross_bias = _padding_bias(encoder_attention_mask)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = _self_attention(layer, x, self.heads, self_bias, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            attn = layer.encoder_attn
            q = _split(attn.q_proj(x), self.heads) * attn.scaling
            x = layer.encoder_attn_layer_norm(x + attn.out_proj(_attend(q, cross[2 * i], cross[2 * i + 1], cross_bias)))
            x = _mlp(layer, x)
        # the head reads a transposed copy of the weight (constant-folded): a plain MatMul that the
        # weight-only quantizers see, and an embedding table that only Gather reads
        logits = x[:, -1] @ self.head_weight.t() + self.head_bias[0]
        return (logits, *presents)


def describe(model) -> dict:
    from edgerag.models import generation_setting

    config = model.config
    setting = lambda name: generation_setting(model, name)  # noqa: E731

    return {
        "architecture": "bart", "encoder": ENCODER_FILE, "decoder": DECODER_FILE, "opset": OPSET,
        "num_layers": config.decoder_layers, "encoder_layers": config.encoder_layers,
        "heads": config.decoder_attention_heads, "head_dim": config.d_model // config.decoder_attention_heads,
        "d_model": config.d_model, "vocab_size": model.lm_head.weight.shape[0],
        "max_positions": config.max_position_embeddings,
        "decoder_start_token_id": setting("decoder_start_token_id"),
        # HF generate forces this as the first generated token (bart-large checkpoints set it)
        "forced_bos_token_id": setting("forced_bos_token_id"),
        "eos_token_id": setting("eos_token_id"), "pad_token_id": setting("pad_token_id"),
    }


def export_encoder_decoder(model, folder: Path) -> dict:
    """Write folder/encoder.onnx and folder/decoder.onnx (fp32) for a BartForConditionalGeneration;
    returns their description (layers, heads, head_dim, vocab_size, decoder_start_token_id, ...)."""
    _check(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model.lm_head.weight.dtype != torch.float32:
        raise ValueError(f"export an fp32 model (quantize the graphs afterwards), not {model.lm_head.weight.dtype}")
    info = describe(model)
    n, heads, head_dim = info["num_layers"], info["heads"], info["head_dim"]
    cross = [f"cross.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    past = [f"past.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    kv_axes = lambda length: {0: "batch", 2: length}  # noqa: E731

    # sample sizes all differ and none is 0 or 1, so the tracer specializes no dimension
    batch, src, tgt, past_len = 2, 5, 3, 4
    ids = torch.full((batch, src), 3, dtype=torch.int64)
    mask = torch.ones((batch, src), dtype=torch.int64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(
            EncoderGraph(model).eval(), (ids, mask), str(folder / ENCODER_FILE), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=cross,
            dynamic_axes={"input_ids": {0: "batch", 1: "src"}, "attention_mask": {0: "batch", 1: "src"},
                          **{name: kv_axes("src") for name in cross}})
        caches = ([torch.zeros(batch, heads, past_len, head_dim)] * (2 * n)
                  + [torch.zeros(batch, heads, src, head_dim)] * (2 * n))
        torch.onnx.export(
            DecoderGraph(model).eval(), (ids[:, :tgt], mask, *caches), str(folder / DECODER_FILE), dynamo=False,
            opset_version=OPSET, input_names=["input_ids", "encoder_attention_mask", *past, *cross],
            output_names=["logits", *present],
            dynamic_axes={"input_ids": {0: "batch", 1: "tgt"}, "encoder_attention_mask": {0: "batch", 1: "src"},
                          "logits": {0: "batch"}, **{name: kv_axes("past") for name in past},
                          **{name: kv_axes("src") for name in cross},
                          **{name: kv_axes("past_plus_tgt") for name in present}})
    return info
