"""The training loop shared by every stage: plain PyTorch, checkpointed, resumable, DDP-aware.

A stage gives a model, a list of examples and a `loss_fn(model, batch) -> (loss, parts)`. The data
order is a seeded permutation per epoch, so step n always sees the same batch; a checkpoint holds the
weights, the optimizer, the schedule position and the RNG states, so a resumed run continues exactly
where the interrupted one stopped.

Under torchrun / accelerate launch (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel,
each rank takes every world_size-th example of a batch, and only rank 0 writes.

Two things make a step cheaper without changing what it learns from:
- precision "bf16": the forward pass runs under bf16 autocast (matmuls in bf16, the weights, their
  gradients and AdamW's state stay fp32). `resolve_precision("auto")` picks it where the hardware
  has bf16 matrix units (CUDA with bf16, a CPU with AMX or AVX512-BF16); elsewhere torch emulates
  bf16 and it is slower than fp32.
- batching "length": a stage that says how long each example is (`length=`) gets batches of
  similar lengths, so that little of a step is spent on padding. The examples of each window of 50
  batches of the epoch's permutation are sorted by length and cut into batches, and the batches are
  shuffled (Hugging Face's LengthGroupedSampler does the same). Step n still always sees the same batch.

Each stage's `training.json` says what it used and what it got: precision, examples per hour,
tokens per second, and the share of the tokens it computed that were padding (and what random
batches would have padded).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from contextlib import nullcontext
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


# ---------------------------------------------------------------- precision

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_bf16_units() -> bool:
    """AMX or AVX512-BF16, read off /proc/cpuinfo (elsewhere: False, and "auto" stays fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


def resolve_precision(precision: str) -> str:
    """"auto" -> "bf16" where the hardware has bf16 matrix units, else "fp32"; the others stay."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if bf16_units() else "fp32"


def bf16_units() -> bool:
    """Whether training's matmuls can run in bf16 here at hardware speed."""
    import torch

    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_bf16_units()


def check_precision(precision: str, say: bool = True) -> str:
    """A recipe's precision, resolved, at the start of a run: "bf16" where the hardware lacks bf16
    units is refused (torch would emulate it, far slower than fp32); "auto" says what it chose."""
    resolved = resolve_precision(precision)
    if precision == "bf16" and not bf16_units():
        raise ValueError('run.precision = "bf16": this machine has no bf16 matrix units (no CUDA GPU with bf16, '
                         "no AMX or AVX512-BF16 on the CPU), where torch emulates bf16 dozens of times slower "
                         'than fp32; use "auto" (fp32 here) or "fp32"')
    if precision == "auto" and say:
        print(f"[run] precision auto: {resolved}" + ("" if resolved == "bf16" else " (no bf16 matrix units here)"))
    return resolved


class NonFiniteLoss(RuntimeError):
    pass


def autocast(precision: str, device_type: str = "cpu"):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    import torch

    if resolve_precision(precision) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------- batches

BATCHINGS = ("length", "random")
BUCKET_WINDOW = 50  # batches whose examples are sorted by length together


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths=None) -> list:
    """The epoch's batches of example indices: consecutive slices of a seeded permutation, or with
    `lengths`, batches of examples of similar lengths (see the module's docstring), in random order."""
    rng = np.random.default_rng(seed + epoch)
    order = rng.permutation(n)
    if lengths is not None:
        span = batch_size * BUCKET_WINDOW
        order = np.concatenate([sorted(order[s:s + span], key=lambda j: lengths[j]) for s in range(0, n, span)])
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def padding(batches, lengths) -> tuple[int, int]:
    """(tokens, tokens computed) when each batch is padded to its longest example."""
    real = sum(int(lengths[j]) for b in batches for j in b)
    padded = sum(len(b) * max(int(lengths[j]) for j in b) for b in batches)
    return real, padded


# ---------------------------------------------------------------- the loop

TRAIN_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "log", "rng")


