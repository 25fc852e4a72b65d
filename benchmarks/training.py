"""How fast training learns per CPU-second: each training stage of one or more runs, side by side
with the matmul throughput this machine reaches in torch, measured in the same command.

    python -m edgerag.benchmarks.training RUN [RUN ...] [--threads N] [--out FILE.json]

Per stage it prints the precision and batching it used, examples per hour and tokens per second
(of the steps' own time: forward, backward, optimizer; not loading or checkpoints), the share of
computed tokens that were padding (and what random batches would have padded), and the model FLOP/s
it reached as a share of the machine's fp32 and bf16 GEMM throughput. Model FLOPs are tokens
computed x (2 x matmul weights + 4 x trained matmul weights); attention scores are left out, so the
share is a lower bound. The figures come from each stage's info.json (`training`, written by
edgerag.train.loop); a stage trained before those were recorded shows its stage time only.

The GEMM figures are torch's 2048 x 2048 matmul (512 where that is very slow), best of a few,
at the threads given. On a CPU
without bf16 units (no AMX, no AVX512-BF16) torch emulates bf16 and it is slower than fp32: that is
what `precision = "auto"` avoids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .machine import _best, cpu_name

TRAINING_STAGES = ("teacher_finetune", "distill_encoder", "distill_general", "distill_generator")


def gemm_gflops(dtype_name: str, n: int = 2048, repeats: int = 3) -> tuple[float, int]:
    """torch's n x n matmul throughput, best of `repeats`; a 512 x 512 probe first, and where that is
    slow (emulated bf16 runs at a few GFLOP/s), its figure: 2048 would take minutes. (GFLOP/s, size)"""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    def best_of(size):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        return 2 * size ** 3 / _best(lambda: torch.mm(a, b), repeats) / 1e9

    probe = best_of(512)
    return (probe, 512) if probe < 10 else (best_of(n), n)


def stage_rows(run: Path) -> list[dict]:
    rows = []
    for stage in TRAINING_STAGES:
        path = run / "stages" / stage / "info.json"
        if not path.exists():
            continue
        info = json.loads(path.read_text())
        training = info.get("training")
        row = {"run": run.name, "stage": stage, "stage_seconds": info.get("seconds")}
        if training is None:  # a run from before the loop reported its throughput
            examples = info.get("examples")
            row.update(precision="fp32", batching="random", examples=examples,
                       examples_per_hour=round(examples / info["seconds"] * 3600, 1) if examples and info.get("seconds") else None)
        else:
            row.update(training)
            if training.get("tokens_computed") and training.get("seconds"):
                flops = training["tokens_computed"] * (2 * training["matmul_parameters"] + 4 * training["trainable_matmul_parameters"])
                row["model_gflops"] = round(flops / training["seconds"] / 1e9, 1)
        rows.append(row)
    return rows


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(rows: list[dict], peaks: dict) -> str:
    head = ["run", "stage", "precision", "batching", "examples", "train s", "examples/h", "tokens/s",
            "padding (random → used)", "model GFLOP/s", "of fp32 GEMM", "of bf16 GEMM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        padding = "—"
        if "padding_share" in r:
            padding = f"{r['padding_share_random_batches']:.1%} → {r['padding_share']:.1%}"
        gflops = r.get("model_gflops")
        shares = [f"{gflops / peaks[p]:.0%}" if gflops and peaks.get(p) else "—" for p in ("fp32", "bf16")]
        lines.append("| " + " | ".join([r["run"], r["stage"], r.get("precision", "—"), r.get("batching", "—"),
                                        _cell(r.get("examples")), _cell(r.get("seconds", r.get("stage_seconds"))),
                                        _cell(r.get("examples_per_hour"), 0), _cell(r.get("tokens_per_second"), 0),
                                        padding, _cell(gflops), *shares]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m edgerag.benchmarks.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (edgerag distill --out)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the GEMM figures (0: torch's default)")
    parser.add_argument("--out", type=Path, help="also write the rows and the GEMM figures as JSON here")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "stages").is_dir()]
    if missing:
        parser.error(f"not a run folder (no stages/ inside): {', '.join(missing)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from edgerag.train.loop import bf16_units

    measured = {p: gemm_gflops(p) for p in ("fp32", "bf16")}
    peaks = {p: round(g, 1) for p, (g, _) in measured.items()}
    rows = [row for run in args.runs for row in stage_rows(run)]
    print(f"{cpu_name()}, {torch.get_num_threads()} torch threads, bf16 units: "
          f"{'yes' if bf16_units() else 'no'}; torch GEMM: "
          + ", ".join(f"{p} {g:.1f} GFLOP/s ({n}²)" for p, (g, n) in measured.items()))
    print(table(rows, peaks))
    if args.out:
        from edgerag.train.loop import atomic_write_text

        atomic_write_text(args.out, json.dumps({"cpu": cpu_name(), "threads": torch.get_num_threads(),
                                                "gemm_gflops": peaks,
                                                "gemm_size": {p: n for p, (_, n) in measured.items()}, "stages": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
