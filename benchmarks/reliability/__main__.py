"""The reliability suite: hostile input, concurrent clients, a long soak, kills mid-write, damaged files.

    python -m edgerag.benchmarks.reliability BUNDLE --out runs/reliability \\
        [--fuzz 1000] [--clients 1,2,4,8] [--questions 50] [--soak 2000] \\
        [--export-kills 5 --encoder E --generator G --passages P] [--distill-recipe R]

Every section drives the real thing: `edgerag serve` in its own process on loopback, `edgerag
export` and `edgerag distill` in processes that are SIGKILLed, the bundle's files damaged on a copy.
It prints the figures and writes results.json (and soak_rss.png) into --out. `make reliability` runs
it at full size on the demo bundle; tests/test_reliability.py runs each section small.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from edgerag.benchmarks.reliability.damage import damage
from edgerag.benchmarks.reliability.fuzzing import fuzz_http, fuzz_manifest, fuzz_passages, fuzz_python
from edgerag.benchmarks.reliability.kills import kill_distill, kill_export
from edgerag.benchmarks.reliability.load_and_soak import load, questions_from, soak
from edgerag.benchmarks.reliability.server import server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgerag.benchmarks.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/reliability"))
    parser.add_argument("--questions-file", default=os.path.join(os.environ.get("EDGERAG_DATA", "../shared/data"),
                                                                 "xquad-en.json.gz"))
    parser.add_argument("--fuzz", type=int, default=1000, help="generated inputs per API")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--questions", type=int, default=50, help="questions per client in the load test")
    parser.add_argument("--soak", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--export-kills", type=int, default=5)
    parser.add_argument("--encoder", help="for the export kills (default: the bundle's sources)")
    parser.add_argument("--generator")
    parser.add_argument("--passages")
    parser.add_argument("--distill-recipe", help="kill `edgerag distill` of this recipe in each training stage")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from edgerag.runtime import Pipeline, read_manifest

    args.out.mkdir(parents=True, exist_ok=True)
    results = {"bundle": str(args.bundle), "argv": sys.argv[1:]}

    def section(name, run):
        print(f"[reliability] {name} ...", flush=True)
        start = time.monotonic()
        results[name] = run()
        results[name + "_seconds"] = round(time.monotonic() - start, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))

    pipeline = Pipeline.load(args.bundle, threads=args.threads)
    questions = questions_from(args.questions_file, max(args.questions, 1))
    section("fuzz_python", lambda: fuzz_python(pipeline, args.fuzz))
    section("fuzz_manifest", lambda: fuzz_manifest(args.bundle, max(args.fuzz // 5, 1)))
    section("fuzz_passages", lambda: fuzz_passages(max(args.fuzz // 5, 1)))
    reference = [pipeline.ask(q, max_new_tokens=args.max_new_tokens).answer for q in questions]
    clients = [int(c) for c in args.clients.split(",") if c]
    with server(args.bundle, "--max-queue", max(clients) * 2, *(["--threads", args.threads] if args.threads else [])) as (url, pid):
        section("fuzz_http", lambda: fuzz_http(url, args.fuzz))
        section("load", lambda: load(url, questions, clients, args.max_new_tokens, reference))
        section("soak", lambda: soak(url, pid, questions, args.soak, args.max_new_tokens, args.out))
    section("damage", lambda: damage(args.bundle))
    if args.export_kills:
        sources = read_manifest(args.bundle).sources
        encoder, generator, passages = (args.encoder or sources.get("query_encoder"),
                                        args.generator or sources.get("generator"), args.passages or sources.get("passages"))
        if not (encoder and generator and passages):
            raise SystemExit("the export kills need --encoder, --generator and --passages (the manifest does not name them)")
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:
            section("kill_export", lambda: kill_export(encoder, generator, passages, args.export_kills, Path(tmp)))
    if args.distill_recipe:
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:
            section("kill_distill", lambda: kill_distill(args.distill_recipe, Path(tmp)))
    print(report(results))
    (args.out / "report.md").write_text(report(results))
    return 0


def report(r: dict) -> str:
    lines = [f"# Reliability of {r['bundle']}", ""]
    for name in ("fuzz_python", "fuzz_http", "fuzz_manifest", "fuzz_passages"):
        if name in r:
            figures = {k: v for k, v in r[name].items() if k != "crashes"}
            lines.append(f"- {name}: {json.dumps(figures)}")
    if "load" in r:
        lines += ["", "| clients | requests | identical to sequential | errors | p50 ms | p95 ms | answers/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['clients']} | {x['requests']} | {x['identical_to_sequential']} | {x['errors']} | {x['p50_ms']} | "
                  f"{x['p95_ms']} | {x['answers_per_s']} |" for x in r["load"]]
        lines.append("")
    if "soak" in r:
        s = r["soak"]
        lines.append(f"- soak: {s['questions']} questions, {s['failed']} failed, {s['cut_by_repetition']} cut by repetition; "
                     f"RSS {s['rss_after_warmup_mb']} MB after warm-up -> {s['rss_end_mb']} MB ({s['rss_growth_pct']:+.2f}%)")
    if "damage" in r:
        d = r["damage"]
        lines.append(f"- damage: {d['refused_naming_the_file']}/{d['damaged_copies']} damaged copies refused naming the file; "
                     f"newer format: {d['newer_version'][:80]}")
    if "kill_export" in r:
        k = r["kill_export"]
        lines.append(f"- export killed {k['kills']} times (at {k['killed_at_s']} s of {k['export_seconds']} s): "
                     f"{k['half_bundles_at_out']} half bundles at --out, rerun ok: {k['rerun_ok']}, "
                     f"work folders left: {k['work_folders_left_after_rerun']}")
    if "kill_distill" in r:
        k = r["kill_distill"]
        lines.append(f"- distill killed in {k['killed_in']}; --resume finished: {k['resume_ok']} ({k['seconds']} s)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
