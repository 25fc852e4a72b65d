"""hnswlib at scale: build time, memory, query time and recall@10 against exact search.

Two kinds of vectors, named in each row's `vectors` field:
  "random"        random unit vectors, the worst case for a graph index (no clusters to exploit,
                  neighbours barely nearer than the rest): an upper bound on the ef a corpus needs.
  a corpus name   real texts embedded with a bundle's own query encoder (for example SQuAD v1.1
                  train, its questions and passages, about 106k texts), queried with held-out real
                  questions. The embeddings are cached, keyed by the encoder's checksums and the texts.
Run in its own process by the bench, so the memory figure is this index's alone:

    python -m edgerag.benchmarks.index_scale random N DIM M EF_CONSTRUCTION OUT.json
    python -m edgerag.benchmarks.index_scale corpus BUNDLE CORPUS QUERIES CACHE_DIR M EF_CONSTRUCTION OUT.json
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from edgerag.benchmarks.process_memory import rss_mb

EFS = (10, 16, 32, 64, 128, 256, 512, 1024, 2048)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 100_000):  # in chunks: no float64 copy of the whole matrix
        chunk = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        out[start:start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def exact_top(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by inner product, in blocks of the data so 1M x queries scores stay small."""
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    for start in range(0, len(data), 200_000):
        scores = queries @ data[start:start + 200_000].T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        best_ids = np.concatenate([best_ids, top + start], axis=1)
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
    order = np.argsort(-best_scores, axis=1)[:, :k]
    return np.take_along_axis(best_ids, order, axis=1)


def measure(data: np.ndarray, queries: np.ndarray, vectors: str, m: int = 32, ef_construction: int = 200,
            target: float = 0.99, threads: int = -1, seed: int = 0) -> dict:
    """Build the index over `data`, then sweep ef (one query at a time, one thread) up to the target recall."""
    import hnswlib

    n, dim = data.shape
    k = min(10, n)
    truth = exact_top(data, queries, k)
    before = rss_mb()
    index = hnswlib.Index(space="ip", dim=dim)
    start = time.perf_counter()
    index.init_index(max_elements=n, ef_construction=ef_construction, M=m, random_seed=seed)
    index.add_items(data, np.arange(n), num_threads=threads)
    build_s = time.perf_counter() - start
    memory_mb = rss_mb() - before  # the graph plus hnswlib's own copy of the vectors
    index.set_num_threads(1)
    sweep = []
    for ef in EFS:
        index.set_ef(max(ef, k))
        times, hits = [], 0
        for i in range(len(queries)):  # one query at a time, as the device asks them
            t = time.perf_counter()
            labels, _ = index.knn_query(queries[i:i + 1], k=k)
            times.append((time.perf_counter() - t) * 1000)
            hits += len(set(labels[0].tolist()) & set(truth[i].tolist()))
        sweep.append({"ef": ef, "recall@10": hits / (len(queries) * k), "p50_query_ms": float(np.median(times)),
                      "p99_query_ms": float(np.percentile(times, 99))})
        if sweep[-1]["recall@10"] >= target or ef >= n:
            break
    chosen = next((s for s in sweep if s["recall@10"] >= target), sweep[-1])
    return {"vectors": vectors, "n": n, "dim": dim, "queries": len(queries), "M": m, "ef_construction": ef_construction,
            "ef": chosen["ef"], "recall@10": round(chosen["recall@10"], 4),
            "p50_query_ms": round(chosen["p50_query_ms"], 4), "p99_query_ms": round(chosen["p99_query_ms"], 4),
            "build_s": round(build_s, 3), "memory_mb": round(memory_mb, 1),
            "reached_target": chosen["recall@10"] >= target, "target_recall": target,
            "exact_p50_query_ms": round(_exact_query_ms(data, queries[:20], k), 3), "sweep": sweep}


def measure_random(n: int, dim: int, m: int = 32, ef_construction: int = 200, queries: int = 200,
                   seed: int = 0) -> dict:
    return measure(unit_vectors(n, dim, seed), unit_vectors(queries, dim, seed + 1), "random", m, ef_construction,
                   seed=seed)


def corpus_texts(path: str) -> list[str]:
    """A SQuAD file's questions and passages (as the bundle embeds passages), or a JSONL corpus's passages."""
    from edgerag.data import is_squad, read_passages, read_squad
    from edgerag.runtime.manifest import IndexSpec

    fmt = IndexSpec.passage_format
    if is_squad(Path(path)):
        passages, questions, _ = read_squad(path)
        return [q.question for q in questions] + [fmt.format(title=p.title, text=p.text) for p in passages]
    return [fmt.format(title=p.title, text=p.text) for p in read_passages(path)]


def embedded(bundle: Path, texts: list[str], cache: Path, batch_size: int = 64) -> np.ndarray:
    """The texts embedded with the bundle's query encoder, computed once and cached (keyed by the
    encoder's and its tokenizer's checksums and every text)."""
    from tokenizers import Tokenizer

    from edgerag.runtime import verify
    from edgerag.runtime import QueryEncoder, make_session

    manifest = verify(bundle)
    enc = manifest.query_encoder
    key = hashlib.sha256()
    weights = [manifest.files[enc.weights].sha256] if enc.weights else []
    for part in (manifest.files[enc.onnx].sha256, *weights, manifest.files[enc.tokenizer].sha256, *texts):
        key.update(part.encode("utf-8", "surrogatepass") + b"\0")
    path = Path(cache) / f"embeddings-{key.hexdigest()[:20]}.npy"
    if path.exists():
        return np.load(path)
    encoder = QueryEncoder(make_session(bundle / enc.onnx, None), Tokenizer.from_file(str(bundle / enc.tokenizer)),
                           enc.max_length)
    out = np.empty((len(texts), manifest.query_encoder.dim), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        out[start:start + batch_size] = encoder.encode(texts[start:start + batch_size])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def measure_corpus(bundle: Path, corpus: str, queries_file: str, cache: Path, m: int = 32,
                   ef_construction: int = 200, queries: int = 200, seed: int = 0) -> dict:
    from edgerag.data import read_questions, sample_questions

    data_texts = corpus_texts(corpus)
    query_texts = [q.question for q in sample_questions(read_questions(queries_file), queries, seed)]
    started = time.perf_counter()
    data = embedded(bundle, data_texts, cache)
    query_vectors = embedded(bundle, query_texts, cache)
    row = measure(data, query_vectors, Path(corpus).name, m, ef_construction, seed=seed)
    row.update(embed_s=round(time.perf_counter() - started, 1), queries_from=Path(queries_file).name)
    return row


def _exact_query_ms(data: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Brute force on one query at a time, the baseline hnswlib has to beat."""
    times = []
    for i in range(len(queries)):
        t = time.perf_counter()
        scores = data @ queries[i]
        np.argpartition(-scores, k - 1)[:k]
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def main(argv: list[str]) -> int:
    import json

    kind, *args = argv
    if kind == "random":
        n, dim, m, ef_construction, out = int(args[0]), int(args[1]), int(args[2]), int(args[3]), args[4]
        row = measure_random(n, dim, m, ef_construction)
    elif kind == "corpus":
        bundle, corpus, queries_file, cache, m, ef_construction, out = args
        row = measure_corpus(Path(bundle), corpus, queries_file, Path(cache), int(m), int(ef_construction))
    else:
        raise SystemExit(f"unknown kind {kind!r}: random or corpus")
    Path(out).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
