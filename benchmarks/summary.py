"""A worker's per-question measurements -> one row of results.json, with its floors."""

from __future__ import annotations

import numpy as np

from edgerag.benchmarks.machine import decode_bytes, decode_floor_ms, prefill_flops, prefill_floor_ms

INT8_COMPUTE = ("int4", "int8")  # MatMulNBits at accuracy level 4 and dynamic int8 both run int8 GEMMs


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def merge_rounds(results: list[dict]) -> dict:
    """One system's workers over several rounds -> one raw result: the questions of every round
    pooled; the cold start (and its phases) of the median round; the peak RSS (and its stages) of
    the round that peaked highest."""
    if len(results) == 1:
        return results[0]
    by_cold = sorted(results, key=lambda r: r["cold_start_s"])
    median_cold = by_cold[(len(by_cold) - 1) // 2]
    highest = max(results, key=lambda r: r["peak_rss_mb"])
    merged = {**highest, "per_question": [q for r in results for q in r["per_question"]], "rounds": len(results)}
    for key in ("cold_start_s", "cold_start_phases_s", "load_s"):
        merged[key] = median_cold[key]
    return merged


def system_row(r: dict, limits: dict) -> dict:
    rows = r["per_question"]
    col = lambda key: np.array([x[key] for x in rows], dtype=float)  # noqa: E731
    # every decode step counts, the one that produced the stop token too (its time is in decode_ms);
    # a step that checked a prompt-lookup draft chose more than one token
    steps = lambda x: x.get("decode_steps", max(x["new_tokens"] - 1, 0))  # noqa: E731
    decode_steps = sum(steps(x) for x in rows)
    decode_tokens = sum(x.get("decode_tokens", steps(x)) for x in rows)
    decode_ms_per_token = float(col("decode_ms").sum() / decode_tokens) if decode_tokens else None
    decode_ms_per_step = float(col("decode_ms").sum() / decode_steps) if decode_steps else None
    prompt_tokens = float(col("prompt_tokens").mean()) if rows else 0.0

    # floors: decode reads every weight once per step, which is one token a step without drafts (the
    # ms-per-token ratio is against that: drafts accepted take it below 1); prefill is FLOPs at the
    # best GEMM rate. The KV floor counts one new position a step, a little low where drafts are accepted
    ort = limits["ort_matmul_gflops"][str(r["threads"])]
    int8 = r["kind"] != "torch" and r.get("quant") in INT8_COMPUTE
    gflops = ort["int8"] if int8 else ort["fp32"]
    # each question's decode steps against the bandwidth measured right after it, where the worker had a probe
    probed = [x for x in rows if x.get("bandwidth_gb_s")]
    measured = probed if sum(steps(x) for x in probed) else rows
    bandwidth = (lambda x: x["bandwidth_gb_s"]) if measured is probed else (lambda x: limits["bandwidth_gb_s"])  # noqa: E731
    measured_steps = sum(steps(x) for x in measured)

    def floor_per_token(kv_prompt: int, kv_new: int) -> float:
        """ms a decode step must take to read the weights and, per cached position, this much KV cache."""
        return sum(decode_floor_ms(decode_bytes(r["weight_bytes"], x["prompt_tokens"], steps(x), kv_prompt, kv_new), bandwidth(x))
                   for x in measured) / measured_steps

    decode_floor = floor_per_token(0, 0) if measured_steps else decode_floor_ms(r["weight_bytes"], limits["bandwidth_gb_s"])
    # the same floor with the KV cache a step reads on top of the weights, where the worker knows its size
    kv_prompt, kv_new = r.get("kv_bytes_prompt_position"), r.get("kv_bytes_new_position")
    decode_floor_kv = floor_per_token(kv_prompt, kv_new) if kv_prompt is not None and kv_new is not None and measured_steps else None
    prefill_floor = prefill_floor_ms(prefill_flops(r["matmul_params"], r["layers"], r["hidden"], prompt_tokens), gflops)
    prefill_ms = _pct(col("prefill_ms"), 50)
    row = {
        "name": r["name"], "threads": r["threads"],
        "p50_ms": _pct(col("total_ms"), 50), "p95_ms": _pct(col("total_ms"), 95),
        "ttft_ms": _pct(col("ttft_ms"), 50), "prefill_ms": prefill_ms,
        "decode_ms_per_token": decode_ms_per_token, "decode_floor_ms_per_token": decode_floor,
        "peak_rss_mb": r["peak_rss_mb"], "cold_start_s": r["cold_start_s"], "size_mb": r["size_mb"],
        "em": 100 * float(col("em").mean()), "f1": 100 * float(col("f1").mean()),
        "recall@5": 100 * float(col("recall@5").mean()),
        # beyond the required schema
        "kind": r["kind"], "quant": r.get("quant"), "note": r.get("note"),
        "encode_ms": _pct(col("encode_ms"), 50), "search_ms": _pct(col("search_ms"), 50),
        "decode_ms": _pct(col("decode_ms"), 50),
        "mean_ms": {s: float(col(f"{s}_ms").mean()) for s in ("encode", "search", "prefill", "decode")},
        "tokens_per_second": 1000 / decode_ms_per_token if decode_ms_per_token else None,
        "prefill_floor_ms": prefill_floor, "prefill_gflops_used": gflops,
        "prefill_x_floor": prefill_ms / prefill_floor if prefill_floor else None,
        "decode_x_floor": decode_ms_per_token / decode_floor if decode_ms_per_token and decode_floor else None,
        # a forward pass after the prefill against the same floor, and the tokens it chose: they
        # differ from the per-token figures where prompt lookup drafts tokens
        "decode_ms_per_step": decode_ms_per_step,
        "decode_step_x_floor": decode_ms_per_step / decode_floor if decode_ms_per_step and decode_floor else None,
        "tokens_per_step": decode_tokens / decode_steps if decode_steps else None,
        "prompt_lookup": r.get("prompt_lookup"),
        "decode_floor_with_kv_ms_per_token": decode_floor_kv,
        "decode_x_floor_with_kv": decode_ms_per_token / decode_floor_kv if decode_ms_per_token and decode_floor_kv else None,
        "mean_prompt_tokens": prompt_tokens, "mean_new_tokens": float(col("new_tokens").mean()) if rows else 0.0,
        "load_s": r["load_s"], "weight_bytes_per_token": r["weight_bytes"], "n": len(rows),
        "rss_x_size": r["peak_rss_mb"] / r["size_mb"] if r["size_mb"] else None,
        "rss_by_stage_mb": r.get("rss_by_stage_mb", {}), "cold_start_phases_s": r.get("cold_start_phases_s", {}),
        "huge_pages_mb": r.get("huge_pages_mb"),
        "rounds": r.get("rounds", 1),
        "bandwidth_gb_s": _pct([x["bandwidth_gb_s"] for x in probed], 50) if probed else limits["bandwidth_gb_s"],
    }
    return row
