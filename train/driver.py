"""`edgerag distill RECIPE --out RUN [--seed-from OTHER_RUN]`: teacher -> student, stage by stage, resumable.

A recipe's family (teacher.kind) picks its stage table: each family's module declares its stages
once, in `STAGES` (in run order), and neither family imports the other. The run folder, the stage
declarations, fingerprints and seeding from another run are edgerag.train.run.

Under torchrun the training stages run on every rank (DDP); the others on rank 0 while the rest wait.
Several processes: `torchrun --nproc_per_node N -m edgerag.cli distill RECIPE --out RUN`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from . import decoder_only_stages, loop, rag_stages
from .loop import atomic_write_text, barrier
from .recipe import Recipe, load_recipe
from .run import Run, RunError, Stage, fingerprint, seed_stage

# teacher.kind -> the module whose STAGES a run of that family goes through
FAMILIES = {"decoder-only": decoder_only_stages, "hf-rag": rag_stages}


def stage_table(recipe: Recipe) -> list[Stage]:
    """Every stage of the recipe's family, in run order (enabled or not)."""
    return FAMILIES[recipe.teacher.kind].STAGES


def plan(recipe: Recipe, stop_after: str | None = None) -> list[Stage]:
    """The stages a run of `recipe` goes through, in order (up to `stop_after`)."""
    table = stage_table(recipe)
    names = [s.name for s in table]
    if stop_after is not None and stop_after not in names:
        raise RunError(f"unknown stage {stop_after!r} (stages: {', '.join(names)})")
    last = names.index(stop_after) if stop_after is not None else len(names) - 1
    return [s for s in table[:last + 1] if s.enabled(recipe)]


def distill(recipe_path, out_dir, resume: bool = False, stop_after: str | None = None, seed_from=None) -> dict | None:
    """Run (or resume) every stage of a recipe into `out_dir`; returns the eval report (None if stopped early).
    `seed_from`: another run folder whose finished stages are reused where their fingerprints match."""
    import torch

    recipe = load_recipe(recipe_path)
    run = Run(out_dir, recipe)
    stages = plan(recipe, stop_after)
    other = None
    if seed_from is not None:
        other = Run(seed_from, recipe)
        if not other.stages_dir.is_dir():
            raise RunError(f"--seed-from {seed_from}: no run there (it has no stages/ folder)")
        if other.out.resolve() == run.out.resolve():
            raise RunError(f"--seed-from {seed_from} is the run itself")
    text = Path(recipe_path).read_text()
    if run.stages_dir.exists():
        if not resume:
            raise RunError(f"{run.out} already holds a run: pass --resume to continue it, or choose another --out")
        # Settings, not text: a recipe whose comments changed still resumes.
        if run.recipe_copy.exists() and \
                dataclasses.asdict(load_recipe(run.recipe_copy, check_models=False)) != dataclasses.asdict(recipe):
            raise RunError(f"{recipe_path} sets other values than the recipe {run.out} was started with "
                           f"({run.recipe_copy}); start a new run instead of resuming")
    rank, world_size = loop.world()
    if recipe.teacher.kind == "hf-rag" and world_size > 1:
        raise RunError("hf-rag recipes run on one process: their training stages reach into the RAG model's "
                       "submodules, past DDP's wrapper (run `edgerag distill`, not torchrun)")
    try:  # every rank refuses alike; rank 0 says what "auto" chose
        loop.check_precision(recipe.run.precision, say=rank == 0)
    except ValueError as e:
        raise RunError(str(e)) from None
    torch.set_flush_denormal(True)  # denormal floats make CPU matmuls several times slower
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    if rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.recipe_copy, text)
    barrier()
    started = time.time()
    timings, seeded = {}, []
    for stage in stages:
        name = stage.name
        fp = None
        if rank == 0 and not run.done(name):
            fp = fingerprint(stage, run)  # its inputs are earlier stages' outputs: all there by now
            if other is not None and seed_stage(stage, run, other, fp):
                seeded.append(name)
        barrier()  # the other ranks see what rank 0 seeded
        skip = run.done(name)
        barrier()  # every rank has looked before rank 0 can run the stage and mark it done
        if skip:
            if rank == 0 and name not in seeded:
                print(f"[{name}] done already, skipped")
            continue
        t0 = time.time()
        loop.seed_everything(recipe.seed)
        if stage.parallel or rank == 0:
            info = stage.function(run)
            timings[name] = round(time.time() - t0, 1)
            run.mark_done(name, {**info, "seconds": timings[name], "fingerprint": fp})
            if rank == 0:  # a finished stage never resumes; its optimizer state is dead weight (660 MB at 55M params)
                (run.stage_dir(name) / "checkpoint.pt").unlink(missing_ok=True)
                print(f"[{name}] finished in {timings[name]:.0f} s")
        barrier()
    if rank == 0:
        print(f"distill: {time.time() - started:.0f} s in all; stages: {timings}"
              + (f"; seeded from {other.out}: {', '.join(seeded)}" if seeded else ""))
    if stop_after is None and run.eval_report.exists():
        return json.loads(run.eval_report.read_text())
    return None
