"""A compressed context: the few pieces (sentences) of the retrieved passages that matter for a question.

Shared by training (the student learns on exactly these contexts) and the device (it builds them from
the bundle), so both sides split, score and select the same way.

    pieces = split_pieces(text)                          # sentences; a sentence-less run is cut into windows
    scores = piece_scores(query_vector, piece_vectors, question, pieces, selector)
    chosen = select_pieces(scores, piece_tokens, budget) # best first until the budget; document order kept

Scoring is cheap by construction: the piece vectors are computed at export with the passage encoder,
the query vector is the one retrieval already computed, and the lexical feature counts the question's
content words in the piece. `Selector` weighs the features; its weights are fitted when the student is made
(train/compress.py) and shipped in the manifest with the budget.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

# A sentence ends at . ! ? (and a closing quote or bracket) followed by white space and an
# upper-case letter, a digit or an opening quote/bracket, but not after an initial ("U.S. Army",
# "J. Smith"). Other abbreviations ("Dr. Who") split wrongly: a split too many costs a little
# context, never a dropped word.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))(?<![\s.][A-Z]\.)\s+(?=[\"'(\[]?[A-Z0-9])")

MAX_PIECE_WORDS = 48  # a piece longer than this (a table row, a list, a run-on sentence) is cut into windows


def split_pieces(text: str, max_words: int = MAX_PIECE_WORDS) -> list[str]:
    """The text as consecutive pieces whose concatenation with single spaces is the text with its white
    space runs collapsed: sentences, and windows of `max_words` white-space tokens where a sentence is
    longer. Nothing is dropped; an empty text gives no pieces."""
    pieces = []
    for sentence in _SENTENCE_END.split(text.strip()):
        words = sentence.split()
        for start in range(0, len(words), max_words):
            pieces.append(" ".join(words[start:start + max_words]))
    return pieces


@dataclass(frozen=True)
class Selector:
    """How pieces are scored: a weighted sum of two features, each in about [0, 1].

    dense:    the piece vector's dot product with the query vector (the retrieval encoder's space)
    lexical:  the share of the question's distinct content words that appear in the piece
    """
    dense: float = 1.0
    lexical: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Selector":
        return cls(**{k: float(d[k]) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Compression:
    """The manifest's (and the student's edgerag.json) description of the compressed context."""
    passages: int            # retrieved passages whose pieces compete for the budget
    budget: int              # context tokens for the selected pieces (piece text only, headers aside)
    selector: Selector
    max_piece_words: int = MAX_PIECE_WORDS

    def to_dict(self) -> dict:
        return {"passages": self.passages, "budget": self.budget, "selector": self.selector.to_dict(),
                "max_piece_words": self.max_piece_words}

    @classmethod
    def from_dict(cls, d: dict) -> "Compression":
        return cls(int(d["passages"]), int(d["budget"]), Selector.from_dict(d["selector"]),
                   int(d.get("max_piece_words", MAX_PIECE_WORDS)))


_WORD = re.compile(r"\w+")
# Words that are in almost every piece: matching them says nothing about where an answer is.
STOPWORDS = frozenset("""a an the of in on at to for from by with as and or but is are was were be been being
it its this that these those which who whom whose what when where why how did do does done has have had
not no into than then there their they he she his her him we you your i me my our us also can could
would should will may might so such about after before during over under between through many much
most more one""".split())


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def lexical_overlap(question_words: set[str], piece: str) -> float:
    """The share of the question's distinct content words that the piece holds."""
    if not question_words:
        return 0.0
    return len(question_words & content_words(piece)) / len(question_words)


def piece_scores(query_vector, piece_vectors, question: str, pieces: list[str], selector: Selector) -> np.ndarray:
    """One score per piece; piece_vectors [pieces, dim]."""
    dense = np.asarray(piece_vectors, dtype=np.float32) @ np.asarray(query_vector, dtype=np.float32)
    scores = selector.dense * dense
    if selector.lexical:
        wanted = content_words(question)
        scores = scores + selector.lexical * np.array([lexical_overlap(wanted, piece) for piece in pieces], np.float32)
    return scores


def select_pieces(scores, piece_tokens: list[int], budget: int) -> list[int]:
    """Indices of the pieces to keep, in their original (document) order: best-scoring first while
    they fit in `budget` tokens; the best piece is always kept (the prompt cuts it if it alone is too
    long). Ties go to the earlier piece, so the choice is deterministic."""
    if len(piece_tokens) == 0:
        return []
    order = sorted(range(len(piece_tokens)), key=lambda i: (-float(scores[i]), i))
    chosen, used = [order[0]], piece_tokens[order[0]]
    for i in order[1:]:
        if used + piece_tokens[i] <= budget:
            chosen.append(i)
            used += piece_tokens[i]
    return sorted(chosen)


