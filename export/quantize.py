"""Quantization options for the exported graphs.

  none      fp32 as exported.
  int8      onnxruntime's dynamic quantization (int8 weights, activations quantized at run time).
  int4      weight-only MatMulNBits, 4-bit blocks (activations stay fp32; accuracy level 4
            lets ORT compute in int8 where the CPU supports it).
  int8wo    weight-only MatMulNBits with 8-bit blocks.

Which one is fastest depends on the CPU: measure (`edgerag export` records parity, and
`edgerag bench` measures speed). On our 2-core development machine dynamic int8 made a small
decoder slower than fp32.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from export import QUANTIZATIONS
from export.onnx_export import untie_lm_head


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
        model = untie_lm_head(model)
    if method == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save_model(model, str(src))
            # shape inference stops at contrib operators (GroupQueryAttention), so say the tensor type
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            return onnx.load(str(dst)), {"method": "int8", "kind": "dynamic", "per_channel": True}
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = 4 if method == "int4" else 8
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model, {"method": method, "kind": "weight-only MatMulNBits", "bits": bits,
                                   "block_size": block_size, "accuracy_level": accuracy_level}
