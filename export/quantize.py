"""Quantization options for the exported graphs.

  none      fp32 as exported.
  int8      onnxruntime's dynamic quantization (int8 weights, activations quantized at run time).
  int4      weight-only MatMulNBits, 4-bit blocks (activations stay fp32; accuracy level 4
            lets ORT compute in int8 where the CPU supports it).
  int8wo    weight-only MatMulNBits with 8-bit blocks.
  int8sq    SmoothQuant: dynamic int8 for the QKV, attention output and gate/up projections of a
            smoothed fused Llama graph (export/smoothquant.py) and for its LM head, int8wo for the
            down projections.
  int8swo   int8wo on the smoothed graph (smoothing is the caller's: export/bundle.py's
            smoothed_generator_graph): every MatMul 8-bit weight-only. Its activations are
            quantized per block at run time (accuracy level 4), so smoothing their outliers into
            the weights helps there too. Decodes faster than int8sq, prefills slower.

Which one is fastest depends on the CPU: measure (`edgerag export` records parity, and
`edgerag bench` measures speed). On our 2-core development machine dynamic int8 made a small
decoder slower than fp32.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgerag.export import QUANTIZATIONS
from edgerag.export.onnx_export import split_lm_head, untie_lm_head


def quantize(model: onnx.ModelProto, method: str, block_size: int = 32, accuracy_level: int = 4,
             is_generator: bool = True) -> tuple[onnx.ModelProto, dict]:
    """(quantized model, description for the manifest)."""
    logging.disable(logging.INFO)  # onnxruntime's quantizers log every node at INFO
    try:
        return _quantize(model, method, block_size, accuracy_level, is_generator)
    finally:
        logging.disable(logging.NOTSET)


def _quantize(model, method, block_size, accuracy_level, is_generator):
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; choose from {', '.join(QUANTIZATIONS)}")
    if method == "none":
        return model, {"method": "none"}
    if is_generator:
        model = split_lm_head(untie_lm_head(model))
    if method == "int8":
        return _dynamic_int8(model), {"method": "int8", "kind": "dynamic", "per_channel": True}
    description = {}
    if method == "int8sq":
        from edgerag.export.smoothquant import is_dynamic_int8

        nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and is_dynamic_int8(n.name)]
        if not nodes:
            raise ValueError("int8sq needs a fused Llama generator graph (export --graph fused)")
        model = _dynamic_int8(model, nodes)
        description = {"kind": "SmoothQuant dynamic int8 (QKV, attention output, gate/up, LM head) + weight-only MatMulNBits (down)",
                       "dynamic_int8_matmuls": len(nodes)}
    if method == "int8swo":
        description = {"kind": "weight-only MatMulNBits on a SmoothQuant-smoothed graph"}
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = 4 if method == "int4" else 8
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    model = quantizer.model.model
    embeddings = quantize_embeddings(model, block_size)
    return model, {"method": method, "kind": "weight-only MatMulNBits", "bits": bits,  # int8sq, int8swo override kind
                   "block_size": block_size, "accuracy_level": accuracy_level,
                   "embeddings": {"bits": 8, "block_size_by_table": embeddings}, **description}


def _dynamic_int8(model: onnx.ModelProto, nodes: list[str] | None = None) -> onnx.ModelProto:
    """onnxruntime's dynamic int8 (per-channel weights) on `nodes`, or on every MatMul."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _channels_at_once():
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src))
        # shape inference stops at contrib operators (GroupQueryAttention), so say the tensor type
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_quantize=nodes, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(str(dst))


