"""Against one running server: concurrent clients whose answers must equal the sequential ones, and a
long soak that samples the server's resident memory as it goes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from edgerag.benchmarks.process_memory import rss_mb
from edgerag.benchmarks.reliability.server import request


def questions_from(path: str, n: int, seed: int = 0) -> list[str]:
    from edgerag.data import read_questions, sample_questions

    return [q.question for q in sample_questions(read_questions(path), n, seed)]


def load(url: str, questions: list[str], clients: list[int], max_new_tokens: int, reference: list[str]) -> list[dict]:
    """At each concurrency, every client asks every question; answers must equal the sequential reference."""
    rows = []
    for c in clients:
        latencies, answers, errors = [], {}, []

        def client(i):
            for j, q in enumerate(questions):
                start = time.perf_counter()
                status, reply = request(url + "/v1/ask", {"question": q, "max_new_tokens": max_new_tokens})
                latencies.append((time.perf_counter() - start) * 1000)
                if status != 200:
                    errors.append(status)
                else:
                    answers[(i, j)] = reply["answer"]
        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        same = sum(answers.get((i, j)) == reference[j] for i in range(c) for j in range(len(questions)))
        rows.append({"clients": c, "requests": c * len(questions), "identical_to_sequential": same, "errors": len(errors),
                     "p50_ms": round(float(np.percentile(latencies, 50)), 1),
                     "p95_ms": round(float(np.percentile(latencies, 95)), 1),
                     "answers_per_s": round(c * len(questions) / wall, 2)})
    return rows


def soak(url: str, pid: int, questions: list[str], n: int, max_new_tokens: int, out: Path | None = None) -> dict:
    """n questions, one after another, into one server; its RSS sampled as it goes."""
    samples, cut, failed = [], 0, 0
    every = max(n // 100, 1)
    for i in range(n):
        status, reply = request(url + "/v1/ask", {"question": questions[i % len(questions)], "max_new_tokens": max_new_tokens})
        failed += status != 200
        cut += bool(reply) and reply.get("stop_reason") == "repetition"
        if i % every == 0 or i == n - 1:
            samples.append((i + 1, rss_mb(pid)))
    warm = next((mb for i, mb in samples if i >= max(n // 10, 1)), samples[-1][1])
    result = {"questions": n, "failed": failed, "cut_by_repetition": cut, "rss_after_warmup_mb": round(warm, 1),
              "rss_end_mb": round(samples[-1][1], 1), "rss_growth_pct": round(100 * (samples[-1][1] - warm) / warm, 2),
              "rss_samples": samples}
    if out is not None:
        result["plot"] = plot_rss(samples, warm, out / "soak_rss.png")
    return result


def plot_rss(samples: list, warm: float, path: Path) -> str | None:
    """The soak's RSS curve, on an axis from 0 so that growth looks its true size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([i for i, _ in samples], [mb for _, mb in samples], label="server RSS")
    ax.axhline(warm, linestyle=":", color="gray", label="after warm-up")
    ax.set_ylim(0, max(mb for _, mb in samples) * 1.15)
    ax.set_xlabel("questions answered")
    ax.set_ylabel("MB")
    ax.set_title(f"soak: {samples[-1][0]} questions, RSS {warm:.0f} -> {samples[-1][1]:.0f} MB after warm-up")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
