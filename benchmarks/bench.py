"""`edgerag bench`: the bundle against the teacher, the student and other runtimes, on this machine.

    edgerag bench --bundle B [--bundle B2 ...] [--teacher RUN/teacher] [--student RUN/student]
                  --questions ../shared/data/xquad-en.json.gz [--n 200] [--threads 1,2]
                  [--systems ...] [--index-sizes 10000,100000,1000000]
                  [--index-corpus squad-v1.1-train.json.gz --index-queries squad-v1.1-dev.json.gz] --out RESULTS

Every (system, threads) runs in a fresh process (edgerag.benchmarks.worker) so its peak RSS and cold start
are its own. By default every system runs its own full path on the same questions: its own retriever,
and then a bundle reads what it reads by itself (its compressed context, where it has one) and the
others read their top-k passages (--k) whole; every row reports its mean prompt tokens and its own
EM/F1. --shared-passages instead gives every system the first bundle's top-k passages (a compressed
student still selects its pieces of them), which isolates generation speed. Writes RESULTS/results.json, RESULTS/report.md and PNG plots.

This module imports no torch: heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SYSTEMS = ("teacher-torch", "student-torch", "bundle", "optimum-ort", "ortgenai-int4", "ortgenai-fp32")



def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="latency, memory, quality and floors of bundles vs baselines (workstation)")
    p.add_argument("--bundle", action="append", required=True, help="a bundle directory (repeatable)")
    p.add_argument("--teacher", help="a run's teacher/ folder (query_encoder/ + generator/)")
    p.add_argument("--student", help="a run's student/ folder")
    p.add_argument("--questions", required=True, help="SQuAD JSON (optionally .gz)")
    p.add_argument("--n", type=int, default=200, help="questions (a seeded sample)")
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma-separated, from: %(default)s ('bundle' means every --bundle)")
    p.add_argument("--index-sizes", default="10000,100000,1000000", help="random vectors for the hnswlib sweep ('' skips it)")
    p.add_argument("--index-corpus", default="squad-v1.1-train.json.gz",
                   help="a real corpus for the hnswlib sweep, embedded with the first bundle's encoder and cached: a "
                        "SQuAD file (its questions and passages) or JSONL passages; a bare name is looked up in the data "
                        "folder ('' skips it)")
    p.add_argument("--index-queries", default="squad-v1.1-dev.json.gz",
                   help="SQuAD file whose questions query the real corpus (200 of them, seeded)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the first bundle's")
    p.add_argument("--prompt-lookup", default="",
                   help="comma-separated tokens drafted per decode step by prompt lookup, each value a row of its "
                        "own for every bundle, e.g. '4,0' (default: the runtime's)")
    p.add_argument("--k", type=int, default=3, help="passages read whole by systems without a path of their own "
                   "(the teacher, PyTorch students, other runtimes)")
    p.add_argument("--shared-passages", action="store_true",
                   help="every system answers from the first bundle's top-k passages (generation speed like for like)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "edgerag" / "bench"),
                   help="baseline models and the onnxruntime-genai venv are built here once")
    p.add_argument("--quick-machine", action="store_true", help="small machine probes (for tests)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every system this many times, interleaved, and pool its questions (a noisy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from edgerag.benchmarks import report

    results = run_bench(args)
    out = Path(args.out)
    report.write(results, out)
    log(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")
    return 0


# ---------------------------------------------------------------------------------------------- plan

def quant_name(manifest) -> str:
    method = manifest.generator.quantization_method
    return "fp32" if method == "none" else method


def plan_systems(args, bundles: list[Path], manifests: list, cache: Path) -> tuple[list[dict], list[dict]]:
    """(systems to run, systems skipped with their reasons)."""
    from edgerag.benchmarks import baselines

    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in DEFAULT_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(DEFAULT_SYSTEMS)}")
    first, python = bundles[0], sys.executable
    source = manifests[0].sources["generator"]
    if args.student:
        source_candidates = [source, str(Path(args.student) / "generator")]
    else:
        source_candidates = [source]
    plan, skipped = [], []
    for name in wanted:
        try:
            if name in ("teacher-torch", "student-torch"):
                folder = args.teacher if name == "teacher-torch" else args.student
                if not folder:
                    skipped.append({"name": name, "reason": f"no --{name.split('-')[0]} folder given"})
                    continue
                plan.append({"name": name, "kind": "torch", "folder": str(Path(folder).resolve()), "python": python,
                             "note": "PyTorch fp32; its cold start includes embedding the bundle's passages "
                                     "for its own hnswlib index"})
            elif name == "bundle":
                seen, bases = set(), set()
                lookups = [int(v) for v in args.prompt_lookup.split(",") if v.strip()] or [None]
                for b, m in zip(bundles, manifests):
                    base = f"bundle-{quant_name(m)}"
                    if base in bases and "block_size" in m.generator.quantization:
                        base += f"-b{m.generator.quantization['block_size']}"  # the same option, other blocks
                    bases.add(base)
                    for lookup in lookups:
                        label = base if lookup is None else f"{base}-lookup{lookup}"
                        while label in seen:
                            label += "'"
                        seen.add(label)
                        plan.append({"name": label, "kind": "bundle", "bundle": str(b), "python": python,
                                     "quant": quant_name(m), "prompt_lookup": lookup})
            elif name == "optimum-ort":
                folder = baselines.optimum_folder(first, _first_resolvable(source_candidates), cache)
                plan.append({"name": name, "kind": "optimum", "model_dir": str(folder), "python": python,
                             "quant": quant_name(manifests[0]), "note": f"on {first.name}/generator.onnx"})
            elif name.startswith("ortgenai-"):
                precision = name.split("-", 1)[1]
                gpython, folder = baselines.ortgenai_folder(_first_resolvable(source_candidates), precision, cache, log)
                plan.append({"name": name, "kind": "ortgenai", "model_dir": str(folder), "python": str(gpython),
                             "quant": precision})
        except baselines.Skip as e:
            skipped.append({"name": name, "reason": str(e)})
        except Exception as e:  # noqa: BLE001 - a baseline that cannot be prepared is reported, not fatal
            skipped.append({"name": name, "reason": f"{type(e).__name__}: {e}"})
    for s in skipped:
        log(f"skipping {s['name']}: {s['reason']}")
    return plan, skipped


def _first_resolvable(candidates: list[str]) -> str:
    from edgerag.models import resolve

    errors = []
    for c in candidates:
        try:
            resolve(c)
            return c
        except (FileNotFoundError, ValueError) as e:
            errors.append(str(e))
    raise FileNotFoundError("; ".join(errors))


# ---------------------------------------------------------------------------------------------- run

def shared_passages(bundle: Path, questions, k: int) -> list[list[tuple[str, str]]]:
    """The first bundle's top-k for every question: what every system generates from."""
    from edgerag.runtime import Pipeline

    pipeline = Pipeline.load(bundle, retrieval_only=True)
    rows, _ = pipeline.search(pipeline.encoder.encode([q.question for q in questions]), k)
    return [[(p["title"], p["text"]) for p in pipeline.passages_at(r)] for r in rows]


