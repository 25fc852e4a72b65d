"""The size/quality curve: students of one teacher side by side, with their bundles' size and speed.

    python -m edgerag.benchmarks.curve runs/medium runs/curve-70 runs/curve-55 runs/curve-40 [--out runs/curve]

Every run folder holds an `eval.json` from `edgerag distill` (the same eval questions for all of
them); the first run's teacher is the reference, and students are listed largest first. Where a
run has `bundle/` (or the first run has `teacher-bundle/`), the generator graphs are timed together
in this process, rounds interleaved (`measure_speed` of benchmarks/probes/generator.py), so a noisy
machine slows them alike. Writes curve.json, curve.md and curve.png into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgerag.benchmarks.probes.generator import graph_megabytes, measure_speed
from edgerag.runtime.manifest import MANIFEST, read_manifest


def collect(runs: list[Path]) -> list[dict]:
    first = json.loads((runs[0] / "eval.json").read_text())
    rows = [{"name": f"{runs[0].name}/teacher", "bundle": runs[0] / "teacher-bundle", **first["teacher"]}]
    for run in runs:
        report = json.loads((run / "eval.json").read_text())
        if report["n_questions"] != first["n_questions"] or report["dataset"] != first["dataset"]:
            raise SystemExit(f"{run}/eval.json is on other questions than {runs[0]}/eval.json")
        info = json.loads((run / "stages" / "student_init" / "info.json").read_text())
        rows.append({"name": f"{run.name}/student", "bundle": run / "bundle", "student": info["generator"],
                     **report["student"]})
    teacher = rows[0]
    rows[1:] = sorted(rows[1:], key=lambda r: -r["generator_params"])   # largest student first; ties keep the given order
    for row in rows:
        row["params_pct"] = 100 * row["generator_params"] / teacher["generator_params"]
        for key in ("f1", "f1_gold"):
            row[f"{key}_pct_of_teacher"] = 100 * row[key] / teacher[key] if teacher[key] else None
        row["recall@5_pct_of_teacher"] = 100 * row["recall@5"] / teacher["recall@5"] if teacher["recall@5"] else None
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/curve"))
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rows = collect(args.runs)
    graphs = {r["name"]: r["bundle"] / read_manifest(r["bundle"]).generator.onnx for r in rows
              if (r["bundle"] / MANIFEST).exists()}
    speed = measure_speed(list(graphs.values()), args.prompt_tokens, 17, args.threads, args.rounds) if graphs else {}
    for row in rows:
        graph = graphs.get(row["name"])
        if graph is not None:
            row.update(speed[graph], bundle_mb=read_manifest(row["bundle"]).megabytes, generator_mb=graph_megabytes(graph))
        row["bundle"] = str(row["bundle"]) if graph is not None else None

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps(rows, indent=2))
    first = json.loads((args.runs[0] / "eval.json").read_text())
    lines = [f"{len(rows) - 1} students of one teacher, on the same {first['n_questions']} questions of "
             f"{first['dataset']} (k={first['k']}); speed: {args.prompt_tokens}-token prompt, {args.threads} threads, "
             f"medians of {args.rounds} interleaved rounds.\n",
             "| model | generator params | % of teacher | F1 | F1 gold | F1 % of teacher | F1 gold % | recall@5 | "
             "bundle MB | generator MB | prefill ms | decode ms/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        lines.append(f"| {r['name']} | {r['generator_params'] / 1e6:.1f}M | {r['params_pct']:.0f}% | {r['f1']:.1f} | "
                     f"{r['f1_gold']:.1f} | {num('f1_pct_of_teacher', '.0f')}% | {num('f1_gold_pct_of_teacher', '.0f')}% | "
                     f"{r['recall@5']:.1f} | {num('bundle_mb', '.0f')} | {num('generator_mb', '.0f')} | "
                     f"{num('prefill_ms', '.0f')} | {num('decode_ms_per_token', '.1f')} |")
    (args.out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, args.out / "curve.png")
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["params_pct"])
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["params_pct"] for r in rows]
    ax.plot(x, [r["f1"] for r in rows], "o-", label="F1, open-domain")
    ax.plot(x, [r["f1_gold"] for r in rows], "s--", label="F1, gold passage")
    for r in rows:
        ax.annotate(r["name"].split("/")[0] if "student" in r["name"] else "teacher", (r["params_pct"], r["f1_gold"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("generator parameters, % of the teacher")
    ax.set_ylabel("F1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
