"""The compressed context on the workstation: piece vectors with the student's passage encoder, the
student's contexts for distillation and evaluation, and the selector's weights fitted on train questions.

The selection itself is `edgerag.runtime.compress`, the code the device runs; piece vectors go through
the bundle's int8 storage here too, so training reads what the device will read.
"""

from __future__ import annotations

import numpy as np

from edgerag.metrics import normalize_answer
from edgerag.runtime.compress import Compression, PieceVectors, Selector, compress_context, split_pieces

# lexical weights tried when the selector is fitted (the dense weight stays 1)
LEXICAL_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


class PieceEmbedder:
    """Piece vectors of passages, embedded once each with a passage encoder (a sentence-transformers
    folder) in the passage format of the index, and rounded through the bundle's int8 storage."""

    def __init__(self, encoder_folder, max_piece_words: int, passage_format: str = "{title}: {text}"):
        from edgerag.models import load_encoder, normalizes, resolve

        self.model, self.tokenizer, self.pooling, self.max_length = load_encoder(encoder_folder)
        folder = resolve(str(encoder_folder)).path
        self.normalize = normalizes(folder)
        self.max_piece_words, self.passage_format = max_piece_words, passage_format
        self.cache: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, passages: list[tuple[str, str]]) -> list[np.ndarray]:
        from .retrieval import embed

        missing = list(dict.fromkeys(p for p in passages if p not in self.cache))
        pieces = [split_pieces(text, self.max_piece_words) for _, text in missing]
        texts = [self.passage_format.format(title=title, text=piece) for (title, _), ps in zip(missing, pieces) for piece in ps]
        if texts:
            flat = embed(self.model, self.tokenizer, texts, self.pooling, self.max_length, normalize=self.normalize)
            stored = PieceVectors.pack([flat])  # the bundle's int8 rounding
            flat = stored.of(0)
        else:
            flat = np.zeros((0, self.model.config.hidden_size), np.float32)
        start = 0
        for passage, ps in zip(missing, pieces):
            self.cache[passage] = flat[start:start + len(ps)]
            start += len(ps)
        return [self.cache[p] for p in passages]


def compressed_contexts(compression: Compression, questions: list[str], query_vectors, contexts, embedder, encode):
    """Each question's compressed context, from its (title, text) passages in rank order."""
    return [compress_context(compression, q, v, passages, embedder(passages), encode)
            for q, v, passages in zip(questions, query_vectors, contexts)]


def answer_share(questions, contexts) -> float:
    """The share (0-100) of questions whose context holds one of their gold answers."""
    hits = [any(normalize_answer(a) in normalize_answer(" ".join(t for _, t in ctx)) for a in q.answers)
            for q, ctx in zip(questions, contexts)]
    return 100.0 * sum(hits) / max(len(hits), 1)


def fit_selector(compression: Compression, questions, query_vectors, contexts, embedder, encode) -> tuple[Selector, dict]:
    """The lexical weight (dense weight 1) under which the selected pieces hold a gold answer for the
    most train questions, at the recipe's budget; ties go to the smaller weight. Returns the selector
    and the share reached by every weight tried."""
    shares = {}
    for weight in LEXICAL_WEIGHTS:
        trial = Compression(compression.passages, compression.budget, Selector(1.0, weight), compression.max_piece_words)
        chosen = compressed_contexts(trial, [q.question for q in questions], query_vectors, contexts, embedder, encode)
        shares[weight] = round(answer_share(questions, chosen), 2)
    best = max(LEXICAL_WEIGHTS, key=lambda w: (shares[w], -w))
    return Selector(1.0, best), {str(w): s for w, s in shares.items()}
