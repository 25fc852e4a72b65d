"""SmoothQuant (Xiao et al., 2023) for the `int8sq` quantization of Llama-family generators.

Dynamic int8 MatMuls (activations quantized per tensor at run time, VNNI/AMX int8 GEMMs) prefill
far faster than 8-bit weight-only ones on our development CPU (onnxruntime's MatMulNBits
dequantizes 8-bit weights to fp32 for more than one row) and decode a little faster, but SmolLM2's
activations have a few channels far larger than the rest, so one scale per tensor wiped out the
small ones (max |Δ logit| ~10). SmoothQuant moves that range into the weights: for a projection
y = x W, x' = x / s and W' = s W give the same y, with s_j = max|x_j|^α / max|W_j|^(1-α) per input
channel j from a few calibration prompts. Where x comes out of an RMSNorm (the QKV and gate/up
projections), the division folds into the norm's weight; for the attention output projection it
folds into the V projection (attention averages V rows, so scaling a V channel scales that
channel of the attention output, for every query head that shares the KV head). The graph is
unchanged and exact in fp32. The LM head, after the final norm, is dynamic int8 without smoothing.
The down projection's input has the largest outliers: smoothed into the up projection and made
dynamic int8 it lost 1.1-1.9 F1 points on 1190 XQuAD questions (α 0.5 and 0.8;
docs/results-history.md), so it stays 8-bit weight-only.
"""

from __future__ import annotations

import copy

# the fused Llama graph's node names (export/llama_graph.py) of the projections made dynamic int8
DYNAMIC_INT8_NODES = (".qkv", ".gate_up", ".attention_out")
DEFAULT_ALPHA = 0.8


def is_dynamic_int8(node_name: str) -> bool:
    """Whether int8sq makes this MatMul of the fused graph dynamic int8: the smoothed projections and
    the LM head (named `logits`, or `lm_head.N` once split in vocabulary slices)."""
    return node_name.endswith(DYNAMIC_INT8_NODES) or node_name == "logits" or node_name.startswith("lm_head.")


def calibration_prompts(questions: list, passages: list, n: int, k: int = 3) -> list[tuple[str, list[tuple[str, str]]]]:
    """(question, k passages) RAG-shaped prompts spread over the corpus, deterministic."""
    if not passages:
        return []
    picked = []
    for i in range(n):
        chosen = [passages[(i * 7919 + j * 104729) % len(passages)] for j in range(k)]
        question = questions[(i * 31 + 17) % len(questions)].question if questions else "What is this passage about?"
        picked.append((question, [(p.title, p.text) for p in chosen]))
    return picked


def smooth_llama(model, prompt_ids: list[list[int]], alpha: float = DEFAULT_ALPHA):
    """A copy of `model` with activation ranges moved into the QKV, gate/up and attention output weights."""
    import torch

    model = copy.deepcopy(model)
    layers = model.model.layers
    ranges: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            ranges[name] = torch.maximum(ranges[name], x) if name in ranges else x
        return hook

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.q_proj.register_forward_pre_hook(record(f"{i}.qkv")))
        hooks.append(layer.mlp.gate_proj.register_forward_pre_hook(record(f"{i}.gate_up")))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(record(f"{i}.o")))
    with torch.no_grad():
        for ids in prompt_ids:
            model.model(torch.tensor([ids]))  # the layers' inputs are all it needs: no LM head over every position
    for h in hooks:
        h.remove()

    with torch.no_grad():
        for i, layer in enumerate(layers):
            attention, mlp = layer.self_attn, layer.mlp
            for norm, linears, name in ((layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj), "qkv"),
                                        (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), "gate_up")):
                s = smoothing_scale(ranges[f"{i}.{name}"], torch.cat([lin.weight.abs() for lin in linears], 0).amax(0), alpha)
                norm.weight.div_(s)
                for lin in linears:
                    lin.weight.mul_(s)
            smooth_attention_output(attention, ranges[f"{i}.o"], model.config, alpha)
    return model


def smoothing_scale(x_range, w_range, alpha: float):
    """SmoothQuant's per-channel s = max|x|^α / max|W|^(1-α), kept away from zero."""
    return (x_range.clamp(min=1e-5) ** alpha / w_range.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


def smooth_attention_output(attention, x_range, config, alpha: float) -> None:
    """Moves the attention output's range into o_proj, dividing V's output channels: the output
    channel d of query head h is a mix of V channel d of KV head h // group, so one scale serves
    each (KV head, channel), the largest over its group of query heads."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = x_range.numel() // heads
    group = heads // kv_heads

    def per_kv_channel(values):
        return values.reshape(kv_heads, group, head_dim).amax(1)

    s = smoothing_scale(per_kv_channel(x_range), per_kv_channel(attention.o_proj.weight.abs().amax(0)), alpha)
    attention.v_proj.weight.div_(s.reshape(-1, 1))
    attention.o_proj.weight.mul_(s[:, None, :].expand(kv_heads, group, head_dim).reshape(1, -1))
