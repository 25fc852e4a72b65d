"""A shipped bundle's corpus, changed on the device: add, remove and sync documents.

    add_documents(bundle, ["notes/", "manual.pdf"])      # edgerag add BUNDLE PATH...
    remove_documents(bundle, ["manual.pdf"])             # edgerag remove BUNDLE SOURCE...
    sync_documents(bundle, "notes/")                     # edgerag sync BUNDLE DIR

Documents are read and cut into passages by runtime.documents, embedded with the bundle's passage
encoder (its query encoder where it ships none), and written into the index, the passage store
and the compressed context's piece vectors.

Never half-written: a change writes new versions of those three files under new names, then
replaces manifest.json (write, then rename) so that it lists them, then deletes the old ones. A
change killed before the rename leaves the bundle as it was, after it as it should be; the next
change deletes what the killed one left behind. One change runs at a time (a lock file), and a
reader that opened the manifest before the rename loads the old files or, if they are gone by
then, loads again (Pipeline.load).

The index marks removed passages deleted and reuses their slots for new ones (hnswlib's
allow_replace_deleted); once deleted slots pass `compact_share` of the index, it is rebuilt without
them. Index labels are passage store rows; new passages take labels above every label used so far.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import hnswlib
import numpy as np
from tokenizers import Tokenizer

from edgerag.runtime.compress import PieceVectors, split_pieces
from edgerag.runtime.documents import (MAX_FILE_BYTES, Document, DocumentPassage, Skipped, cut_passages,
                                       read_documents)
from edgerag.runtime.manifest import BundleError, Manifest, QueryEncoderSpec, file_record, read_manifest, verify
from edgerag.runtime.retrieval import QueryEncoder
from edgerag.runtime.session import make_session

LOCK_FILE = ".edgerag-corpus.lock"
COMPACT_SHARE = 0.25
# the names a change gives the corpus files it writes; anything else in the bundle is left alone
_CORPUS_FILE = re.compile(r"^(index|passages|pieces)(\.v\d+)?\.(hnsw|sqlite|bin)$")
_WORK_PREFIX = ".corpus-change-"

STORE_SCHEMA = """
CREATE TABLE passages (row INTEGER PRIMARY KEY, id TEXT NOT NULL, title TEXT, text TEXT NOT NULL,
                       source TEXT, start_char INTEGER, end_char INTEGER);
CREATE INDEX passages_id ON passages (id);
CREATE INDEX passages_source ON passages (source);
CREATE TABLE documents (source TEXT PRIMARY KEY, sha256 TEXT NOT NULL, title TEXT, passages INTEGER NOT NULL,
                        added_unix INTEGER NOT NULL);
