"""Make a student from the teacher's own weights: fewer layers, a narrower MLP, fewer attention heads.

- Depth: keep a list of layers, or `auto:N`, which drops the contiguous block whose input and output
  hidden states are closest in angle (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the
  Deeper Layers"): the block that changes the representation least is the cheapest to remove.
- MLP width: keep the neurons with the largest mean |activation| on calibration text (Minitron-style
  activation importance), per layer.
- Attention: keep the key/value head groups whose attention outputs have the largest mean norm.
- Query encoder: keep a subset of layers (evenly spaced by default), as sentence-transformers'
  distillation example does.

All surgery is on Hugging Face modules in place, with the config updated, so `save_pretrained` gives
a folder that `from_pretrained` loads with no code of ours.
"""

from __future__ import annotations

import math


def count_params(model) -> int:
    """Parameters, each counted once (tied input/output embeddings are one matrix)."""
    return sum(p.numel() for p in model.parameters())


def _decoder_layers(model):
    return model.model.layers


def _calibrate(model, batches, hooks):
    import torch

    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()


def calibration_batches(sequences: list[list[int]], pad_id: int, batch_size: int = 1):
    """Batches of (ids, mask). One sequence a batch by default: the importance hooks then see no padding,
    whose activations would otherwise skew the statistics (and a few calibration passages are cheap)."""
    from .teacher import right_pad

    return [right_pad(sequences[start:start + batch_size], pad_id) for start in range(0, len(sequences), batch_size)]


def block_distances(model, batches, n: int) -> list[float]:
    """Mean angular distance (arccos of cosine, / pi) between the input of layer l and the output of
    layer l+n-1, over all real tokens, for every l with l+n < depth (the last layer is always kept)."""
    import torch
    import torch.nn.functional as F

    depth = len(_decoder_layers(model))
    sums = torch.zeros(depth + 1)
    count = 0
    with torch.no_grad():
        for ids, mask in batches:
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            keep = mask.bool()
            for l in range(depth - n):
                cos = F.cosine_similarity(hs[l][keep], hs[l + n][keep], dim=-1).clamp(-1, 1)
                sums[l] += (torch.arccos(cos) / math.pi).sum()
            count += int(keep.sum())
    return [float(sums[l] / count) for l in range(depth - n)]


def drop_layers(model, keep: list[int]) -> None:
    import torch.nn as nn

    layers = _decoder_layers(model)
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new  # the KV cache is indexed by it
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)


def choose_layers(model, spec, batches) -> tuple[list[int], dict]:
    """Resolve 'auto:N' on calibration data; returns (kept layers, info for the report)."""
    depth = len(_decoder_layers(model))
    if spec == "all":
        return list(range(depth)), {}
    if not (isinstance(spec, str) and spec.startswith("auto:")):
        return list(spec), {}
    n_keep = int(spec[5:])
    n_drop = depth - n_keep
    if n_drop == 0:
        return list(range(depth)), {}
    distances = block_distances(model, batches, n_drop)
    start = min(range(len(distances)), key=distances.__getitem__)
    keep = [i for i in range(depth) if not start <= i < start + n_drop]
    return keep, {"dropped_block": [start, start + n_drop - 1], "angular_distances": distances}


def _slice_linear(linear, rows=None, cols=None):
    import torch.nn as nn

    w = linear.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[rows] if rows is not None else linear.bias.data)
    return new


def mlp_importance(model, batches) -> list:
    """Mean |activation| of every MLP neuron (the input of down_proj), per layer."""
    import torch

    layers = _decoder_layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    counts = [0] * len(layers)

    def hook_for(i):
        def hook(module, inputs, output):
            x = inputs[0].detach().float()
            sums[i].add_(x.abs().reshape(-1, x.shape[-1]).sum(0).cpu())
            counts[i] += x.shape[0] * x.shape[1]
        return hook

    _calibrate(model, batches, [(layer.mlp.down_proj, hook_for(i)) for i, layer in enumerate(layers)])
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def prune_mlp(model, width: int, batches) -> None:
    import torch

    importance = mlp_importance(model, batches)
    for layer, score in zip(_decoder_layers(model), importance):
        keep = torch.sort(torch.topk(score, width).indices).values
        mlp = layer.mlp
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=keep)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=keep)
        mlp.down_proj = _slice_linear(mlp.down_proj, cols=keep)
    model.config.intermediate_size = width


def prune_kv_heads(model, n_groups: int, batches) -> None:
    """Keep `n_groups` key/value heads (each with its query heads), by the mean norm of their output."""
    import torch

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    layers = _decoder_layers(model)
    scores = [torch.zeros(cfg.num_key_value_heads) for _ in layers]

    def hook_for(i):
        def hook(module, inputs, output):
            x = inputs[0].detach().float()
            per_head = x.reshape(*x.shape[:-1], cfg.num_attention_heads, head_dim).norm(dim=-1)
            per_group = per_head.reshape(*per_head.shape[:-1], cfg.num_key_value_heads, q_per_kv).sum(-1)
            scores[i].add_(per_group.reshape(-1, cfg.num_key_value_heads).mean(0).cpu())
        return hook

    _calibrate(model, batches, [(layer.self_attn.o_proj, hook_for(i)) for i, layer in enumerate(layers)])
    for layer, score in zip(layers, scores):
        groups = torch.sort(torch.topk(score, n_groups).indices).values
        kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups.tolist()])
        q_heads = [g * q_per_kv + j for g in groups.tolist() for j in range(q_per_kv)]
        q_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in q_heads])
        attn = layer.self_attn
        attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)
        for name in ("num_heads", "num_key_value_heads"):
            if hasattr(attn, name):
                setattr(attn, name, len(q_heads) if name == "num_heads" else n_groups)
    cfg.head_dim = head_dim
    cfg.num_attention_heads = n_groups * q_per_kv
    cfg.num_key_value_heads = n_groups


def shrink_generator(model, layers, intermediate_size: int, kv_heads: int, batches) -> dict:
    """Apply the recipe's surgery to a copy of the teacher, in place; returns what was done."""
    info = {"teacher_params": count_params(model)}
    keep, extra = choose_layers(model, layers, batches)
    info.update(extra)
    # Width importance is measured on the teacher's full depth, then layers are dropped.
    if kv_heads and kv_heads < model.config.num_key_value_heads:
        prune_kv_heads(model, kv_heads, batches)
    if intermediate_size and intermediate_size < model.config.intermediate_size:
        prune_mlp(model, intermediate_size, batches)
    if len(keep) < len(_decoder_layers(model)):
        drop_layers(model, keep)
    info.update({"layers": keep, "intermediate_size": model.config.intermediate_size,
                 "kv_heads": model.config.num_key_value_heads, "params": count_params(model)})
    return info


def shrink_encoder(model, keep: list[int]) -> dict:
    """Keep the listed layers of a BERT-style encoder."""
    import torch.nn as nn

    encoder_layers = model.encoder.layer
    before = count_params(model)
    model.encoder.layer = nn.ModuleList([encoder_layers[i] for i in keep])
    for new, layer in enumerate(model.encoder.layer):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    return {"teacher_params": before, "layers": list(keep), "params": count_params(model)}


def train_top_layers(model, n: int) -> None:
    """Freeze all but the top `n` decoder layers and the final norm (n = 0: train everything).

    Backpropagation then stops n layers down, and the (tied) embeddings get no optimizer state:
    on a CPU the cheapest way to buy steps."""
    if not n:
        return
    model.requires_grad_(False)
    for layer in _decoder_layers(model)[-n:]:
        layer.requires_grad_(True)
    model.model.norm.requires_grad_(True)
