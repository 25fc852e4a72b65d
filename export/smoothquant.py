"""SmoothQuant (Xiao et al., 2023) for the `int8sq` quantization of Llama-family generators.

Dynamic int8 MatMuls (activations quantized per tensor at run time, VNNI int8 GEMMs) prefilled
twice as fast as 8-bit weight-only ones on our development CPU, but SmolLM2's activations have
a few channels far larger than the rest, so one scale per tensor wiped out the small ones
(max |Δ logit| ~10). SmoothQuant moves that range into the weights: for a projection y = x W,
x' = x / s and W' = s W give the same y, with s_j = max|x_j|^α / max|W_j|^(1-α) per input
channel j from a few calibration prompts. Where x comes out of an RMSNorm (the QKV and gate/up
projections), the division folds into the norm's weight, so the graph is unchanged and exact in
fp32. The down projection's input has the largest outliers (its smoothing would fold into the
up projection, but it was not accurate enough) and stays 8-bit weight-only, with the attention
output projection and the LM head.
"""

from __future__ import annotations

import copy

# the fused Llama graph's node names (export/llama_graph.py) of the projections made dynamic int8
DYNAMIC_INT8_NODES = (".qkv", ".gate_up")
DEFAULT_ALPHA = 0.8


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
    """A copy of `model` with activation ranges moved into the QKV and gate/up weights."""
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
    with torch.no_grad():
        for ids in prompt_ids:
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()

    def scale(x_range, linears):
        w_range = torch.cat([lin.weight.abs() for lin in linears], 0).amax(0)
        return (x_range.clamp(min=1e-5) ** alpha / w_range.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)

    with torch.no_grad():
        for i, layer in enumerate(layers):
            attention, mlp = layer.self_attn, layer.mlp
            for norm, linears, name in ((layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj), "qkv"),
                                        (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), "gate_up")):
                s = scale(ranges[f"{i}.{name}"], linears)
                norm.weight.div_(s)
                for lin in linears:
                    lin.weight.mul_(s)
    return model
