"""The compressed context on the workstation: piece vectors with the student's passage encoder, the
student's contexts for distillation and evaluation, and the selector's weights fitted on train questions.

The selection itself is `edgerag.runtime.compress`, the code the device runs; piece vectors go through
the bundle's int8 storage here too, so training reads what the device will read. A run's compressed
student (its encoders, its fitted selector, its distillation examples) is edgerag.train.compressed_student.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgerag.metrics import normalize_answer
from edgerag.runtime.compress import Compression, PieceVectors, Selector, compress_context, split_pieces

# lexical weights tried when the selector is fitted (the dense weight stays 1)
LEXICAL_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


class PieceEmbedder:
    """Piece vectors of passages, embedded once each with a passage encoder (a sentence-transformers
    folder) in the passage format of the index, and rounded through the bundle's int8 storage."""

    def __init__(self, encoder_folder, max_piece_words: int, passage_format: str = "{title}: {text}"):
        from edgerag.model_files import normalizes
        from edgerag.models import load_encoder, resolve

        self.model, self.tokenizer, self.pooling, self.max_length = load_encoder(encoder_folder)
        folder = resolve(str(encoder_folder)).path
        self.normalize = normalizes(folder)
        self.max_piece_words, self.passage_format = max_piece_words, passage_format
        self.cache: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, passages: list[tuple[str, str]]) -> list[np.ndarray]:
        from .retrieval import embed

        for passage in dict.fromkeys(p for p in passages if p not in self.cache):
            # a batch of its own pieces only: a passage's vectors do not depend on which passages, or
            # which earlier stage of the process, came with it (padding shifts float results)
            title, text = passage
            texts = [self.passage_format.format(title=title, text=piece) for piece in split_pieces(text, self.max_piece_words)]
            if texts:
                vectors = embed(self.model, self.tokenizer, texts, self.pooling, self.max_length, normalize=self.normalize)
                self.cache[passage] = PieceVectors.pack([vectors]).of(0)  # the bundle's int8 rounding
            else:
                self.cache[passage] = np.zeros((0, self.model.config.hidden_size), np.float32)
        return [self.cache[p] for p in passages]


# the embedders of this process (shared_piece_embedder): a run's stages read the same passages again
_EMBEDDERS: dict[tuple, PieceEmbedder] = {}
_MAX_EMBEDDERS = 4


def shared_piece_embedder(encoder_folder, max_piece_words: int, passage_format: str = "{title}: {text}") -> PieceEmbedder:
    """A PieceEmbedder kept for the rest of the process, so that the stages of one run (the teacher's
    fine-tuning, its distillation cache, the evaluations) embed each passage's pieces once. Keyed by
    what the folder's files hold: a student that keeps the teacher's passage encoder in a copy of its
    own shares the teacher's vectors, and an encoder trained since (its files written anew) gets a new
    embedder."""
    from edgerag.models import resolve

    folder = Path(resolve(str(encoder_folder)).path).resolve()
    key = (_content_digest(folder), max_piece_words, passage_format)
    if key not in _EMBEDDERS:
        while len(_EMBEDDERS) >= _MAX_EMBEDDERS:
            _EMBEDDERS.pop(next(iter(_EMBEDDERS)))
        _EMBEDDERS[key] = PieceEmbedder(folder, max_piece_words, passage_format)
    return _EMBEDDERS[key]


_DIGESTS: dict[tuple, str] = {}


def _content_digest(folder: Path) -> str:
    """sha256 over a folder's file names and bytes, read once per state of its files (path, size,
    mtime, inode): a stage that asks again costs a stat of each file, not a read of the weights."""
    import hashlib

    files = sorted(f for f in folder.rglob("*") if f.is_file())
    state = (str(folder),) + tuple((str(f.relative_to(folder)), st.st_size, st.st_mtime_ns, st.st_ino)
                                   for f in files for st in [f.stat()])
    if state not in _DIGESTS:
        digest = hashlib.sha256()
        for (name, size, *_), f in zip(state[1:], files):
            digest.update(f"{name}\x00{size}\x00".encode())
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _DIGESTS[state] = digest.hexdigest()
    return _DIGESTS[state]


