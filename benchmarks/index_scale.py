"""hnswlib at scale: build time, memory, query time and recall@10 against exact search.

Random unit vectors are the hard case for a graph index (no clusters to exploit, neighbours barely
nearer than the rest), so the ef that reaches recall 0.99 here is an upper bound for real corpora.
Run in its own process by the bench, so the memory figure is this index's alone.
"""

from __future__ import annotations

import time

import numpy as np

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


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def measure_size(n: int, dim: int, m: int = 32, ef_construction: int = 200, queries: int = 200,
                 target: float = 0.99, threads: int = -1, seed: int = 0) -> dict:
    import hnswlib

    data = unit_vectors(n, dim, seed)
    q = unit_vectors(queries, dim, seed + 1)
    k = min(10, n)
    truth = exact_top(data, q, k)
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
        for i in range(len(q)):  # one query at a time, as the device asks them
            t = time.perf_counter()
            labels, _ = index.knn_query(q[i:i + 1], k=k)
            times.append((time.perf_counter() - t) * 1000)
            hits += len(set(labels[0].tolist()) & set(truth[i].tolist()))
        sweep.append({"ef": ef, "recall@10": hits / (len(q) * k), "p50_query_ms": float(np.median(times))})
        if sweep[-1]["recall@10"] >= target:
            break
    chosen = next((s for s in sweep if s["recall@10"] >= target), sweep[-1])
    return {"n": n, "dim": dim, "M": m, "ef_construction": ef_construction, "ef": chosen["ef"],
            "recall@10": round(chosen["recall@10"], 4), "p50_query_ms": round(chosen["p50_query_ms"], 4),
            "build_s": round(build_s, 3), "memory_mb": round(memory_mb, 1),
            "reached_target": chosen["recall@10"] >= target, "target_recall": target,
            "exact_p50_query_ms": round(_exact_query_ms(data, q[:20], k), 3), "sweep": sweep}


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
    from pathlib import Path

    n, dim, m, ef_construction, out = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    Path(out).write_text(json.dumps(measure_size(n, dim, m, ef_construction)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
