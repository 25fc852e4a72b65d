"""Where a decode step's time goes, on a bundle's decoder-only generator:
`python -m edgerag.benchmarks.profile_decode BUNDLE [--threads 2] [--new-tokens 32]`.

A real question's RAG prompt (what the bundle reads of its top-k passages: their selected pieces
where it compresses its context, else the passages whole; `--whole-passages` for the latter) is decoded greedily for exactly
`--new-tokens` tokens (stop tokens ignored) with onnxruntime's profiler on. From the profile:
each operator type's share of the decode steps' kernel time, onnxruntime's own time per step
outside its kernels (the run minus the kernels: scheduling, allocation, output copies), and the
Python loop's time per token outside onnxruntime's run (binding inputs, reading the logits,
argmax). The floor is the generator's weight bytes over the machine's measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort


def profiled_session(path: Path, threads: int, folder: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(folder) / "decode")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def breakdown(events: list[dict]) -> dict:
    """Kernel time per operator type, and the runs' own time, over the decode steps (the first run,
    the prefill, left out)."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode_runs = runs[1:]
    by_op, kernels = defaultdict(float), 0.0
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in decode_runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(a <= e["ts"] <= b for a, b in spans):
            by_op[e["args"]["op_name"]] += e["dur"]
            kernels += e["dur"]
    n = max(len(decode_runs), 1)
    run_us = sum(r["dur"] for r in decode_runs)
    return {"steps": len(decode_runs), "run_ms_per_step": run_us / n / 1000, "kernel_ms_per_step": kernels / n / 1000,
            "ops_ms_per_step": {op: us / n / 1000 for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def main(argv=None) -> int:
    from edgerag.benchmarks.machine import bandwidth_gb_s, decode_floor_ms, onnx_weight_bytes
    from edgerag.data import data_path, read_questions
    from edgerag.runtime import Pipeline
    from edgerag.runtime import DecoderOnlyGenerator

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--questions", default="xquad-en.json.gz", help="a SQuAD file; its first question makes the prompt")
    p.add_argument("--k", type=int, help="passages retrieved (default: the bundle's k)")
    p.add_argument("--whole-passages", action="store_true", help="read the top-k passages whole, uncompressed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="unprofiled rounds for the loop's own timing")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)

    pipeline = Pipeline.load(args.bundle, threads=args.threads, reuse_prefix="none")
    if pipeline.manifest.generator.family != "decoder-only":
        raise SystemExit("profile_decode profiles decoder-only bundles")
    question = read_questions(data_path(args.questions))[0].question
    vector = pipeline.encoder.encode([question])
    rows, scores = pipeline.search(vector, args.k or pipeline.manifest.generation.k)
    passages = [(d["title"], d["text"]) for d in pipeline.passages_at(rows[0], scores[0])]
    if not args.whole_passages and pipeline.compression is not None:  # the pieces the runtime would pick
        passages = pipeline.context(question, vector[0], passages, pipeline._piece_vectors(rows[0]))
    prompt = pipeline.prompt_ids(question, passages, args.new_tokens)
    onnx_path = Path(args.bundle) / pipeline.manifest.generator.onnx

    # unprofiled: the loop as the runtime runs it, per token, and how much of it is onnxruntime's run
    in_place = pipeline.generator.kv_in_place
    # one token a step (no prompt lookup): the profile is of one decode step
    generator = DecoderOnlyGenerator(pipeline.generator.session, [], reuse_prefix="none", kv_in_place=in_place,
                                     prompt_lookup=0)
    run_ms, loop_ms = [], []
    original = generator.session.run_with_iobinding

    def timed_run(binding, *a, **kw):
        start = time.perf_counter()
        result = original(binding, *a, **kw)
        run_ms.append((time.perf_counter() - start) * 1000)
        return result

    generator.session.run_with_iobinding = timed_run
    for _ in range(args.rounds + 1):
        run_ms.clear()
        g = generator.greedy(prompt, args.new_tokens)
        loop_ms.append((g.decode_ms / max(len(g.tokens) - 1, 1), statistics.mean(run_ms[1:])))
    loop_ms = loop_ms[1:]  # the first round warms up
    step_ms = statistics.median(x for x, _ in loop_ms)
    ort_run_ms = statistics.median(y for _, y in loop_ms)

    with tempfile.TemporaryDirectory() as folder:
        session = profiled_session(onnx_path, args.threads, folder)
        profiled = DecoderOnlyGenerator(session, [], reuse_prefix="none", kv_in_place=in_place, prompt_lookup=0)
        profiled.greedy(prompt, args.new_tokens)  # warm-up, also profiled: dropped below by time
        profiled.greedy(prompt, args.new_tokens)
        events = json.loads(Path(session.end_profiling()).read_text())
    # the profile's timestamps count from the session's start: keep the second generation's runs
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    second = runs[len(runs) // 2:]
    first_ts = second[0]["ts"]
    figures = breakdown([e for e in events if e.get("ts", 0) >= first_ts])

    bandwidth = bandwidth_gb_s()
    weight_bytes = onnx_weight_bytes(onnx_path)
    floor = decode_floor_ms(weight_bytes, bandwidth)
    figures.update({"bundle": str(args.bundle), "threads": args.threads, "prompt_tokens": len(prompt),
                    "new_tokens": args.new_tokens, "loop_ms_per_token": step_ms, "ort_run_ms_per_token": ort_run_ms,
                    "python_ms_per_token": step_ms - ort_run_ms, "weight_bytes": weight_bytes,
                    "bandwidth_gb_s": bandwidth, "floor_ms_per_token": floor, "x_floor": step_ms / floor})
    kernel = figures["kernel_ms_per_step"]
    print(f"decode: {step_ms:.2f} ms/token ({step_ms / floor:.1f}x the floor of {floor:.2f} ms: "
          f"{weight_bytes / 1e6:.0f} MB of weights at {bandwidth:.1f} GB/s), prompt {len(prompt)} tokens, "
          f"{args.threads} threads")
    print(f"  onnxruntime run {ort_run_ms:.2f} ms/token (profiled: {figures['run_ms_per_step']:.2f}, of which kernels "
          f"{kernel:.2f}, onnxruntime outside its kernels {figures['run_ms_per_step'] - kernel:.2f}); "
          f"the Python loop outside the run {step_ms - ort_run_ms:.2f}")
    print("| operator | ms / token | share of kernel time |")
    print("|---|---|---|")
    for op, ms in list(figures["ops_ms_per_step"].items())[:10]:
        print(f"| {op} | {ms:.2f} | {100 * ms / kernel:.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
