"""What output-and-gradient distillation costs per step, against plain logit KD, on a run's own
student and cached KD examples: `python -m edgerag.benchmarks.probes.gradient_kd RUN [--steps 6]`.

Each mode trains a fresh copy of the run's starting student for a few steps in its own process (so
its peak RSS is its own), on the same examples: "plain" (the recipe's loss), "gradient" (the same
plus gradient matching, the teacher's projected input gradients computed first and not timed).
Reports seconds per step (the first step is warm-up and left out) and the process's peak RSS
above what the models took when loaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edgerag.benchmarks.process_memory import peak_rss_mb


def worker(run_dir: str, mode: str, steps: int, weight: float, projections: int) -> dict:
    import torch

    from edgerag.models import load_generator
    from edgerag.train.distill import KDExample, disable_dropout, generator_loss_fn, teacher_cache
    from edgerag.train.gradient import projection
    from edgerag.train.run import Run
    from edgerag.train.recipe import load_recipe
    from edgerag.train.teacher import Example

    torch.set_flush_denormal(True)
    run = Run(run_dir, load_recipe(Path(run_dir) / "recipe.toml", check_models=False))
    cfg = run.recipe.distill_generator
    saved = torch.load(run.kd_cache, weights_only=False)
    n = steps * cfg.batch_size
    examples = [Example(**e) for e in saved["examples"][:n]]
    caches = saved["cache"][:n]
    student, tok = load_generator(run.student_generator_start)
    disable_dropout(student)
    P = None
    if mode == "gradient":
        teacher, _ = load_generator(run.teacher_generator)
        P = projection(teacher.config.vocab_size, projections, run.recipe.seed)
        gradients = teacher_cache(teacher, examples, tok.pad_token_id, cfg.temperature, cfg.top_k, gradient_projection=P)
        caches = [{**c, "gradient": g["gradient"]} for c, g in zip(caches, gradients)]
        del teacher
        student.config._attn_implementation = "eager"
    import gc

    gc.collect()
    try:  # reset the peak to the current RSS, so the teacher loaded above does not count (Linux)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    loaded = peak_rss_mb()
    loss_fn = generator_loss_fn(tok.pad_token_id, cfg.temperature, cfg.alpha, cfg.hidden_weight,
                                weight if mode == "gradient" else 0.0, P)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr)
    student.train()
    times = []
    for step in range(steps):
        batch = [KDExample(e, c) for e, c in zip(examples[step * cfg.batch_size:(step + 1) * cfg.batch_size],
                                                  caches[step * cfg.batch_size:(step + 1) * cfg.batch_size])]
        start = time.perf_counter()
        loss, _ = loss_fn(student, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    warm = times[1:] or times
    return {"mode": mode, "steps": steps, "batch_size": cfg.batch_size, "seconds_per_step": sum(warm) / len(warm),
            "loaded_rss_mb": loaded, "peak_rss_mb": peak_rss_mb(), "training_rss_mb": peak_rss_mb() - loaded}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder with stages/teacher_logits/cache.pt")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--weight", type=float, default=0.1, help="gradient_weight")
    p.add_argument("--projections", type=int, default=16)
    p.add_argument("--worker", choices=("plain", "gradient"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.run, args.worker, args.steps, args.weight, args.projections)))
        return 0
    rows = []
    for mode in ("plain", "gradient"):
        out = subprocess.run([sys.executable, "-m", "edgerag.benchmarks.probes.gradient_kd", args.run, "--steps", str(args.steps),
                              "--weight", str(args.weight), "--projections", str(args.projections), "--worker", mode],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| mode | s / step | peak RSS MB | above the loaded models, MB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {r['training_rss_mb']:.0f} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
