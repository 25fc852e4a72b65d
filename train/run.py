"""A distillation run: its folder, the machinery of a stage table, and reuse of another run's stages.

`Run` names every path a run's stages read and write, once. A `Stage` declares one step: its function,
the files it reads (inputs), what it writes outside its own `RUN/stages/<name>/` folder (outputs), the
recipe values its result depends on (settings), whether it runs on every DDP rank, and whether the
recipe enables it. Each family's module holds its table of them (edgerag.train.decoder_only_stages,
edgerag.train.rag_stages); edgerag.train.driver runs a recipe's.

A finished stage writes `RUN/stages/<name>/done`, and in `info.json` its fingerprint: a hash of its
name, its settings and the contents of its inputs. `--resume` skips finished stages and an
interrupted training stage continues from its last checkpoint. `--seed-from OTHER_RUN` takes a
stage from another run, as hard links, where that run finished it with the fingerprint it has here:
the points of a curve share one teacher, its index, its fine-tuning and its cached logits.

What the stages of both families use (saving a model, a recipe section's values, the recipe's local
model files) is here too, below both, so that neither family imports the other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgerag.data import Passage, Question, question_from_dict
from edgerag.models import INFO_FILE

from . import loop
from .loop import atomic_write_text, is_main
from .recipe import Recipe


class RunError(RuntimeError):
    pass


# ---------------------------------------------------------------- small file helpers

def write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Run:
    """A run folder: the named paths its stages read and write, and which stages are done."""

    def __init__(self, out, recipe: Recipe):
        self.out = out = Path(out)
        self.recipe = recipe
        self.recipe_copy = out / "recipe.toml"
        self.stages_dir = out / "stages"
        self.data_dir = out / "data"
        self.train_file = self.data_dir / "train.jsonl"
        self.eval_file = self.data_dir / "eval.jsonl"
        self.corpus_file = self.data_dir / "corpus.jsonl"
        self.teacher_dir = out / "teacher"
        self.teacher_encoder = self.teacher_dir / "query_encoder"
        self.teacher_generator = self.teacher_dir / "generator"
        self.teacher_info = self.teacher_dir / INFO_FILE
        self.index_dir = out / "index"
        self.index_embeddings = self.index_dir / "embeddings.npy"
        self.student_init_dir = self.stage_dir("student_init")
        self.student_init_generator = self.student_init_dir / "generator"
        self.student_init_encoder = self.student_init_dir / "query_encoder"
        self.student_init_info = self.student_init_dir / "info.json"
        self.student_dir = out / "student"
        self.student_encoder = self.student_dir / "query_encoder"
        self.student_generator = self.student_dir / "generator"
        self.student_passage_encoder = self.student_dir / "passage_encoder"
        self.student_info = self.student_dir / INFO_FILE
        self.general_cache = self.stage_dir("general_cache") / "cache.pt"
        self.general_generator = self.stage_dir("distill_general") / "generator"
        self.kd_cache = self.stage_dir("teacher_logits") / "cache.pt"
        self.teacher_result = self.stage_dir("eval_teacher") / "result.json"
        self.eval_report = out / "eval.json"

    @property
    def teacher_base_generator(self) -> Path:
        """Where the teacher stage saves the generator: fine-tuning reads it there and writes teacher/generator."""
        return self.stage_dir("teacher") / "generator" if self.recipe.teacher_finetune.enabled else self.teacher_generator

    @property
    def student_generator_start(self) -> Path:
        """Where the task distillation starts: after the general pass where the recipe has one."""
        return self.general_generator if self.recipe.distill_general.passages else self.student_init_generator

    def passage_string(self, passage: Passage) -> str:
        """A passage as its encoder reads it (a bundle writes it by its index.passage_format)."""
        from .retrieval import DPR_PASSAGE_FORMAT, passage_text

        if self.recipe.teacher.kind == "hf-rag":
            return DPR_PASSAGE_FORMAT.format(title=passage.title, text=passage.text)

        return passage_text(passage.title, passage.text)

    @property
    def keeps_teacher_encoder(self) -> bool:
        """The student's query encoder is the teacher's, undistilled (student.query_encoder = "teacher")."""
        return self.recipe.student.keeps_teacher_encoder

    @property
    def teacher_passages(self) -> bool:
        """The student ranks passages by the teacher's vectors (student.passage_encoder = "teacher", or the
        teacher's own encoder kept for questions too)."""
        return self.recipe.student.passage_encoder == "teacher" or self.keeps_teacher_encoder

    @property
    def separate_passage_encoder(self) -> bool:
        """The student folder carries a second encoder for passages (student/passage_encoder)."""
        return self.recipe.student.passage_encoder == "teacher" and not self.keeps_teacher_encoder

    def stage_dir(self, name: str) -> Path:
        return self.stages_dir / name

    def done(self, name: str) -> bool:
        return (self.stage_dir(name) / "done").exists()

    def info(self, name: str) -> dict:
        path = self.stage_dir(name) / "info.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def mark_done(self, name: str, info: dict) -> None:
        """Writes the stage's info.json (with what its training loop reported: precision, throughput) and `done`."""
        training = self.stage_dir(name) / loop.TRAINING_FILE
        if training.exists():
            summary = json.loads(training.read_text())
            info = {**info, "precision": summary["precision"], "training": summary}
        if is_main():
            atomic_write_text(self.stage_dir(name) / "info.json", json.dumps(info, indent=2))
            atomic_write_text(self.stage_dir(name) / "done", "")

    def key(self, path: Path) -> str:
        """A path as fingerprints name it: relative to the run inside it; outside it (the recipe's data
        and model files), by its name only, since the contents are what count."""
        try:
            return Path(path).relative_to(self.out).as_posix()
        except ValueError:
            return "<outside>/" + Path(path).name

    # inputs shared by several stages
    def questions(self, split: str) -> list[Question]:
        return [question_from_dict(d) for d in read_jsonl({"train": self.train_file, "eval": self.eval_file}[split])]

    def corpus(self) -> list[Passage]:
        return [Passage(**d) for d in read_jsonl(self.corpus_file)]


