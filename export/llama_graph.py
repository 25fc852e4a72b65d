"""A Llama-family generator written straight into ONNX with onnxruntime's fused CPU operators.

Optimum's export traces PyTorch's attention into dozens of small nodes (masks built with Where and
IsNaN, Softmax over [heads, n, n]); on a 600-token RAG prompt they were 40% of the prefill time.
This graph uses onnxruntime's contrib operators instead, the layout onnxruntime-genai's model
builder uses:

- GroupQueryAttention (causal mask, rotary embedding and the KV cache in one kernel) on one packed
  QKV projection;
- SkipSimplifiedLayerNormalization (residual add + RMSNorm);
- packed gate/up projections, SiLU as Sigmoid * x;
- logits for the last position only, through the tied embedding (stored once); `logits_to_keep`,
  an input with a default of 1, asks for more: a decode step that checks drafted tokens needs the
  logits at each of their positions.

Inputs and outputs keep Optimum's names (input_ids, attention_mask, past_key_values.N.key/value ->
logits, present.N.key/value), so the runtime drives both graphs the same way. It needs no
position_ids: GroupQueryAttention takes positions from the attention mask.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgerag.runtime.manifest import LOGITS_TO_KEEP

MS = "com.microsoft"


# the generator graph's output, which the export's graph surgery (onnx_export) and the runtime look up by name
LOGITS = "logits"


class UnsupportedModel(ValueError):
    """The model is outside what this builder writes; the caller falls back to Optimum's export."""


def check_supported(config) -> None:
    """Raise UnsupportedModel unless `config` is a plain Llama decoder this builder reproduces exactly."""
    reasons = []
    if config.model_type != "llama":
        reasons.append(f"model_type {config.model_type!r} is not 'llama'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        reasons.append("projection biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        reasons.append(f"activation {config.hidden_act!r}")
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "linear", "llama3"):
        reasons.append(f"rope scaling {scaling}")  # dynamic scalings change with the length; static ones fold into the cache
    if reasons:
        raise UnsupportedModel("fused Llama graph does not cover: " + ", ".join(reasons))