@contextlib.contextmanager
def _channels_at_once():
    """onnxruntime quantizes a weight per channel in a Python loop, about 0.2 ms a channel: 37 s of
    the demo's export went to the 172k channels of its int8sq generator. Within this block the case
    dynamic int8 takes (int8 weights, symmetric, no per-channel overrides) quantizes all of a
    weight's channels at once, with onnxruntime's arithmetic, to the same bytes (tests/test_export_runtime.py);
    any other case goes to onnxruntime's own loop."""
    from onnxruntime.quantization.base_quantizer import BaseQuantizer
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX, find_by_name, tensor_proto_to_array

    loop = BaseQuantizer.quantize_weight_per_channel_impl

    def at_once(self, weight_name, weight_qType, channel_axis, reduce_range=True, keep_float_weight=False):  # noqa: N803
        initializer = find_by_name(weight_name, self.model.initializer())
        overrides = self.tensor_quant_overrides.get_per_channel_overrides(weight_name, default_val=[{"axis": channel_axis}])
        plain = (initializer is not None and weight_qType == onnx.TensorProto.INT8 and not keep_float_weight
                 and len(overrides) == 1 and set(overrides[0]) <= {"axis"} and self.is_weight_symmetric(weight_qType)
                 and not (self.reduce_range and reduce_range) and self.min_real_range is None)
        weights = tensor_proto_to_array(initializer) if plain else None
        if not plain or weights.dtype != np.float32 or not weights.size or not -weights.ndim <= channel_axis < weights.ndim:
            return loop(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
        axis = channel_axis % weights.ndim
        rows = np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)
        # compute_scale_zp: the range widened to hold 0 and made symmetric, scale = range / 254 in
        # float64 stored as float32 (1.0 where it is below float32's smallest normal), zero point 0
        absmax = np.maximum(np.abs(np.minimum(rows.min(1), 0)), np.abs(np.maximum(rows.max(1), 0)))
        scale64 = (absmax.astype(np.float64) - (-absmax).astype(np.float64)) / 254.0
        scale = np.where(scale64 < np.finfo(np.float32).tiny, np.float32(1.0), scale64.astype(np.float32))
        # quantize_nparray: round half to even in float32, clipped to int8's whole range
        quantized = np.clip((rows / scale[:, None]).round(), -128, 127).astype(np.int8)
        moved = (weights.shape[axis],) + tuple(d for i, d in enumerate(weights.shape) if i != axis)
        quantized = np.moveaxis(quantized.reshape(moved), 0, axis)
        q_name, zp_name, scale_name = weight_name + TENSOR_NAME_QUANT_SUFFIX, weight_name + "_zero_point", weight_name + "_scale"
        count = [weights.shape[axis]]
        self.model.initializer_extend([
            helper.make_tensor(scale_name, initializer.data_type, count, scale.tolist()),
            helper.make_tensor(zp_name, weight_qType, count, [0] * count[0]),
            numpy_helper.from_array(quantized.reshape(tuple(initializer.dims)), q_name)])
        return q_name, zp_name, scale_name

    BaseQuantizer.quantize_weight_per_channel_impl = at_once
    try:
        yield
    finally:
        BaseQuantizer.quantize_weight_per_channel_impl = loop


def embedding_block_size(width: int, block_size: int) -> int | None:
    """The largest block GatherBlockQuantized takes (a power of two, 16 or more) that divides a
    table's width and is at most block_size; None if there is none. SmolLM2's 576-wide table
    takes 64 when the matmuls use blocks of 128, instead of staying fp32."""
    block = 1 << (block_size.bit_length() - 1)
    while block >= 16:
        if width % block == 0:
            return block
        block //= 2
    return None


def quantize_embeddings(model: onnx.ModelProto, block_size: int = 32) -> dict[str, int]:
    """Store embedding tables read only by Gather in 8-bit blocks (GatherBlockQuantized).

    A tied SmolLM2 embedding is 113 MB of fp32, half of an int8 bundle, and a lookup reads one row
    per token, so dequantizing on the fly costs nothing measurable. onnxruntime's quantizer
    writes 4-bit tables only; 8 bits keep the input embeddings within int8wo's error.
    Returns the tables replaced, each with its block size (see embedding_block_size).
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    replaced = {}
    for name, init in list(inits.items()):
        users = readers.get(name, [])
        block = embedding_block_size(init.dims[1], block_size) if len(init.dims) == 2 else None
        if (block is None or init.data_type != onnx.TensorProto.FLOAT
                or not users or any(n.op_type != "Gather" or n.input[0] != name for n in users)
                or any(a.name == "axis" and a.i != 0 for n in users for a in n.attribute)):
            continue
        table = numpy_helper.to_array(init)
        rows, dim = table.shape
        blocks = table.reshape(rows, dim // block, block)
        scales = np.abs(blocks).max(-1) / 127.0
        scales[scales == 0] = 1.0
        quantized = (np.clip(np.round(blocks / scales[..., None]), -127, 127) + 128).astype(np.uint8)
        graph.initializer.remove(init)
        graph.initializer.extend([
            numpy_helper.from_array(quantized.reshape(rows, dim), name + "_Q8"),
            numpy_helper.from_array(scales.astype(np.float32), name + "_scales"),
            numpy_helper.from_array(np.full(scales.shape, 128, dtype=np.uint8), name + "_zero_points"),
        ])
        for node in users:
            index = list(graph.node).index(node)
            graph.node.remove(node)
            graph.node.insert(index, helper.make_node(
                "GatherBlockQuantized", [name + "_Q8", node.input[1], name + "_scales", name + "_zero_points"],
                list(node.output), name=node.name + "_Q8", domain="com.microsoft",
                gather_axis=0, quantize_axis=1, block_size=block, bits=8))
        replaced[name] = block
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced
