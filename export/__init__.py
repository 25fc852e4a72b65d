"""Workstation side: models -> ONNX -> quantized -> hnswlib index -> bundle.

This package's top level imports nothing heavy, so the CLI can list the export options (derived
from ExportOptions, where every default lives) on a base install.
"""

from __future__ import annotations

from dataclasses import dataclass, field

QUANTIZATIONS = ("none", "int8", "int4", "int8wo", "int8sq", "int8swo")
# the quantizations that smooth the fused Llama graph's activations first (export/smoothquant.py)
SMOOTHED = ("int8sq", "int8swo")
GRAPHS = ("auto", "fused", "optimum")


def _option(default, help: str, choices=None, cli: bool = True):
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


@dataclass
class ExportOptions:
    """How a bundle is made. `edgerag export` has one flag per field (--block-size for block_size, ...).

    Quantization: `auto` (the default) is int8sq where the generator is written as the fused Llama
    graph and int8wo otherwise. Measured on the 2-core development machine (docs/quantization.md),
    on the `make demo` student: int8sq ran end to end in 0.78x the time of int8wo with the F1 of fp32
    (30 XQuAD questions); int8wo is half the size of fp32 and decodes faster. int8swo (int8wo on the
    smoothed graph) kept fp32's F1 on 200 questions and decodes faster than int8sq, but prefills slower. 4-bit weights (any
    block size, symmetric or not, even on the MLPs alone) and plain dynamic int8 changed
    SmolLM2-135M's logits by 8-13. The query encoder in int8wo (8-bit embedding tables too) is 3.5x
    smaller than fp32 with the same recall on all 1190 XQuAD questions (recall@5 96.6 both, @1 79.9
    vs 79.7). Blocks of 64 rather than 32: on the demo student, int8sq's F1 on all 1190 XQuAD questions
    is fp32's (33.72 against 33.71; 33.67 at 32), in a 4% smaller bundle with a 3-6% lower peak RSS;
    decode speed within run-to-run noise (docs/bundle.md, "Memory and start-up"). Re-measure on your device
    with `edgerag bench`.
    """

    quantize: str = _option("auto", "generator quantization (auto: int8sq for the fused Llama graph, int8wo otherwise)",
                            ("auto",) + QUANTIZATIONS)
    quantize_encoder: str = _option("int8wo", "query encoder quantization", tuple(q for q in QUANTIZATIONS if q not in SMOOTHED))
    block_size: int = _option(64, "MatMulNBits block size (embedding tables: the largest power of two "
                                  "up to it that divides their width)")
    accuracy_level: int = _option(4, "MatMulNBits accuracy level (4: int8 compute)")
    k: int = _option(3, "default passages per question")
    max_new_tokens: int = _option(32, "default new tokens per answer")
    repetition_window: int = _option(16, "cut an answer whose last N tokens repeat one block, 3 times or more (0: never)")
    answers: str = _option("spans", "spans: every answer a span of the context the generator read (its most likely "
                           "token that keeps it one); free: the generator's own tokens", ("spans", "free"))
    abstain_cost: float = _option(2.0, "a student that learned to abstain: the most F1 points (of 100) its "
                                  "abstentions may cost the answerable held-in questions when the threshold is fitted")
    abstain_confidence: str = _option("answer", "a student that learned to abstain: what its confidence reads: "
                                      "answer: 1 - P(no answer) times the geometric mean of the answer tokens' "
                                      "probabilities (the answer is held back until settled); no_answer: 1 - P(no answer) "
                                      "alone, decided at the first step", ("answer", "no_answer"))
    max_context: int = _option(2048, "prompt + answer tokens (capped by the generator's own positions)")
    hnsw_m: int = _option(32, "hnswlib M (graph degree)")
    ef_construction: int = _option(200, "hnswlib ef at build time")
    ef: int = _option(64, "hnswlib ef at query time (recorded in the manifest; hnswlib does not save it)")
    graph: str = _option("auto", "generator graph: onnxruntime's fused operators for Llama-family models "
                         "(auto: where the model allows), or Optimum's trace", GRAPHS)
    parity_questions: int = _option(8, "sample questions for the parity check against PyTorch")
    calibration_prompts: int = _option(16, "int8sq, int8swo: RAG prompts for the activation ranges")
    batch_size: int = _option(64, "passages embedded per batch")
    overwrite: bool = _option(False, "replace an existing bundle at --out")


def resolve_quantization(method: str, generator_graph: str) -> str:
    """The method `auto` stands for, given which builder wrote the generator graph."""
    if method != "auto":
        return method
    return "int8sq" if generator_graph == "fused-llama" else "int8wo"