def compressed_contexts(compression: Compression, questions: list[str], query_vectors, contexts, embedder, encode,
                        progress: str | None = None):
    """Each question's compressed context, from its (title, text) passages in rank order; a bar named
    `progress` where given (a large cache embeds thousands of passages' pieces first)."""
    from tqdm import tqdm

    rows = tqdm(zip(questions, query_vectors, contexts), total=len(questions), desc=progress, unit="question",
                disable=progress is None)
    return [compress_context(compression, q, v, passages, embedder(passages), encode) for q, v, passages in rows]


def answer_share(questions, contexts) -> float:
    """The share (0-100) of questions whose context holds one of their gold answers."""
    hits = [any(normalize_answer(a) in normalize_answer(" ".join(t for _, t in ctx)) for a in q.answers)
            for q, ctx in zip(questions, contexts)]
    return 100.0 * sum(hits) / max(len(hits), 1)


def positive_share(positives, contexts) -> float:
    """The share (0-100) of questions whose compressed context kept their positive piece: (title,
    piece text), or None where a question has none."""
    hits = [p is not None and any(title == p[0] and p[1] in text for title, text in ctx)
            for p, ctx in zip(positives, contexts)]
    return 100.0 * sum(hits) / max(len(hits), 1)


def fit_selector(compression: Compression, questions, query_vectors, contexts, embedder, encode,
                 positives=None) -> tuple[Selector, dict]:
    """The lexical weight (dense weight 1) under which the selected pieces serve the most train
    questions at the recipe's budget: hold a gold answer, or, given `positives` (one (title, piece)
    per question, see teacher_positives), keep that piece. Ties go to the smaller weight. Returns the
    selector and the share reached by every weight tried."""
    shares = {}
    for weight in LEXICAL_WEIGHTS:
        trial = Compression(compression.passages, compression.budget, Selector(1.0, weight), compression.max_piece_words)
        chosen = compressed_contexts(trial, [q.question for q in questions], query_vectors, contexts, embedder, encode)
        share = answer_share(questions, chosen) if positives is None else positive_share(positives, chosen)
        shares[weight] = round(share, 2)
    best = max(LEXICAL_WEIGHTS, key=lambda w: (shares[w], -w))
    return Selector(1.0, best), {str(w): s for w, s in shares.items()}


def answer_logprobs(model, prompter, items, batch_size: int = 16, progress: str | None = None) -> list[float]:
    """The mean log-probability of each answer's tokens after its prompt: items are (question,
    [(title, text)], answer); batched with left padding (target_logits), so a row's score is its own."""
    import torch
    from tqdm import tqdm

    from .teacher import Example, target_logits

    pad = prompter.tokenizer.pad_token_id if prompter.tokenizer.pad_token_id is not None else prompter.stop_ids[0]
    scores = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(items), batch_size), desc=progress, unit="batch", disable=progress is None):
            examples = [Example("", prompter.prompt(q, passages), prompter.target(a))
                        for q, passages, a in items[start:start + batch_size]]
            logits, labels, _ = target_logits(model, examples, pad)
            taken = labels != -100
            logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            scores += ((logp * taken).sum(-1) / taken.sum(-1)).tolist()
    return scores


def teacher_positives(teacher, prompter, questions, contexts, max_piece_words: int, batch_size: int = 16):
    """RECOMP's positives: for each question, the piece of its passages after which the teacher finds
    its gold answer most likely (mean log-probability of the answer's tokens, the teacher reading
    that piece alone under its passage's title), as (title, piece). None where there is no piece."""
    jobs = [(i, title, piece) for i, passages in enumerate(contexts)
            for title, text in passages for piece in split_pieces(text, max_piece_words)]
    scores = answer_logprobs(teacher, prompter, [(questions[i].question, [(title, piece)], questions[i].answers[0])
                                                 for i, title, piece in jobs], batch_size, progress="teacher positives")
    best: list = [None] * len(contexts)
    top = [float("-inf")] * len(contexts)
    for (i, title, piece), score in zip(jobs, scores):
        if score > top[i]:
            best[i], top[i] = (title, piece), score
    return best
