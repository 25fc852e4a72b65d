"""results.json -> report.md and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

PLOTS = ("latency_by_stage.png", "quality_vs_latency.png", "peak_memory.png")


def _label(row: dict) -> str:
    return f"{row['name']} t{row['threads']}"


def reference(rows: list[dict], row: dict) -> dict | None:
    """The teacher at the same thread count, else the first system at that thread count."""
    same = [r for r in rows if r["threads"] == row["threads"]]
    return next((r for r in same if r["name"] == "teacher-torch"), same[0] if same else None)


def _num(v, fmt: str = "{:.1f}") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _ratio(v, ref) -> str:
    if v is None or not ref:
        return ""
    return f" ({v / ref:.2f}×)"


COLUMNS = (  # (header, key, format, compare to the reference: "x" ratio, "d" difference in points, "" none)
    ("p50 ms", "p50_ms", "{:.0f}", "x"), ("p95 ms", "p95_ms", "{:.0f}", "x"), ("TTFT ms", "ttft_ms", "{:.0f}", "x"),
    ("prompt tok", "mean_prompt_tokens", "{:.0f}", "x"), ("prefill ms", "prefill_ms", "{:.0f}", "x"), ("prefill / floor", "prefill_x_floor", "{:.1f}", ""),
    ("decode ms/tok", "decode_ms_per_token", "{:.1f}", "x"), ("ms/tok / floor", "decode_x_floor", "{:.2f}", ""),
    ("decode / floor w+KV", "decode_x_floor_with_kv", "{:.2f}", ""),
    ("ms/step", "decode_ms_per_step", "{:.1f}", "x"), ("step / floor", "decode_step_x_floor", "{:.2f}", ""),
    ("tok/step", "tokens_per_step", "{:.2f}", ""), ("drafts", "prompt_lookup", "{}", ""),
    ("tok/s", "tokens_per_second", "{:.1f}", "x"), ("peak RSS MB", "peak_rss_mb", "{:.0f}", "x"),
    ("cold start s", "cold_start_s", "{:.1f}", "x"), ("size MB", "size_mb", "{:.0f}", "x"),
    ("EM", "em", "{:.1f}", "d"), ("F1", "f1", "{:.1f}", "d"), ("recall@5", "recall@5", "{:.1f}", "d"),
)


def table(rows: list[dict]) -> str:
    lines = ["| system | thr | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for r in rows:
        ref = reference(rows, r)
        cells = []
        for _, key, fmt, compare in COLUMNS:
            v, base = r.get(key), ref.get(key) if ref else None
            cell = _num(v, fmt)
            if compare == "x":
                cell += _ratio(v, base)
            elif compare == "d" and ref is not None and ref is not r and v is not None and base is not None:
                cell += f" ({v - base:+.1f})"
            cells.append(cell)
        lines.append(f"| {r['name']} | {r['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def index_table(rows: list[dict]) -> str:
    lines = ["| vectors | n | dim | build s | memory MB | ef for recall ≥ 0.99 | recall@10 | p50 query ms | p99 query ms "
             "| exact p50 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('vectors', '?')} | error: {r['error']} |||||||||")
            continue
        ef = str(r["ef"]) if r.get("reached_target") else f"not reached (max {r['ef']})"
        label = "random (worst case)" if r.get("vectors") == "random" else r.get("vectors", "random")
        lines.append(f"| {label} | {r['n']:,} | {r['dim']} | {r['build_s']:.1f} | {r['memory_mb']:.0f} | {ef} "
                     f"| {r['recall@10']:.3f} | {r['p50_query_ms']:.3f} | {r.get('p99_query_ms', float('nan')):.3f} "
                     f"| {r.get('exact_p50_query_ms', float('nan')):.3f} |")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    stages = list(dict.fromkeys(k for r in rows for k in r["rss_by_stage_mb"]))
    phases = list(dict.fromkeys(k for r in rows for k in r.get("cold_start_phases_s", {})))
    lines = ["| system | thr | " + " | ".join(f"RSS {s}" for s in stages) + " | peak RSS | size MB | peak / size | "
             + "on huge pages at the end | " + " | ".join(f"{p} s" for p in phases) + " | cold start s |",
             "|---" * (len(stages) + len(phases) + 7) + "|"]
    for r in rows:
        cells = [_num(r["rss_by_stage_mb"].get(s), "{:.0f}") for s in stages]
        cells += [_num(r["peak_rss_mb"], "{:.0f}"), _num(r["size_mb"], "{:.0f}"), _num(r.get("rss_x_size"), "{:.2f}"),
                  _num(r.get("huge_pages_mb"), "{:.0f}")]
        cells += [_num(r.get("cold_start_phases_s", {}).get(p), "{:.2f}") for p in phases]
        cells.append(_num(r["cold_start_s"], "{:.2f}"))
        lines.append(f"| {r['name']} | {r['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m, s = results["machine"], results["setup"]
    ort = results.get("machine_detail", {}).get("ort_matmul_gflops", {})
    has_teacher = any(r["name"] == "teacher-torch" for r in results["systems"])
    parts = [
        "# edgerag bench",
        f"Machine: {m['cpu']}, {m['cores']} cores; copy bandwidth {m['bandwidth_gb_s']:.1f} GB/s; numpy fp32 GEMM "
        f"{m['matmul_gflops']:.1f} GFLOP/s; onnxruntime GEMM GFLOP/s by threads: "
        + ", ".join(f"{t}: fp32 {v['fp32']:.0f} / int8 {v['int8']:.0f}" for t, v in ort.items()) + ".",
        f"{s['n']} questions from `{s['questions']}`, "
        + (f"k={s['k']} passages (the same for every system: the top-{s['k']} of "
           f"`{Path(s['shared_passages_from']).name}`)" if s.get("shared_passages_from") else
           f"every system on its own path: its own retriever; a bundle reads what it reads by itself (its compressed "
           f"context, where it has one; `prompt tok` says how much), the others their top-{s['k']} passages whole")
        + f", up to {s['max_new_tokens']} new tokens, greedy"
        + (f"; {s['rounds']} rounds, the systems interleaved, every figure over all rounds' questions (cold start: "
           f"the median round's; peak RSS: the highest round's)" if s.get("rounds", 1) > 1 else "")
        + f". Bench time {s['seconds']:.0f} s.",
        "",
        "## Systems",
        f"In parentheses after a value: its ratio to {'the teacher' if has_teacher else 'the first system'} at the "
        "same thread count; after EM/F1/recall: the difference in points. Latency is per question, end to end "
        "(encode + search + prompt + prefill + decode), median and 95th percentile; TTFT and prefill are medians. "
        "× floor: prefill against FLOPs / GEMM throughput (int8 GEMMs for int4/int8 ONNX, fp32 otherwise), "
        "decode against bytes of weights read per token / copy bandwidth, measured after each question (the "
        "machine line's figure is the one before the systems ran); w+KV adds the KV cache each step reads (every "
        "cached position's keys and values: the longer the prompt, the more). EM/F1 come from what each system read; "
        "recall@5 from each system's own retriever. Peak RSS is the worker process's maximum.",
        "",
        table(results["systems"]),
        "",
    ]
    notes = [f"- {r['name']}: {r['note']}" for r in results["systems"] if r.get("note") and r["threads"] == results["systems"][0]["threads"]]
    if notes:
        parts += ["Notes:", *dict.fromkeys(notes), ""]
    if results.get("skipped"):
        parts += ["Not run:", *[f"- {x['name']}{' (t=' + str(x['threads']) + ')' if 'threads' in x else ''}: {x['reason']}"
                                for x in results["skipped"]], ""]
    staged = [r for r in results["systems"] if r.get("rss_by_stage_mb")]
    if staged:
        parts += ["## Memory and start-up", "",
                  "Resident memory (MB) after each stage and the cold start by phase (s): process start is the "
                  "interpreter and the bench's own imports; a bundle's load includes verifying every file's checksum.", "",
                  memory_table(staged), ""]
    if results.get("index"):
        parts += ["## hnswlib at scale (inner product)", "",
                  "A real corpus embedded with the bundle's own query encoder and queried with held-out real "
                  "questions, then random unit vectors (the worst case for a graph index). Build with the bundle's "
                  "M and ef_construction on all cores; queries one at a time on one thread; recall@10 against "
                  "exact search; the smallest ef in 10,16,32,...,2048 that reaches recall 0.99.", "",
                  index_table(results["index"]), ""]
    parts += ["Plots: " + ", ".join(f"![{p}]({p})" for p in PLOTS), ""]
    return "\n".join(parts)


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["systems"]
    labels = [_label(r) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    bottom = [0.0] * len(rows)
    for stage in ("encode", "search", "prefill", "decode"):
        values = [r["mean_ms"][stage] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("mean ms per question")
    ax.set_title("Latency by stage")
    ax.legend()
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r, label in zip(rows, labels):
        ax.scatter(r["p50_ms"], r["f1"])
        ax.annotate(label, (r["p50_ms"], r["f1"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("p50 latency per question (ms)")
    ax.set_ylabel("F1")
    ax.set_title("Quality vs latency")
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    ax.bar(labels, [r["peak_rss_mb"] for r in rows], color="tab:purple")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("Peak memory per system")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=110)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(markdown(results))
    plots(results, out)
