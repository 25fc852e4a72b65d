"""Workstation side: models -> ONNX -> quantized -> hnswlib index -> bundle.

This package's top level imports nothing heavy, so the CLI can list the options on a base install.
"""

QUANTIZATIONS = ("none", "int8", "int4", "int8wo", "int8sq")

# `auto` (the default) is int8sq where the generator is written as the fused Llama graph and
# int8wo otherwise. Measured on the 2-core development machine (README, "Quantization"), on the
# `make demo` student: int8sq ran end to end in 0.78x the time of int8wo with the F1 of fp32 (30
# XQuAD questions); int8wo is half the size of fp32 and decodes faster. 4-bit weights (any block
# size, symmetric or not, even on the MLPs alone) and plain dynamic int8 changed SmolLM2-135M's
# logits by 8-13. The query encoder in int8wo (8-bit embedding tables too) is 3.5x smaller than
# fp32 with the same recall on all 1190 XQuAD questions (recall@5 96.6 both, @1 79.9 vs 79.7).
# Re-measure on your device with `edgerag bench`.
DEFAULTS = {"quantize": "auto", "quantize_encoder": "int8wo"}


def resolve_quantization(method: str, generator_graph: str) -> str:
    """The method `auto` stands for, given which builder wrote the generator graph."""
    if method != "auto":
        return method
    return "int8sq" if generator_graph == "fused-llama" else "int8wo"
