"""The training loop shared by every stage: plain PyTorch, checkpointed, resumable, DDP-aware.

A stage gives a model, a list of examples and a `loss_fn(model, batch) -> (loss, parts)`. The data
order is a seeded permutation per epoch, so step n always sees the same batch; a checkpoint holds the
weights, the optimizer, the schedule position and the RNG states, so a resumed run continues exactly
where the interrupted one stopped.

Under torchrun / accelerate launch (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel,
each rank takes every world_size-th example of a batch, and only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A test hook standing in for a killed process: raise after the checkpoint of this step.
INTERRUPT_AFTER_STEP: int | None = None


class Interrupted(RuntimeError):
    pass


# ---------------------------------------------------------------- distributed helpers

def world() -> tuple[int, int]:
    """(rank, world_size), initializing the process group on first use under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        import datetime

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # Long timeout: ranks > 0 wait at a barrier while rank 0 alone indexes or evaluates.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ---------------------------------------------------------------- atomic files

def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_folder_atomic(folder: Path, write) -> None:
    """`write(tmp)` fills a temporary folder beside `folder`, which is then swapped in: a crash never
    leaves half a folder where a whole one is expected."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained_atomic(model, tokenizer, folder: Path) -> None:
    def write(tmp):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_folder_atomic(folder, write)


def copy_tree_atomic(source: Path, folder: Path) -> None:
    import shutil

    write_folder_atomic(folder, lambda tmp: shutil.copytree(source, tmp))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------- the loop

def _read_checkpoint(path: Path, desc: str) -> dict | None:
    """The stage's checkpoint, or None. Checkpoints are renamed into place whole, so a killed save
    leaves only checkpoint.pt.tmp behind; a checkpoint that still does not read is set aside, never
    half-trusted, and the stage starts again."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not {"model", "optimizer", "scheduler", "step", "log", "rng"} <= set(ckpt):
            raise ValueError("keys missing")
        return ckpt
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is set aside the same way
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        print(f"[{desc}] checkpoint {path} does not read ({type(e).__name__}: {e}); moved to {aside.name}, "
              "starting the stage again")
        return None


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 4
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 5
    checkpoint_every: int = 50
    seed: int = 0
    max_grad_norm: float = 1.0


def train(model, examples: list, loss_fn, cfg: TrainConfig, stage_dir: Path, desc: str = "train", resume: bool = True) -> list[dict]:
    """Train `model` in place; returns the per-step log ({"step", "loss", ...parts}).

    `loss_fn(model, batch)` gets the (possibly DDP-wrapped) model and a list of examples.
    """
    import torch
    from tqdm.auto import tqdm

    rank, world_size = world()
    stage_dir = Path(stage_dir)
    ckpt_path = stage_dir / "checkpoint.pt"
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if total == 0:
        return []

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    def lr_at(step):  # linear warmup, then linear decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 1.0 - 0.9 * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    step, log = 0, []
    seed_everything(cfg.seed)
    ckpt = None
    if resume:  # rank 0 reads the checkpoint (setting aside one that does not read) before the others do
        if rank == 0:
            ckpt = _read_checkpoint(ckpt_path, desc)
        barrier()
        if rank != 0 and ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, log = ckpt["step"], ckpt["log"]
        _set_rng_state(ckpt["rng"])
        print(f"[{desc}] resumed from step {step}/{total}")

    wrapped = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device().index] if device().type == "cuda" else None)
    model.train()
    bar = tqdm(total=total, initial=step, desc=desc, disable=rank != 0)
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        order = np.random.default_rng(cfg.seed + epoch).permutation(len(examples))
        batch_ids = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        shard = [examples[j] for j in batch_ids[rank::world_size]] or [examples[batch_ids[0]]]
        loss, parts = loss_fn(wrapped, shard)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        entry = {"step": step, "loss": float(loss.detach())}
        entry.update({k: float(v) for k, v in parts.items()})
        log.append(entry)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in entry.items() if k != "step"})
        if step % cfg.checkpoint_every == 0 and step < total:
            if rank == 0:
                atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "step": step, "log": log,
                                   "rng": _rng_state()}, ckpt_path)
            barrier()
            if INTERRUPT_AFTER_STEP is not None and step >= INTERRUPT_AFTER_STEP:
                raise Interrupted(f"interrupted after step {step}")
    bar.close()
    model.eval()
    if rank == 0:
        atomic_write_text(stage_dir / "log.jsonl", "".join(json.dumps(e) + "\n" for e in log))
    return log
