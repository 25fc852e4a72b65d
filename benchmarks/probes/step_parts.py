"""Where a generator distillation step's time goes: forward, backward and the optimizer, with torch's
fused AdamW against its per-tensor loop, on a run's own starting student and cached KD examples:
`python -m edgerag.benchmarks.probes.step_parts RUN [--steps 12]`.

Each optimizer trains a fresh copy of the student (the recipe's train_layers, loss and batch size) on
the same batches of similar lengths; the first two steps are warm-up and left out. The losses are
printed too: both optimizers should give the same ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def step_parts(run_dir: str, steps: int, fused: bool) -> dict:
    import torch

    from edgerag.models import load_generator
    from edgerag.train.distill import KDExample, generator_loss_fn
    from edgerag.train.recipe import load_recipe
    from edgerag.train.run import Run
    from edgerag.train.student import train_top_layers
    from edgerag.train.teacher import Example, example_length

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    run = Run(run_dir, load_recipe(Path(run_dir) / "recipe.toml", check_models=False))
    cfg = run.recipe.distill_generator
    saved = torch.load(run.kd_cache, weights_only=False)
    examples = sorted((KDExample(Example(**e), c) for e, c in zip(saved["examples"], saved["cache"])),
                      key=lambda kd: example_length(kd.example))
    size = cfg.batch_size
    middle = max(0, len(examples) // 2 - steps * size // 2)  # batches of typical length
    batches = [examples[i:i + size] for i in range(middle, middle + steps * size, size)]
    student, tok = load_generator(run.student_generator_start)
    train_top_layers(student, cfg.train_layers)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=fused)
    loss_fn = generator_loss_fn(tok.pad_token_id, cfg.temperature, cfg.alpha, cfg.hidden_weight)
    student.train()
    seconds, losses = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}, []
    for i, batch in enumerate(batches):
        a = time.perf_counter()
        loss, _ = loss_fn(student, batch)
        b = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        c = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        d = time.perf_counter()
        losses.append(round(float(loss), 5))
        if i >= 2:
            for part, spent in zip(seconds, (b - a, c - b, d - c)):
                seconds[part] += spent
    timed = max(len(batches) - 2, 1)
    return {"optimizer_kind": "fused" if fused else "per-tensor loop", "trained_params": sum(p.numel() for p in params),
            **{f"{part}_s": round(spent / timed, 3) for part, spent in seconds.items()}, "losses": losses}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder with cached teacher logits (stages/teacher_logits)")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args(argv)
    for fused in (False, True):
        print(json.dumps(step_parts(args.run, args.steps, fused)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
