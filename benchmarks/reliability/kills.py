"""`edgerag export` and `edgerag distill` SIGKILLed mid-write: no half bundle may look whole, and a
killed distillation resumes to the end."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def looks_complete(bundle: Path) -> bool:
    from edgerag.runtime import BundleError, verify

    try:
        verify(bundle)
        return True
    except BundleError:
        return False


def kill_export(encoder: str, generator: str, passages: str, kills: int, workdir: Path, seed: int = 0,
                extra: tuple = ()) -> dict:
    """SIGKILL `edgerag export` at random points; nothing at --out may look like a bundle unless it is
    whole, and the export run again afterwards succeeds."""
    rng = random.Random(seed)
    out = workdir / "bundle"
    command = [sys.executable, "-m", "edgerag.cli", "export", "--query-encoder", encoder, "--generator", generator,
               "--passages", passages, "--out", str(out), *extra]
    start = time.monotonic()
    full = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if full.returncode:
        raise RuntimeError(f"export failed: {full.stderr[-1000:]}")
    shutil.rmtree(out)
    points, half_bundles = [], 0
    for _ in range(kills):
        at = rng.uniform(0.05, 1.0) * seconds
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        points.append(round(at, 2))
        if out.exists():
            half_bundles += not looks_complete(out)
            shutil.rmtree(out)
    again = subprocess.run(command, capture_output=True, text=True)
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    return {"kills": kills, "export_seconds": round(seconds, 1), "killed_at_s": points,
            "half_bundles_at_out": half_bundles, "rerun_ok": again.returncode == 0 and looks_complete(out),
            "work_folders_left_after_rerun": left}


def training_stages(recipe: str) -> list[str]:
    """The recipe's training stages (those that run under DDP), in run order."""
    from edgerag.train.decoder_only_stages import STAGES
    from edgerag.train.recipe import load_recipe

    r = load_recipe(recipe)
    return [s.name for s in STAGES if s.parallel and s.enabled(r)]


def kill_distill(recipe: str, workdir: Path, timeout: float = 3600) -> dict:
    """SIGKILL `edgerag distill` once inside each training stage of the recipe, as soon as the stage has
    started, `--resume` after each kill; the run must finish with every stage done."""
    run = workdir / "run"
    base = [sys.executable, "-m", "edgerag.cli", "distill", recipe, "--out", str(run)]
    killed_in, started = [], time.monotonic()
    for stage in training_stages(recipe):
        proc = subprocess.Popen(base + (["--resume"] if (run / "stages").exists() else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stage_dir = run / "stages" / stage
        while proc.poll() is None and time.monotonic() - started < timeout:
            # at once inside the stage (a finished stage's folder stays): a tiny stage can end within 0.1 s
            if stage_dir.exists() and not (stage_dir / "done").exists():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_in.append(stage)
                break
            time.sleep(0.05)
        if proc.poll() is None:   # out of time
            proc.kill()
            proc.wait()
    final = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=timeout)
    done = sorted(p.parent.name for p in (run / "stages").glob("*/done"))
    return {"killed_in": killed_in, "resume_ok": final.returncode == 0 and (run / "eval.json").exists(),
            "stages_done": done, "seconds": round(time.monotonic() - started, 1),
            "error": final.stderr.strip().splitlines()[-1:] if final.returncode else []}