def compressed_passages(passages, pieces_per_passage: list[list[str]], chosen: list[int]) -> list[tuple[str, str]]:
    """(title, text) pairs for the prompt: each passage that kept a piece, in rank order, with its
    kept pieces in document order joined by a space."""
    kept: dict[int, list[str]] = {}
    flat = [(p, piece) for p, pieces in enumerate(pieces_per_passage) for piece in pieces]
    for i in chosen:
        p, piece = flat[i]
        kept.setdefault(p, []).append(piece)
    return [(passages[p][0], " ".join(kept[p])) for p in sorted(kept)]


def compress_context(compression: Compression, question: str, query_vector, passages, piece_vectors,
                     encode) -> list[tuple[str, str]]:
    """The compressed context of a question, as (title, text) pairs for `build_prompt_ids`.

    passages: (title, text) pairs in rank order; piece_vectors: for each passage, its pieces' vectors
    [pieces, dim] (split_pieces of its text, embedded as the passage encoder embeds passages);
    encode: text -> token ids of the generator (to count each piece against the budget)."""
    per_passage = [split_pieces(text, compression.max_piece_words) for _, text in passages]
    flat = [piece for pieces in per_passage for piece in pieces]
    if not flat:
        return []
    vectors = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1, np.shape(query_vector)[-1])
                              for v in piece_vectors])
    if len(vectors) != len(flat):
        raise ValueError(f"{len(vectors)} piece vectors for {len(flat)} pieces: the vectors were made from other text")
    scores = piece_scores(query_vector, vectors, question, flat, compression.selector)
    chosen = select_pieces(scores, [len(encode(piece)) for piece in flat], compression.budget)
    return compressed_passages(passages, per_passage, chosen)


class PieceVectors:
    """Every passage's piece vectors, stored compactly: int8 with one float32 scale per vector (a
    quarter of float32's bytes; the dot products move by well under a percent), and offsets
    [passages + 1] that say which rows belong to which passage (index row order)."""

    def __init__(self, vectors: np.ndarray, scales: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0) \
                or offsets[-1] != len(vectors) or len(scales) != len(vectors):
            raise ValueError("piece vectors: the offsets, vectors and scales do not fit together")
        self.vectors, self.scales, self.offsets = vectors, scales, offsets

    @classmethod
    def pack(cls, per_passage: list) -> "PieceVectors":
        """From float vectors, one [pieces, dim] array per passage."""
        counts = [len(v) for v in per_passage]
        dim = next((np.shape(v)[-1] for v in per_passage if len(v)), 1)
        flat = np.concatenate([np.asarray(v, np.float32).reshape(-1, dim) for v in per_passage]) if per_passage \
            else np.zeros((0, dim), np.float32)
        scales = np.abs(flat).max(axis=1) / 127.0 if len(flat) else np.zeros(0, np.float32)
        scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
        vectors = np.clip(np.round(flat / scales[:, None]), -127, 127).astype(np.int8)
        return cls(vectors, scales, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def save(self, path) -> None:
        """One raw little-endian file: offsets (int64), scales (float32), vectors (int8, row-major). Its
        counts live in the manifest, so reading it needs no parser and cannot run code."""
        with open(path, "wb") as f:
            for array, dtype in ((self.offsets, "<i8"), (self.scales, "<f4"), (self.vectors, "i1")):
                f.write(np.ascontiguousarray(array, dtype=dtype).tobytes())

    @classmethod
    def load(cls, path, passages: int, pieces: int, dim: int) -> "PieceVectors":
        raw = np.fromfile(path, dtype=np.uint8)
        sizes = (8 * (passages + 1), 4 * pieces, pieces * dim)
        if len(raw) != sum(sizes):
            raise ValueError(f"{len(raw)} bytes, where {passages} passages with {pieces} pieces of {dim} "
                             f"dimensions take {sum(sizes)}")
        offsets = raw[:sizes[0]].view("<i8")
        scales = raw[sizes[0]:sizes[0] + sizes[1]].view("<f4")
        vectors = raw[sizes[0] + sizes[1]:].view(np.int8).reshape(pieces, dim)
        return cls(vectors, scales, offsets.astype(np.int64))

    @property
    def passages(self) -> int:
        return len(self.offsets) - 1

    def of(self, row: int) -> np.ndarray:
        """The float32 piece vectors of the passage at index row `row`."""
        start, end = self.offsets[row], self.offsets[row + 1]
        return self.vectors[start:end].astype(np.float32) * self.scales[start:end, None]

    def all(self) -> list[np.ndarray]:
        return [self.of(row) for row in range(self.passages)]