def build_llama_graph(model, max_positions: int | None = None) -> onnx.ModelProto:
    """ONNX graph for a transformers LlamaForCausalLM (fp32 weights), one graph for prefill and decode."""
    import torch

    config = model.config
    check_supported(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = config.num_hidden_layers
    eps = float(config.rms_norm_eps)
    max_positions = max_positions or config.max_position_embeddings
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0] or f"{op}_{len(nodes)}",
                                      domain=domain, **attrs))
        return outputs

    # GroupQueryAttention takes each sequence's last position (seqlens_k) and the total length
    one = init("const_one", np.array([1], dtype=np.int64))
    node("ReduceSum", ["attention_mask", one], ["mask_sum"], keepdims=0)
    node("Sub", ["mask_sum", one], ["seqlens_k_64"])
    node("Cast", ["seqlens_k_64"], ["seqlens_k"], to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", init("const_one_scalar", np.array(1, dtype=np.int64))], ["total_length_64"], axis=0)
    node("Cast", ["total_length_64"], ["total_sequence_length"], to=TensorProto.INT32)

    # rotary tables: HF's inv_freq already holds any static scaling; attention_scaling is 1 for those
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to(torch.float64).cpu().numpy()
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    cos = init("cos_cache", (np.cos(angles) * scaling).astype(np.float32))
    sin = init("sin_cache", (np.sin(angles) * scaling).astype(np.float32))

    embedding = init("embed_tokens.weight", state["model.embed_tokens.weight"])
    node("Gather", [embedding, "input_ids"], ["embedded"])

    def weight(name: str) -> np.ndarray:
        return state[name].T  # torch Linear stores [out, in]; MatMul wants [in, out]

    residual = "embedded"
    normed = node("SimplifiedLayerNormalization", ["embedded", init("layers.0.input_norm", state["model.layers.0.input_layernorm.weight"])],
                  ["layers.0.normed_in"], epsilon=eps, axis=-1, stash_type=1)[0]
    for i in range(layers):
        p = f"model.layers.{i}."
        qkv = init(f"layers.{i}.qkv.weight", np.concatenate(
            [weight(p + "self_attn.q_proj.weight"), weight(p + "self_attn.k_proj.weight"), weight(p + "self_attn.v_proj.weight")], axis=1))
        node("MatMul", [normed, qkv], [f"layers.{i}.qkv"])
        node("GroupQueryAttention",
             [f"layers.{i}.qkv", "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
              "seqlens_k", "total_sequence_length", cos, sin],
             [f"layers.{i}.attention", f"present.{i}.key", f"present.{i}.value"], domain=MS,
             num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim ** -0.5), do_rotary=1,
             rotary_interleaved=0, local_window_size=-1)
        node("MatMul", [f"layers.{i}.attention", init(f"layers.{i}.o.weight", weight(p + "self_attn.o_proj.weight"))],
             [f"layers.{i}.attention_out"])
        normed, _, _, residual = node(
            "SkipSimplifiedLayerNormalization",
            [residual, f"layers.{i}.attention_out", init(f"layers.{i}.post_norm", state[p + "post_attention_layernorm.weight"])],
            [f"layers.{i}.normed_mlp", "", "", f"layers.{i}.residual_mid"], domain=MS, epsilon=eps)
        gate_up = init(f"layers.{i}.gate_up.weight", np.concatenate(
            [weight(p + "mlp.gate_proj.weight"), weight(p + "mlp.up_proj.weight")], axis=1))
        node("MatMul", [normed, gate_up], [f"layers.{i}.gate_up"])
        node("Split", [f"layers.{i}.gate_up"], [f"layers.{i}.gate", f"layers.{i}.up"], axis=-1, num_outputs=2)
        node("Sigmoid", [f"layers.{i}.gate"], [f"layers.{i}.gate_sigmoid"])
        node("Mul", [f"layers.{i}.gate", f"layers.{i}.gate_sigmoid"], [f"layers.{i}.gate_silu"])
        node("Mul", [f"layers.{i}.gate_silu", f"layers.{i}.up"], [f"layers.{i}.mlp_hidden"])
        node("MatMul", [f"layers.{i}.mlp_hidden", init(f"layers.{i}.down.weight", weight(p + "mlp.down_proj.weight"))],
             [f"layers.{i}.mlp_out"])
        last = i == layers - 1
        norm_weight = state["model.norm.weight"] if last else state[f"model.layers.{i + 1}.input_layernorm.weight"]
        norm_name = "final_norm" if last else f"layers.{i + 1}.input_norm"
        normed, _, _, residual = node(
            "SkipSimplifiedLayerNormalization", [residual, f"layers.{i}.mlp_out", init(norm_name, norm_weight)],
            [f"layers.{i}.normed_out", "", "", f"layers.{i}.residual_out"], domain=MS, epsilon=eps)

    # an initializer that is also a graph input: 1 unless a run feeds it, so every caller that feeds
    # only ids, mask and cache gets the last position's logits as before
    keep = init(LOGITS_TO_KEEP, np.array([1], dtype=np.int64))
    node("Neg", [keep], ["kept_positions_start"])
    node("Slice", [normed, "kept_positions_start", init("kept_positions_end", np.array([2**62], dtype=np.int64)),
                   init("kept_positions_axis", np.array([1], dtype=np.int64))], ["hidden_kept_positions"])
    if "lm_head.weight" in state and not config.tie_word_embeddings:
        head = init("lm_head.weight", weight("lm_head.weight"))
    else:
        # tied: the head reads the embedding through a Transpose that onnxruntime folds into the
        # MatMul (FusedMatMul transB), so the fp32 graph stores the matrix once
        head = node("Transpose", [embedding], ["embed_tokens.weight_transposed"], perm=[1, 0])[0]
    node("MatMul", ["hidden_kept_positions", head], [LOGITS])

    past_shape = ["batch_size", kv_heads, "past_sequence_length", head_dim]
    present_shape = ["batch_size", kv_heads, "total_sequence_length", head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch_size", LOGITS_TO_KEEP, config.vocab_size])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, past_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present_shape))
    graph = helper.make_graph(nodes, "edgerag_llama", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                             producer_name="edgerag")