def train_config(cfg, recipe: Recipe) -> loop.TrainConfig:
    return loop.TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            weight_decay=getattr(cfg, "weight_decay", 0.0), warmup_steps=cfg.warmup_steps,
                            checkpoint_every=recipe.run.checkpoint_every, seed=recipe.seed,
                            precision=recipe.run.precision, batching=recipe.run.batching)


def training_settings(recipe: Recipe, batched: bool = True) -> dict:
    """What a stage's result depends on of [run]: bf16 where it resolves so, and length batching in
    stages that bucket. Left out at what runs did before (fp32, random batches), so that their
    fingerprints still hold."""
    return {**({"precision": "bf16"} if loop.resolve_precision(recipe.run.precision) == "bf16" else {}),
            **({"batching": "length"} if batched and recipe.run.batching == "length" else {})}


def save_encoder(model, tokenizer, pooling: str, max_length: int, folder: Path, normalize: bool = True) -> None:
    from edgerag.model_files import write_sentence_transformers_config

    if is_main():
        loop.save_pretrained_atomic(model, tokenizer, folder)
        write_sentence_transformers_config(folder, pooling, max_length, model.config.hidden_size, normalize)


def save_generator(model, tokenizer, folder: Path) -> None:
    if is_main():
        loop.save_pretrained_atomic(model, tokenizer, folder)


# ---------------------------------------------------------------- a stage

