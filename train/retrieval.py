"""Query/passage embeddings with a sentence-transformers style encoder, the hnswlib passage index, how
each family writes a passage for its encoder, and a run's retrieval by its teacher.

Embeddings are pooled (mean or CLS, as the encoder folder says) and L2-normalized, and the index uses
inner product, so a score is a cosine similarity: the same convention as the device bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgerag.data import Passage, Question


def pool(hidden, attention_mask, pooling: str):
    import torch

    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed_batch(model, tokenizer, texts, pooling: str, max_length: int, normalize: bool = True):
    """Embeddings of a batch (L2-normalized unless told otherwise), with gradients (for distillation)."""
    import torch.nn.functional as F

    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    pooled = pool(model(**enc).last_hidden_state, enc["attention_mask"], pooling)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def embed(model, tokenizer, texts, pooling: str, max_length: int, batch_size: int = 64, progress: str | None = None,
          normalize: bool = True) -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    texts = list(texts)
    # Sort by length so padding is small; restore the order at the end.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc=progress, disable=progress is None, leave=False):
            idx = order[start:start + batch_size]
            out[idx] = embed_batch(model, tokenizer, [texts[i] for i in idx], pooling, max_length, normalize).float().cpu().numpy()
    model.train(was_training)
    return out


def passage_text(title: str, text: str) -> str:
    """What the passage encoder sees: the title, then the text (as the bundle indexes it)."""
    return f"{title}: {text}" if title else text


# DPR embeds a passage as the pair (title, text): [CLS] title [SEP] text [SEP]. The runtime's
# encoder takes one string, so both sides write the pair that way.
DPR_PASSAGE_FORMAT = "{title} [SEP] {text}"


class PassageIndex:
    """hnswlib inner-product index over normalized passage embeddings, with the passages themselves."""

    def __init__(self, passages, embeddings: np.ndarray, ef: int = 200, M: int = 32):
        import hnswlib

        self.passages = list(passages)
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self.index = hnswlib.Index(space="ip", dim=self.embeddings.shape[1])
        self.index.init_index(max_elements=max(1, len(self.passages)), ef_construction=ef, M=M, random_seed=0)
        if len(self.passages):
            self.index.add_items(self.embeddings, np.arange(len(self.passages)), num_threads=1)
        self.index.set_ef(max(ef, 64))

    def search(self, queries: np.ndarray, k: int) -> list[list[int]]:
        """Row numbers of the top-k passages for each query, best first."""
        k = min(k, len(self.passages))
        labels, _ = self.index.knn_query(np.asarray(queries, dtype=np.float32), k=k, num_threads=1)
        return [list(map(int, row)) for row in labels]

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "hnsw.bin.tmp"
        self.index.save_index(str(tmp))
        tmp.replace(folder / "hnsw.bin")
        save_npy(folder / "embeddings.npy", self.embeddings)


def save_npy(path: Path, array: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(path)


# ---------------------------------------------------------------- a run's retrieval

def load_index(run):
    """(corpus, its PassageIndex) of a run (edgerag.train.run.Run), from the teacher's embeddings."""
    corpus = run.corpus()
    return corpus, PassageIndex(corpus, np.load(run.index_embeddings))


def retrieve_for(run, questions: list[Question], k: int) -> list[list[Passage]]:
    """Top-k corpus passages for each question, by the teacher retriever."""
    from edgerag.models import load_encoder

    corpus, index = load_index(run)
    encoder, tok, pooling, max_length = load_encoder(run.teacher_encoder)
    q_emb = embed(encoder, tok, [q.question for q in questions], pooling, max_length)
    return [[corpus[i] for i in rows] for rows in index.search(q_emb, max(k, 1))]