def run_worker(system: dict, spec: dict, workdir: Path, timeout: float | None = None) -> dict:
    spec = {**spec, **{k: v for k, v in system.items() if k != "python"}}
    tag = f"{system['name']}-t{spec['threads']}" + (f"-r{spec['round'] + 1}" if spec.get("round") else "")
    tag = tag.replace("'", "p")
    spec_path, out_path, err_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json", workdir / f"{tag}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    spec["launched"] = time.time()
    spec_path.write_text(json.dumps(spec))
    with open(err_path, "w") as err:
        r = subprocess.run([system["python"], "-m", "edgerag.benchmarks.worker", str(spec_path), str(out_path)],
                           env=env, stdout=err, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode or not out_path.exists():
        lines = [l for l in err_path.read_text().splitlines() if l.strip()]
        raise RuntimeError(f"worker exited {r.returncode}: {lines[-1][:400] if lines else 'no output'}")
    return json.loads(out_path.read_text())


def run_index(sizes: list[int], corpus: str | None, queries: str | None, bundle: Path, manifest, cache: Path,
              workdir: Path) -> list[dict]:
    """hnswlib rows, each in its own process: a real corpus embedded with the bundle's encoder (cached),
    then random unit vectors at each size (the worst case)."""
    idx = manifest.index
    jobs = []
    if corpus:
        jobs.append((Path(corpus).name, ["corpus", str(bundle), corpus, queries, str(cache / "index"), str(idx.M),
                                         str(idx.ef_construction)]))
    jobs += [(f"{n} random", ["random", str(n), str(idx.dim), str(idx.M), str(idx.ef_construction)]) for n in sizes]
    rows = []
    for i, (label, args) in enumerate(jobs):
        out = workdir / f"index-{i}.json"
        log(f"index: {label}")
        r = subprocess.run([sys.executable, "-m", "edgerag.benchmarks.index_scale", *args, str(out)],
                           capture_output=True, text=True)
        if r.returncode:
            rows.append({"vectors": label, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append(json.loads(out.read_text()))
    return rows


def _existing_data(name: str | None) -> str | None:
    """A data file's path (bare names in the data folder), or None where it is not given or not there."""
    from edgerag.data import data_path

    if not name:
        return None
    path = data_path(name)
    if not path.exists():
        log(f"index: {path} not found, its rows are skipped")
        return None
    return str(path)


def run_bench(args) -> dict:
    from edgerag.benchmarks import machine, summary
    from edgerag.runtime.manifest import read_manifest
    from edgerag.data import read_squad, sample_questions

    started = time.time()
    bundles = [Path(b).resolve() for b in args.bundle]
    manifests = [read_manifest(b) for b in bundles]
    threads = _ints(args.threads)
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "work"
    workdir.mkdir(exist_ok=True)

    _, questions, _ = read_squad(args.questions)
    questions = sample_questions(questions, args.n, seed=args.seed)
    first = manifests[0]
    shared = getattr(args, "shared_passages", False)
    k = first.generation.k if shared else getattr(args, "k", 3)
    max_new_tokens = args.max_new_tokens or first.generation.max_new_tokens
    if shared:
        log(f"{len(questions)} questions; shared passages: top-{k} of {bundles[0].name}")
        passages = shared_passages(bundles[0], questions, k)
    else:
        log(f"{len(questions)} questions; every system on its own path (whole passages: top-{k})")
        passages = None

    log("machine limits")
    limits = machine.measure(threads, quick=args.quick_machine)

    plan, skipped = plan_systems(args, bundles, manifests, cache)
    spec = {"bundle": str(bundles[0]), "questions": [{"question": q.question, "answers": list(q.answers),
                                                      "passage_id": q.passage_id} for q in questions],
            "passages": passages, "k": k, "max_new_tokens": max_new_tokens,
            "max_context": first.generator.max_context, "scratch": str(workdir / "scratch")}
    rounds = max(1, args.rounds)
    by_system: dict[tuple[str, int], list[dict]] = {}
    failed = set()
    with machine.BandwidthProbe(mb=32 if args.quick_machine else 256) as probe:
        spec["bandwidth_probe"] = probe.address  # each worker measures the bandwidth after each question
        # rounds interleave the systems, so that a slow minute of a shared machine falls on all of them
        for round_ in range(rounds):
            for system in plan:
                for t in threads:
                    if (system["name"], t) in failed:
                        continue
                    log(f"{system['name']} with {t} thread(s)" + (f", round {round_ + 1} of {rounds}" if rounds > 1 else ""))
                    try:
                        result = run_worker(system, {**spec, "threads": t, "round": round_}, workdir)
                        result["kind"], result["quant"], result["note"] = system["kind"], system.get("quant"), system.get("note")
                        by_system.setdefault((system["name"], t), []).append(result)
                    except Exception as e:  # noqa: BLE001 - one failing system must not lose the others' results
                        log(f"{system['name']} (t={t}) failed: {e}")
                        skipped.append({"name": system["name"], "threads": t, "reason": f"failed: {e}"})
                        failed.add((system["name"], t))
                        by_system.pop((system["name"], t), None)
    raw = [summary.merge_rounds(results) for results in by_system.values()]

    corpus, corpus_queries = _existing_data(args.index_corpus), _existing_data(args.index_queries)
    index_rows = run_index(_ints(args.index_sizes), corpus if corpus_queries else None, corpus_queries,
                           bundles[0], first, cache, workdir)

    rows = [summary.system_row(r, limits) for r in raw]
    return {"machine": {k: limits[k] for k in ("cpu", "cores", "bandwidth_gb_s", "matmul_gflops")},
            "machine_detail": {"ort_matmul_gflops": limits["ort_matmul_gflops"]},
            "systems": rows, "index": index_rows, "skipped": skipped,
            "setup": {"questions": str(args.questions), "n": len(questions), "threads": threads, "k": k,
                      "max_new_tokens": max_new_tokens, "rounds": rounds, "shared_passages_from": str(bundles[0]) if shared else None,
                      "bundles": [str(b) for b in bundles], "teacher": args.teacher, "student": args.student,
                      "seconds": round(time.time() - started, 1), "argv": sys.argv[1:]}}