def read_checkpoint(path: Path, desc: str, keys=TRAIN_CHECKPOINT_KEYS) -> dict | None:
    """The stage's checkpoint, or None. Checkpoints are renamed into place whole, so a killed save
    leaves only checkpoint.pt.tmp behind; a checkpoint that still does not read (or lacks one of
    `keys`) is set aside, never half-trusted, and the stage starts again."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not set(keys) <= set(ckpt):
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
    precision: str = "fp32"          # "auto" | "bf16" | "fp32" (resolve_precision)
    batching: str = "random"         # "random" | "length" (where the stage gives example lengths)


def train(model, examples: list, loss_fn, cfg: TrainConfig, stage_dir: Path, desc: str = "train", resume: bool = True,
          length=None) -> list[dict]:
    """Train `model` in place; returns the per-step log ({"step", "loss", ...parts, "seconds", ...}).

    `loss_fn(model, batch)` gets the (possibly DDP-wrapped) model and a list of examples.
    `length(example)`: the tokens it takes when the loss pads a batch to its longest example; given,
    batches can be bucketed by length (cfg.batching) and the padding is reported.
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
    if cfg.batching not in BATCHINGS:
        raise ValueError(f"batching: expected one of {', '.join(BATCHINGS)}, got {cfg.batching!r}")
    precision = resolve_precision(cfg.precision)
    lengths = [length(e) for e in examples] if length is not None else None
    bucketed = lengths if cfg.batching == "length" else None

    def batches_of(epoch):
        return epoch_batches(len(examples), cfg.batch_size, cfg.seed, epoch, bucketed)

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # fused: one kernel over all parameters instead of a loop of small ops per tensor. On this 2-core
    # CPU it took the demo student's optimizer step from 0.56 s to 0.20 s (a 2.7 s step), same losses
    # to five decimals (docs/results-history.md); CPU and CUDA have it, other devices keep the loop.
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                  fused=bool(params) and params[0].device.type in ("cpu", "cuda"))

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
            ckpt = read_checkpoint(ckpt_path, desc)
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
    device_type = next(model.parameters()).device.type
    bar = tqdm(total=total, initial=step, desc=desc, disable=rank != 0)
    batches_epoch, batches = None, []
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches_epoch, batches = epoch, batches_of(epoch)
        batch_ids = batches[i]
        shard = [examples[j] for j in batch_ids[rank::world_size]] or [examples[batch_ids[0]]]
        started = time.perf_counter()
        with autocast(precision, device_type):
            loss, parts = loss_fn(wrapped, shard)
        if not torch.isfinite(loss.detach()).all():
            # before the update: the weights and the last checkpoint stay as they were, for --resume
            named = [getattr(e, "question_id", None) or getattr(getattr(e, "example", None), "question_id", None)
                     for e in shard]
            raise NonFiniteLoss(f"[{desc}] step {step + 1}/{total}: the loss is {float(loss.detach())} ({precision}) on the "
                                f"batch of examples {[int(j) for j in batch_ids]}"
                                + (f" (questions {named})" if any(named) else "")
                                + (f"; the last checkpoint ({ckpt_path}) is intact for --resume" if ckpt_path.exists() else ""))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        entry = {"step": step, "loss": float(loss.detach())}
        entry.update({k: float(v) for k, v in parts.items()})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in entry.items() if k != "step"})
        entry["seconds"] = round(time.perf_counter() - started, 4)
        if lengths is not None:
            entry["tokens"], entry["padded_tokens"] = padding([batch_ids], lengths)
        log.append(entry)
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
        random_batches = [b for epoch in range(cfg.epochs)
                          for b in epoch_batches(len(examples), cfg.batch_size, cfg.seed, epoch)]
        summary = throughput(log, len(examples) * cfg.epochs, precision, cfg.batching if lengths else "random",
                             padding(random_batches, lengths) if lengths else None, model)
        atomic_write_text(stage_dir / TRAINING_FILE, json.dumps(summary, indent=2))
    return log


TRAINING_FILE = "training.json"


def matmul_parameters(model) -> dict:
    """The weights every token multiplies (linear layers, less a language-model head that only the
    answer positions reach), and those of them that train: a step's FLOPs are about
    tokens x (2 x all + 4 x trained) (backward reaches only the trained layers)."""
    import torch

    linear = [(name, m.weight) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
    return {"matmul_parameters": sum(w.numel() for _, w in linear),
            "trainable_matmul_parameters": sum(w.numel() for _, w in linear if w.requires_grad)}


def throughput(log: list[dict], examples: int, precision: str, batching: str, random_padding, model) -> dict:
    """What a training stage used and how fast it went, from its per-step log: the time is the steps'
    own (forward, backward, optimizer), not checkpoints or loading."""
    seconds = sum(e.get("seconds", 0.0) for e in log)
    out = {"precision": precision, "batching": batching, "examples": examples, "steps": len(log),
           "seconds": round(seconds, 2), "examples_per_hour": round(examples / seconds * 3600, 1) if seconds else None,
           "parameters": sum(p.numel() for p in model.parameters()),
           "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
           **matmul_parameters(model)}
    if log and "tokens" in log[0]:
        tokens, padded = sum(e["tokens"] for e in log), sum(e["padded_tokens"] for e in log)
        out.update({"tokens": tokens, "tokens_computed": padded,
                    "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
                    "padding_share": round(1 - tokens / padded, 4),
                    "padding_share_random_batches": round(1 - random_padding[0] / random_padding[1], 4)})
    return out