def _always(recipe: Recipe) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One step of a run. `inputs(run)`: the files/folders it reads (an earlier stage's outputs, or
    the recipe's own data and model files); `outputs(run)`: what it writes outside its own
    RUN/stages/<name>/ folder; `settings(recipe)`: the recipe values its result depends on (JSON).
    Together with the inputs' contents they make its fingerprint, which decides what --seed-from reuses.
    `parallel`: it runs on every DDP rank (training); otherwise rank 0 runs it while the rest wait."""
    name: str
    function: Callable[[Run], dict]
    inputs: Callable[[Run], list[Path]]
    outputs: Callable[[Run], list[Path]]
    settings: Callable[[Recipe], object]
    parallel: bool = False
    enabled: Callable[[Recipe], bool] = _always


def section_values(cfg, *drop: str) -> dict:
    """A recipe section's values (less those in `drop`): what a stage's settings name of it."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in drop}


def finetune_values(cfg) -> dict:
    """[teacher_finetune]'s values, less `context` at its default "whole": that key came later, and
    earlier runs' fine-tuned teachers stay reusable by --seed-from."""
    return section_values(cfg, *(["context"] if cfg.context == "whole" else []))


def distill_values(cfg) -> dict:
    """[distill_generator]'s values, less `questions` at its default "teacher": that key came later,
    and earlier runs' distillation stays reusable by --seed-from."""
    return section_values(cfg, *(["questions"] if cfg.questions == "teacher" else []))


def distill_questions(run) -> list:
    """The train questions the generator's distillation asks: the teacher's fine-tuning ones, or with
    `questions = "fresh"` the next ones (the teacher's answers there are its reading, not its memory)."""
    g, ft = run.recipe.distill_generator, run.recipe.teacher_finetune
    first = ft.examples if g.questions == "fresh" and ft.enabled else 0
    return run.questions("train")[first:first + g.examples]


def local_files(*names: str) -> list[Path]:
    """The recipe's model names that are files or folders here (hub ids are named by their settings)."""
    return [Path(n) for n in names if n and Path(n).exists()]


# ---------------------------------------------------------------- fingerprints and seeding

_HASHES: dict[tuple, str] = {}   # (path, size, mtime) -> sha256, for this process


def file_hash(path: Path) -> str:
    from edgerag.runtime.manifest import sha256_file

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def content_hashes(path: Path):
    """sha256 of a file; {relative path: sha256} of every file in a folder; None where nothing is."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    if path.is_dir():
        return {f.relative_to(path).as_posix(): file_hash(f) for f in sorted(path.rglob("*")) if f.is_file()}
    return None


def fingerprint(stage: Stage, run: Run) -> str:
    """What a stage's result depends on: its name, its settings and the contents of its inputs."""
    record = {"stage": stage.name, "settings": stage.settings(run.recipe),
              "inputs": [[run.key(p), content_hashes(p)] for p in stage.inputs(run)]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _link(source, target) -> None:
    """A hard link where the file system allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _seed_path(source: Path, target: Path) -> None:
    """`target` becomes `source` as hard links, whole or not at all."""
    if source.is_dir():
        loop.write_folder_atomic(target, lambda tmp: shutil.copytree(source, tmp, copy_function=_link))
    else:
        if target.exists() and os.path.samefile(source, target):
            return  # an earlier stage linked it already (rename() between two links of one file does nothing)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.unlink(missing_ok=True)
        _link(source, tmp)
        os.replace(tmp, target)


def seed_stage(stage: Stage, run: Run, other: Run, fp: str) -> bool:
    """Take `stage` from `other` where that run finished it with this fingerprint: its outputs, then
    its folder (with the done marker, so a crash in between leaves the stage to run). Rank 0 only."""
    if not other.done(stage.name) or other.info(stage.name).get("fingerprint") != fp:
        return False
    pairs = [(other.out / p.relative_to(run.out), p) for p in stage.outputs(run)]
    if not all(source.exists() for source, _ in pairs):
        return False
    for source, target in pairs:
        _seed_path(source, target)
    loop.write_folder_atomic(run.stage_dir(stage.name), lambda tmp: shutil.copytree(
        other.stage_dir(stage.name), tmp, copy_function=_link, ignore=shutil.ignore_patterns("checkpoint.pt", "*.tmp")))
    print(f"[{stage.name}] seeded from {other.out}")
    return True

