"""Workstation side: models -> ONNX -> quantized -> hnswlib index -> bundle.

This package's top level imports nothing heavy, so the CLI can list the options on a base install.
"""

QUANTIZATIONS = ("none", "int8", "int4", "int8wo", "int8sq")

# Measured on the 2-core development machine (README, "Quantization"): int8 weight-only is half
# the size of fp32, decodes faster, and keeps SmolLM2's greedy answers; int4 (any block size,
# symmetric or not, even on the MLPs alone) changed most answers of SmolLM2-135M.
# The query encoder in int8wo (8-bit embedding tables too) is 3.5x smaller than fp32 with the
# same recall on all 1190 XQuAD questions (the demo student: recall@5 96.6 both, @1 79.9 vs 79.7).
# Re-measure on your device with `edgerag bench`.
DEFAULTS = {"quantize": "int8wo", "quantize_encoder": "int8wo"}
