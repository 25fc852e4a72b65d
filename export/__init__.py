"""Workstation side: models -> ONNX -> quantized -> hnswlib index -> bundle.

This package's top level imports nothing heavy, so the CLI can list the options on a base install.
"""

QUANTIZATIONS = ("none", "int8", "int4", "int8wo")

# Measured on the 2-core development machine (README, "Quantization"): chosen as the smallest
# option that was not slower than fp32 there. Re-measure on your device with `edgerag bench`.
DEFAULTS = {"quantize": "int4", "quantize_encoder": "none"}
