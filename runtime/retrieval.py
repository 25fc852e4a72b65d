"""Retrieval's parts: the query encoder (text -> embeddings) and the passage store (index row -> passage)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class QueryEncoder:
    """Text -> L2-normalized embeddings; pooling and normalization are inside the graph."""

    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer, max_length: int):
        self.session = session
        self.tokenizer = tokenizer
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0)
        self.input_names = {i.name for i in session.get_inputs()}

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        feed = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return self.session.run(["embedding"], feed)[0]


class PassageStore:
    """Passage text on disk (sqlite), so the device never holds the whole corpus in memory."""

    def __init__(self, path: Path):
        # immutable=1: sqlite writes nothing (no journal, no lock files), so checksums stay valid
        self.db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self.extra: dict[int, tuple[str, str, str]] = {}  # passages added in memory, by index row

    def close(self) -> None:
        self.db.close()

    def count(self) -> int:
        """Passages in the bundle's store (added ones aside)."""
        return self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def add(self, rows: Iterable[int], passages: list[tuple[str, str, str]]) -> None:
        self.extra.update({int(r): p for r, p in zip(rows, passages)})

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        """Every (id, title, text), in index row order: the bundle's, then any added."""
        yield from self.db.execute("SELECT id, title, text FROM passages ORDER BY row")
        for row in sorted(self.extra):
            yield self.extra[row]

    def has_ids(self, ids: list[str]) -> set[str]:
        marks = ",".join("?" * len(ids))
        found = {pid for (pid,) in self.db.execute(f"SELECT id FROM passages WHERE id IN ({marks})", ids)}
        wanted = set(ids)
        return found | {pid for pid, _, _ in self.extra.values() if pid in wanted}

    def get(self, rows: Iterable[int]) -> list[tuple[str, str, str]]:
        rows = [int(r) for r in rows]
        found = {r: self.extra[r] for r in rows if r in self.extra}
        stored = [r for r in rows if r not in found]
        if stored:
            marks = ",".join("?" * len(stored))
            for row, pid, title, text in self.db.execute(
                    f"SELECT row, id, title, text FROM passages WHERE row IN ({marks})", stored):
                found[row] = (pid, title, text)
        return [found[r] for r in rows]