"""


@dataclass
class CorpusChange:
    """What a change did, by document source; `skipped` names each file left out and why."""
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    passages_added: int = 0
    passages_removed: int = 0
    passages: int = 0                 # in the bundle afterwards
    compacted: int = 0                # deleted slots the index was rebuilt without (0: not rebuilt)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)

    def lines(self) -> list[str]:
        """The change as a person reads it: one line per document, then the totals."""
        out = [f"added     {s}" for s in self.added] + [f"replaced  {s}" for s in self.replaced]
        out += [f"removed   {s}" for s in self.removed]
        out += [f"skipped   {s.path}: {s.reason}" for s in self.skipped]
        out.append(f"{len(self.added)} added, {len(self.replaced)} replaced, {len(self.removed)} removed, "
                   f"{len(self.unchanged)} unchanged, {len(self.skipped)} skipped; passages +{self.passages_added} "
                   f"-{self.passages_removed} = {self.passages} in {self.seconds:.1f} s")
        if self.compacted:
            out.append(f"compacted: the index was rebuilt without its {self.compacted} deleted slots")
        return out


def corpus_files(manifest: Manifest) -> set[str]:
    """The files a corpus change replaces: the index, the passage store, the piece vectors."""
    return {manifest.index.file, manifest.passages.file} | ({manifest.compression.file} if manifest.compression else set())


def create_store(path: Path, passages: Iterable[tuple], documents: Iterable[tuple] = ()) -> None:
    """A passage store: passages as (row, id, title, text, source, start_char, end_char), documents as
    (source, sha256, title, passages, added_unix). Export writes it; a change rewrites it."""
    db = sqlite3.connect(path)
    db.executescript(STORE_SCHEMA)
    db.executemany("INSERT INTO passages VALUES (?, ?, ?, ?, ?, ?, ?)", passages)
    db.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?)", documents)
    db.commit()
    db.close()


def passage_rows(passages: list[DocumentPassage], first_row: int = 0) -> list[tuple]:
    return [(first_row + i, p.id, p.title, p.text, p.source, p.start, p.end) for i, p in enumerate(passages)]


def document_rows(documents: list[Document], passages: list[DocumentPassage]) -> list[tuple]:
    counts: dict[str, int] = {}
    for p in passages:
        counts[p.source] = counts.get(p.source, 0) + 1
    now = int(time.time())
    return [(d.source, d.sha256, d.title, counts.get(d.source, 0), now) for d in documents if counts.get(d.source)]


class PassageEmbedder:
    """The bundle's passage encoder (its query encoder where it ships none): how export embedded the
    passages, so a passage added here ranks as one exported."""

    def __init__(self, bundle: Path, manifest: Manifest, encoder: QueryEncoder | None = None):
        spec: QueryEncoderSpec = manifest.passage_encoder or manifest.query_encoder
        self.tokenizer = Tokenizer.from_file(str(bundle / spec.tokenizer))
        self.tokenizer.no_truncation()  # a tokenizer file may truncate (MiniLM's at 128): counts must not
        self.tokenizer.no_padding()
        self.encoder = encoder or QueryEncoder(make_session(bundle / spec.onnx, None), Tokenizer.from_file(
            str(bundle / spec.tokenizer)), spec.max_length)
        self.max_length, self.dim = spec.max_length, spec.dim
        self.passage_format = manifest.index.passage_format

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def embed(self, pairs: list[tuple[str, str]], batch_size: int = 16) -> np.ndarray:
        """(title, text) pairs -> vectors, as export embeds them (the index's passage format). Batches
        hold texts of similar length: a batch is padded to its longest."""
        texts = [self.passage_format.format(title=t, text=x) for t, x in pairs]
        order = np.argsort([len(t) for t in texts], kind="stable")
        vectors = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), batch_size):
            chosen = order[start:start + batch_size]
            vectors[chosen] = self.encoder.encode([texts[i] for i in chosen])
        return vectors


@dataclass
class ChangeOptions:
    max_tokens: int | None = None     # a passage's tokens (None: 192, less where the encoder reads fewer)
    overlap_sentences: int = 1
    max_file_bytes: int = MAX_FILE_BYTES
    compact_share: float = COMPACT_SHARE

    def check(self) -> "ChangeOptions":
        if self.max_tokens is not None and self.max_tokens < 16:
            raise ValueError(f"max_tokens is {self.max_tokens}; a passage needs at least 16")
        if self.overlap_sentences < 0:
            raise ValueError(f"overlap_sentences is {self.overlap_sentences}; it must be 0 or more")
        if not 0 < self.compact_share <= 1:
            raise ValueError(f"compact_share is {self.compact_share}; it must be in (0, 1]")
        return self


def add_documents(bundle, paths, options: ChangeOptions | None = None, embedder: PassageEmbedder | None = None) -> CorpusChange:
    """Add the files and folders' documents; a source already in the bundle with other content is
    replaced, with the same content left as it is. Sources: a file's path relative to the folder given,
    or its name where the file is given itself."""
    options = (options or ChangeOptions()).check()
    documents, skipped = read_documents(paths, options.max_file_bytes)

    def plan(stored: dict[str, str]):
        return [d for d in documents if stored.get(d.source) != d.sha256], \
            {d.source for d in documents if d.source in stored and stored[d.source] != d.sha256}
    return _change(Path(bundle), plan, skipped, options, embedder)


def remove_documents(bundle, sources: Iterable[str], options: ChangeOptions | None = None) -> CorpusChange:
    """Remove documents by source; a folder's source (`notes` or `notes/`) removes every document under it."""
    options = (options or ChangeOptions()).check()
    wanted = [str(s).replace(os.sep, "/").rstrip("/") for s in sources]
    skipped: list[Skipped] = []

    def plan(stored: dict[str, str]):
        remove = set()
        for name in wanted:
            matched = {s for s in stored if s == name or s.startswith(name + "/")}
            if not matched:
                skipped.append(Skipped(name, "no document of this source in the bundle"))
            remove |= matched
        return [], remove
    return _change(Path(bundle), plan, skipped, options, None)


def sync_documents(bundle, folder, options: ChangeOptions | None = None,
                   embedder: PassageEmbedder | None = None) -> CorpusChange:
    """Make the bundle's documents those of the folder: add new files, replace changed ones (by content
    hash), remove those that are gone. A file that cannot be read keeps its stored version. Passages
    exported without a source (a SQuAD or JSONL corpus) are left alone."""
    options = (options or ChangeOptions()).check()
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    documents, skipped = read_documents([folder], options.max_file_bytes)
    unreadable = {_source_in(folder, s.path) for s in skipped}

    def plan(stored: dict[str, str]):
        present = {d.source: d for d in documents}
        remove = {s for s in stored if s not in unreadable and (s not in present or present[s].sha256 != stored[s])}
        return [d for d in documents if stored.get(d.source) != d.sha256], remove
    return _change(Path(bundle), plan, skipped, options, embedder)


def _source_in(folder: Path, path: str) -> str:
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return path


def stored_documents(bundle) -> dict[str, str]:
    """{source: sha256} of the bundle's documents."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    with closing(sqlite3.connect(f"file:{bundle / manifest.passages.file}?mode=ro&immutable=1", uri=True)) as db:
        return _documents(db)


def _documents(db) -> dict[str, str]:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'documents'").fetchone():
        return {}
    return dict(db.execute("SELECT source, sha256 FROM documents"))


@contextmanager
def _writer(bundle: Path):
    """The bundle's one writer: holds the lock, and removes what a killed change left behind."""
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle}")
    with open(bundle / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = read_manifest(bundle)
            for path in bundle.iterdir():
                if path.name.startswith(_WORK_PREFIX) or (_CORPUS_FILE.match(path.name) and path.name not in manifest.files):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            yield manifest
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _change(bundle: Path, plan: Callable, skipped: list[Skipped], options: ChangeOptions,
            embedder: PassageEmbedder | None) -> CorpusChange:
    started = time.perf_counter()
    with _writer(bundle) as manifest:
        verify(bundle, manifest, corpus_files(manifest))
        store = bundle / manifest.passages.file
        with closing(sqlite3.connect(f"file:{store}?mode=ro&immutable=1", uri=True)) as db:
            stored = _documents(db)
        add, remove = plan(stored)
        duplicates = {sha: s for s, sha in stored.items() if s not in remove}
        change = CorpusChange(skipped=list(skipped))
        kept_adds = []
        for d in add:
            if d.sha256 in duplicates and duplicates[d.sha256] != d.source:
                change.skipped.append(Skipped(d.source, f"same content as {duplicates[d.sha256]} (in the bundle)"))
                continue
            duplicates[d.sha256] = d.source
            kept_adds.append(d)
        change.added = sorted(d.source for d in kept_adds if d.source not in stored)
        change.replaced = sorted(d.source for d in kept_adds if d.source in stored)
        change.removed = sorted(remove - set(change.replaced))
        change.unchanged = sorted(set(stored) - remove)
        if not kept_adds and not remove:
            change.passages = manifest.passages.count
            change.seconds = time.perf_counter() - started
            return change
        embedder = embedder or PassageEmbedder(bundle, manifest)
        max_tokens = options.max_tokens or min(192, embedder.max_length - 32)
        passages = [p for d in kept_adds for p in cut_passages(d, embedder.count_tokens, max_tokens,
                                                               options.overlap_sentences)]
        vectors = embedder.embed([(p.title, p.text) for p in passages])
        pieces = None
        if manifest.compression is not None:
            cut = [split_pieces(p.text, manifest.compression.max_piece_words) for p in passages]
            flat = embedder.embed([(p.title, piece) for p, texts in zip(passages, cut) for piece in texts])
            bounds = np.cumsum([0] + [len(texts) for texts in cut])
            pieces = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        _write_version(bundle, manifest, stored, remove, kept_adds, passages, vectors, pieces, options, change)
    change.seconds = time.perf_counter() - started
    return change


def _write_version(bundle: Path, manifest: Manifest, stored: dict, remove: set[str], documents: list[Document],
                   passages: list[DocumentPassage], vectors: np.ndarray, pieces: list | None,
                   options: ChangeOptions, change: CorpusChange) -> None:
    idx, version = manifest.index, _next_version(manifest)
    first_label = idx.labels or idx.count  # every label used so far is below it
    work = bundle / f"{_WORK_PREFIX}{os.getpid()}"
    work.mkdir()
    new_store = work / f"passages.v{version}.sqlite"
    with closing(sqlite3.connect(f"file:{bundle / manifest.passages.file}?mode=ro&immutable=1", uri=True)) as old:
        columns = {row[1] for row in old.execute("PRAGMA table_info(passages)")}
        rows_of = "SELECT row, id, title, text, " + ("source, start_char, end_char" if "source" in columns
                                                      else "NULL, NULL, NULL") + " FROM passages"
        removed_rows = [r for (r,) in old.execute(
            f"SELECT row FROM passages WHERE source IN ({','.join('?' * len(remove))})", sorted(remove))] \
            if remove and "source" in columns else []
        gone = set(removed_rows)
        live = [r for r in old.execute(rows_of) if r[0] not in gone]
        kept_documents = [r for r in (old.execute("SELECT * FROM documents") if "documents" in {
            n for (n,) in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} else [])
            if r[0] not in remove]
    create_store(new_store, live + passage_rows(passages, first_label),
                 kept_documents + document_rows(documents, passages))
    new_labels = np.arange(first_label, first_label + len(passages))
    labels = first_label + len(passages)

    index = hnswlib.Index(space=idx.space, dim=idx.dim)
    index.load_index(str(bundle / idx.file), max_elements=idx.count + idx.deleted + len(passages),
                     allow_replace_deleted=True)
    for row in removed_rows:
        index.mark_deleted(row)
    if len(passages):
        index.add_items(vectors, new_labels, replace_deleted=True)
    deleted = index.get_current_count() - len(live) - len(passages)
    if deleted and deleted / index.get_current_count() > options.compact_share:
        index, change.compacted, deleted = _rebuilt(index, [r[0] for r in live] + new_labels.tolist(), idx), deleted, 0
    index.save_index(str(work / f"index.v{version}.hnsw"))

    new_pieces = None
    if pieces is not None:
        old_pieces = PieceVectors.load(bundle / manifest.compression.file, idx.labels or idx.count,
                                       manifest.compression.pieces, idx.dim)
        new_pieces = _pieces_by_label(old_pieces, gone, pieces, labels)
        new_pieces.save(work / f"pieces.v{version}.bin")

    change.passages_added, change.passages_removed = len(passages), len(removed_rows)
    change.passages = len(live) + len(passages)
    _publish(bundle, manifest, work, version, change.passages, labels, deleted, new_pieces)


def _next_version(manifest: Manifest) -> int:
    found = re.match(r"^index\.v(\d+)\.hnsw$", manifest.index.file)
    return int(found.group(1)) + 1 if found else 1


def _rebuilt(index: hnswlib.Index, live_labels: list[int], idx) -> hnswlib.Index:
    vectors = np.asarray(index.get_items(live_labels), dtype=np.float32).reshape(len(live_labels), idx.dim)
    fresh = hnswlib.Index(space=idx.space, dim=idx.dim)
    fresh.init_index(max_elements=max(len(live_labels), 1), M=idx.M, ef_construction=idx.ef_construction,
                     allow_replace_deleted=True)
    if live_labels:
        fresh.add_items(vectors, np.asarray(live_labels))
    return fresh


def _pieces_by_label(old: PieceVectors, gone: set[int], new: list[np.ndarray], labels: int) -> PieceVectors:
    """The piece vectors of every label below `labels`: the old ones kept as stored (int8, no second
    rounding), none for removed passages, the new passages' quantized."""
    added = PieceVectors.pack(new)
    first_new = labels - len(new)
    vectors, scales, counts = [], [], []
    for label in range(labels):
        if label >= first_new:
            source, i = added, label - first_new
        elif label < old.passages and label not in gone:
            source, i = old, label
        else:
            counts.append(0)
            continue
        a, b = source.offsets[i], source.offsets[i + 1]
        vectors.append(source.vectors[a:b])
        scales.append(source.scales[a:b])
        counts.append(b - a)
    dim = old.vectors.shape[1] if old.vectors.ndim == 2 else added.vectors.shape[1]
    return PieceVectors(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.int8),
                        np.concatenate(scales) if scales else np.zeros(0, np.float32),
                        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def _publish(bundle: Path, manifest: Manifest, work: Path, version: int, count: int, labels: int, deleted: int,
             pieces: PieceVectors | None) -> None:
    """The new files into the bundle, then the manifest that lists them, then the old files out."""
    old_names = [manifest.index.file, manifest.passages.file] + ([manifest.compression.file] if pieces is not None else [])
    new_names = sorted(p.name for p in work.iterdir())
    for name in new_names:
        _fsync(work / name)
    records = {name: file_record(work / name) for name in new_names}
    for name in new_names:
        (work / name).replace(bundle / name)
    manifest.index.file, manifest.index.count = f"index.v{version}.hnsw", count
    manifest.index.labels, manifest.index.deleted = labels, deleted
    manifest.passages.file, manifest.passages.count = f"passages.v{version}.sqlite", count
    if pieces is not None:
        manifest.compression.file, manifest.compression.pieces = f"pieces.v{version}.bin", len(pieces.vectors)
    for name in old_names:
        manifest.files.pop(name, None)
    manifest.files.update(records)
    _fsync(bundle)
    manifest.write(bundle)
    _fsync(bundle)
    for name in old_names:
        (bundle / name).unlink(missing_ok=True)
    work.rmdir()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
