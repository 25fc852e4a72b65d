"""`edgerag distill RECIPE --out RUN [--seed-from OTHER_RUN]`: teacher -> student, stage by stage, resumable.

Every stage is declared once, in `STAGES` (in run order): its function, the files it reads (inputs),
what it writes outside its own `RUN/stages/<name>/` folder (outputs), the recipe values its result
depends on (settings), whether it runs on every DDP rank, and whether the recipe enables it. Paths
are named once, on `Run`.

  data               sample questions, build the corpus                RUN/data/
  teacher            load retriever + generator, save HF folders       RUN/teacher/
  index              embed the corpus with the teacher encoder         RUN/index/
  teacher_finetune   RAG fine-tuning of the teacher generator          RUN/teacher/generator    (teacher_finetune.enabled)
  student_init       prune/cut the teacher into a student              RUN/stages/student_init/
  distill_encoder    student query encoder <- teacher                  RUN/student/query_encoder
  student_folder     the student's edgerag.json (+ passage encoder)    RUN/student/
  general_cache      teacher top-k logits on corpus text               RUN/stages/general_cache/   (distill_general.passages)
  distill_general    student generator <- teacher on corpus text       RUN/stages/distill_general/ (distill_general.passages)
  teacher_logits     teacher top-k logits on the KD examples           RUN/stages/teacher_logits/
  distill_generator  student generator <- teacher                      RUN/student/generator
  eval_teacher       the teacher, evaluated                            RUN/stages/eval_teacher/
  eval               the student, by the same code; both reported      RUN/eval.json

A finished stage writes `RUN/stages/<name>/done`, and in `info.json` its fingerprint: a hash of its
name, its settings and the contents of its inputs. `--resume` skips finished stages and an
interrupted training stage continues from its last checkpoint. `--seed-from OTHER_RUN` takes a
stage from another run, as hard links, where that run finished it with the fingerprint it has here:
the points of a curve share one teacher, its index, its fine-tuning and its cached logits.

Under torchrun the training stages run on every rank (DDP); the others on rank 0 while the rest wait.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgerag.data import Passage, Question, data_path, read_passages, read_squad
from edgerag.models import INFO_FILE

from . import loop
from .loop import atomic_write_text, barrier, is_main
from .recipe import Recipe, load_recipe, parse_layers


class RunError(RuntimeError):
    pass


# ---------------------------------------------------------------- small file helpers

def write_jsonl(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def question_to_dict(q: Question) -> dict:
    d = dataclasses.asdict(q)
    d["answers"] = list(q.answers)
    return d


def question_from_dict(d: dict) -> Question:
    return Question(**{**d, "answers": tuple(d["answers"])})


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
        if self.recipe.teacher.kind == "hf-rag":
            from .rag import DPR_PASSAGE_FORMAT

            return DPR_PASSAGE_FORMAT.format(title=passage.title, text=passage.text)
        from .retrieval import passage_text

        return passage_text(passage.title, passage.text)

    @property
    def teacher_passages(self) -> bool:
        """The student ranks passages by the teacher's vectors (student.passage_encoder = "teacher")."""
        return self.recipe.student.passage_encoder == "teacher"

    def stage_dir(self, name: str) -> Path:
        return self.stages_dir / name

    def done(self, name: str) -> bool:
        return (self.stage_dir(name) / "done").exists()

    def info(self, name: str) -> dict:
        path = self.stage_dir(name) / "info.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def mark_done(self, name: str, info: dict) -> None:
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
                            checkpoint_every=recipe.run.checkpoint_every, seed=recipe.seed)


def save_encoder(model, tokenizer, pooling: str, max_length: int, folder: Path, normalize: bool = True) -> None:
    from edgerag.models import write_sentence_transformers_config

    if is_main():
        loop.save_pretrained_atomic(model, tokenizer, folder)
        write_sentence_transformers_config(folder, pooling, max_length, model.config.hidden_size, normalize)


def save_generator(model, tokenizer, folder: Path) -> None:
    if is_main():
        loop.save_pretrained_atomic(model, tokenizer, folder)


# ---------------------------------------------------------------- stages

def stage_data(run: Run) -> dict:
    from edgerag.evaluation import sample_questions

    r = run.recipe
    d = r.data
    train_passages, train_q, train_skipped = read_squad(data_path(d.train, d.data_dir or None))
    eval_passages, eval_q, eval_skipped = read_squad(data_path(d.eval, d.data_dir or None))
    for name, skipped in ((d.train, train_skipped), (d.eval, eval_skipped)):
        if skipped:
            print(f"[data] {name}: skipped {skipped} questions without answers")
    pool = sample_questions(train_q, d.train_questions or len(train_q), r.seed)  # shuffled: stages take the first N
    eval_sample = sample_questions(eval_q, r.eval.questions or d.eval_questions, r.seed)
    if d.corpus:
        corpus = read_passages(data_path(d.corpus, d.data_dir or None))
    elif d.corpus_scope == "files":
        corpus = train_passages + eval_passages
    else:
        used = {q.passage_id for q in pool}
        corpus = [p for p in train_passages if p.id in used] + eval_passages
    corpus = list({p.id: p for p in corpus}.values())  # deduplicate, keep first occurrence order
    write_jsonl(run.train_file, [question_to_dict(q) for q in pool])
    write_jsonl(run.eval_file, [question_to_dict(q) for q in eval_sample])
    write_jsonl(run.corpus_file, [dataclasses.asdict(p) for p in corpus])
    info = {"train_questions": len(pool), "eval_questions": len(eval_sample), "corpus_passages": len(corpus),
            "skipped": {d.train: train_skipped, d.eval: eval_skipped}}
    print(f"[data] {len(pool)} train questions, {len(eval_sample)} eval questions, {len(corpus)} corpus passages")
    return info


def folder_info(run: Run, **extra) -> dict:
    p = run.recipe.prompt
    return {"max_prompt_tokens": p.max_prompt_tokens, "max_answer_tokens": p.max_answer_tokens, **extra}


def stage_teacher(run: Run) -> dict:
    from edgerag.models import load_encoder, load_generator

    from .student import count_params

    t = run.recipe.teacher
    encoder, enc_tok, pooling, max_length = load_encoder(t.query_encoder)
    save_encoder(encoder, enc_tok, pooling, max_length, run.teacher_encoder)
    generator, gen_tok = load_generator(t.generator)
    save_generator(generator, gen_tok, run.teacher_base_generator)
    info = {"query_encoder": t.query_encoder, "generator": t.generator, "pooling": pooling, "max_length": max_length,
            "encoder_params": count_params(encoder), "generator_params": count_params(generator)}
    atomic_write_text(run.teacher_info, json.dumps(folder_info(run, passage_encoder="query_encoder", **info), indent=2))
    return info


def stage_index(run: Run) -> dict:
    from edgerag.models import load_encoder

    from .retrieval import PassageIndex, embed, passage_text

    encoder, tok, pooling, max_length = load_encoder(run.teacher_encoder)
    corpus = run.corpus()
    emb = embed(encoder, tok, [passage_text(p.title, p.text) for p in corpus], pooling, max_length, progress="index corpus")
    PassageIndex(corpus, emb).save(run.index_dir)
    return {"passages": len(corpus), "dim": int(emb.shape[1])}


def load_index(run: Run):
    import numpy as np

    from .retrieval import PassageIndex

    corpus = run.corpus()
    return corpus, PassageIndex(corpus, np.load(run.index_embeddings))


def retrieve_for(run: Run, questions: list[Question], k: int) -> list[list[Passage]]:
    """Top-k corpus passages for each question, by the teacher retriever."""
    from edgerag.models import load_encoder

    from .retrieval import embed

    corpus, index = load_index(run)
    encoder, tok, pooling, max_length = load_encoder(run.teacher_encoder)
    q_emb = embed(encoder, tok, [q.question for q in questions], pooling, max_length)
    return [[corpus[i] for i in rows] for rows in index.search(q_emb, max(k, 1))]


def rag_examples(run: Run, questions, prompter, k: int, gold_probability: float, seed_offset: int, answers=None,
                 ranked=None):
    """Examples of the questions over their top-k passages (`ranked`: retrieved before, at least k deep)."""
    from .teacher import make_examples, rag_context

    ranked = ranked or retrieve_for(run, questions, k)
    rng = random.Random(run.recipe.seed + seed_offset)
    contexts = [rag_context(q, r, k, gold_probability, rng) for q, r in zip(questions, ranked)]
    return make_examples(prompter, questions, contexts, answers), contexts


def stage_teacher_finetune(run: Run) -> dict:
    from edgerag.models import load_generator

    from .student import train_top_layers
    from .teacher import Prompter, answer_loss

    cfg = run.recipe.teacher_finetune
    model, tok = load_generator(run.teacher_base_generator)
    model.to(loop.device())
    prompter = Prompter(tok, cfg.max_prompt_tokens, run.recipe.prompt.max_answer_tokens)
    questions = run.questions("train")[:cfg.examples]
    examples, _ = rag_examples(run, questions, prompter, cfg.k, cfg.gold_probability, seed_offset=1)
    train_top_layers(model, cfg.train_layers)
    log = loop.train(model, examples, lambda m, b: (answer_loss(m, b, tok.pad_token_id), {}),
                     train_config(cfg, run.recipe), run.stage_dir("teacher_finetune"), desc="teacher fine-tune")
    save_generator(model.cpu(), tok, run.teacher_generator)
    return {"examples": len(examples), "steps": len(log), "first_loss": log[0]["loss"] if log else None,
            "last_loss": log[-1]["loss"] if log else None}


def calibration_sequences(run: Run, prompter, n: int) -> list[list[int]]:
    """Gold-passage prompts with their answers: text like what the student will see."""
    from .teacher import make_examples

    questions = run.questions("train")[:n]
    examples = make_examples(prompter, questions, [[(q.title, q.context)] for q in questions])
    return [e.prompt + e.target for e in examples]


def vocabulary_texts(run: Run, max_rank: int = 20) -> list[str]:
    """Every piece of text the student reads or writes, in the pieces the prompt tokenizes separately:
    the template, corpus passages and their headers, the train questions and their answers."""
    from edgerag.runtime.prompt import CHATML, PLAIN

    texts = []
    for template in (CHATML, PLAIN):
        texts += [template["prefix"], template["passage_end"], template["answer_end"], *template["question"].split("{question}")]
    for p in run.corpus():
        texts.append(p.text)
        texts += [CHATML["passage"].format(rank=rank, title=p.title) for rank in range(1, max_rank + 1)]
    for q in run.questions("train"):
        texts.append(q.question.strip())
        texts += [a.strip() for a in q.answers]
    return texts


def stage_student_init(run: Run) -> dict:
    from edgerag.models import load_encoder, load_generator

    from .student import calibration_batches, count_params, shrink_encoder, shrink_generator
    from .teacher import Prompter

    s = run.recipe.student
    info = {}
    teacher, tok = load_generator(run.teacher_generator)
    teacher_params = count_params(teacher)
    if s.generator:
        # A smaller pretrained model, or an earlier run's student (progressive compression: prune a
        # healed student further). Its tokens must all be the teacher's, so that KD can map them.
        model, s_tok = load_generator(s.generator)
        if not set(s_tok.get_vocab()) <= set(tok.get_vocab()):
            raise RunError(f"student.generator {s.generator!r} does not share the teacher's tokenizer")
        del teacher
    else:
        model, s_tok = teacher, tok
    prompter = Prompter(s_tok, run.recipe.prompt.max_prompt_tokens, run.recipe.prompt.max_answer_tokens)
    batches = calibration_batches(calibration_sequences(run, prompter, s.calibration_passages), s_tok.pad_token_id)
    layers = parse_layers(s.layers, model.config.num_hidden_layers, "student.layers")
    info["generator"] = {**shrink_generator(model, layers, s.intermediate_size, s.kv_heads, batches),
                         "teacher_params": teacher_params}
    if s.generator:
        info["generator"]["from"] = s.generator
    if s.vocabulary == "corpus":
        from .vocab import trim_vocabulary

        info["generator"]["vocabulary"] = trim_vocabulary(model, s_tok, vocabulary_texts(run))
        info["generator"]["params"] = count_params(model)
        print(f"[student] vocabulary {info['generator']['vocabulary']['vocab_size_before']:,} -> "
              f"{info['generator']['vocabulary']['vocab_size']:,} tokens")
    save_generator(model, s_tok, run.student_init_generator)
    encoder, enc_tok, pooling, max_length = load_encoder(run.teacher_encoder)
    if s.query_encoder:
        student_enc, s_tok, pooling, max_length = load_encoder(s.query_encoder)
        info["query_encoder"] = {"from": s.query_encoder, "params": count_params(student_enc),
                                 "teacher_params": count_params(encoder)}
        save_encoder(student_enc, s_tok, pooling, max_length, run.student_init_encoder)
    else:
        keep = parse_layers(s.encoder_layers, encoder.config.num_hidden_layers, "student.encoder_layers")
        info["query_encoder"] = shrink_encoder(encoder, keep)
        save_encoder(encoder, enc_tok, pooling, max_length, run.student_init_encoder)
    g, e = info["generator"], info["query_encoder"]
    print(f"[student] generator {g['params']:,} params ({100 * g['params'] / g['teacher_params']:.0f}% of the teacher), "
          f"query encoder {e['params']:,} ({100 * e['params'] / e['teacher_params']:.0f}%)")
    return info


def stage_distill_encoder(run: Run) -> dict:
    import numpy as np
    import torch

    from edgerag.models import load_encoder, normalizes

    from .distill import QueryExample, disable_dropout, encoder_loss_fn
    from .retrieval import embed

    cfg = run.recipe.distill_encoder
    normalize = normalizes(run.teacher_encoder)  # DPR (the RAG family) scores raw vectors
    teacher, t_tok, pooling, max_length = load_encoder(run.teacher_encoder)
    student, s_tok, s_pooling, s_max_length = load_encoder(run.student_init_encoder)
    corpus = run.corpus()
    row_of = {p.id: i for i, p in enumerate(corpus)}
    passage_emb = torch.from_numpy(np.load(run.index_embeddings))
    questions = run.questions("train")[:cfg.queries]
    texts = [q.question for q in questions]
    rows = [row_of.get(q.passage_id, -1) for q in questions]
    rng = random.Random(run.recipe.seed + 3)
    for i in sorted(rng.sample(range(len(corpus)), min(cfg.passages, len(corpus)))):
        texts.append(run.passage_string(corpus[i]))
        rows.append(-1)
    targets = torch.from_numpy(embed(teacher, t_tok, texts, pooling, max_length, progress="teacher embeddings",
                                     normalize=normalize))
    examples = [QueryExample(t, targets[i], rows[i]) for i, t in enumerate(texts)]
    before = _embedding_distance(student, s_tok, s_pooling, s_max_length, examples)
    disable_dropout(student)
    if getattr(student, "pooler", None) is not None:
        student.pooler.requires_grad_(False)  # unused by mean/CLS pooling; DDP wants every trained weight used
    student.to(loop.device())
    loss_fn = encoder_loss_fn(s_tok, s_pooling, s_max_length, passage_emb, cfg.mse_weight, cfg.cosine_weight,
                              cfg.contrastive_weight, cfg.contrastive_temperature, normalize)
    log = loop.train(student, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir("distill_encoder"), desc="distill encoder")
    student.cpu()
    after = _embedding_distance(student, s_tok, s_pooling, s_max_length, examples)
    save_encoder(student, s_tok, s_pooling, s_max_length, run.student_encoder, normalize)
    print(f"[distill encoder] mean cosine to the teacher: {1 - before:.3f} -> {1 - after:.3f}")
    return {"examples": len(examples), "steps": len(log), "cosine_distance_before": before, "cosine_distance_after": after}


def _embedding_distance(model, tok, pooling, max_length, examples) -> float:
    import torch

    from .retrieval import embed

    sample = examples[:256]
    emb = torch.from_numpy(embed(model, tok, [e.text for e in sample], pooling, max_length))
    target = torch.nn.functional.normalize(torch.stack([e.target for e in sample]), dim=-1)
    return float((1 - (emb * target).sum(-1)).mean())


def stage_student_folder(run: Run) -> dict:
    """RUN/student/edgerag.json, before any generator is there: the prompt settings, how the student was
    made, and which encoder embeds its passages. A student ranked against the teacher's passage vectors
    carries that encoder (student/passage_encoder), so export needs nothing else."""
    r = run.recipe
    made = {k: v for k, v in json.loads(run.student_init_info.read_text()).items() if k not in ("seconds", "fingerprint")}
    if run.teacher_passages:
        loop.copy_tree_atomic(run.teacher_encoder, run.student_passage_encoder)
    passage_encoder = run.student_passage_encoder.name if run.teacher_passages else "query_encoder"
    info = folder_info(run, passage_encoder=passage_encoder, student=made, teacher=r.teacher.generator)
    result = {"passage_encoder": passage_encoder}
    if r.compress.enabled:
        compression, shares = fitted_compression(run)
        # the template and the passages to retrieve travel with the student (edgerag export reads them)
        info.update(compression=compression.to_dict(), template="compact", k=compression.passages)
        kept = "teacher_piece_kept" if r.compress.fit_target == "teacher" else "answer_in_context"
        result.update(selector=compression.selector.to_dict(), **{f"{kept}_by_lexical_weight": shares})
    atomic_write_text(run.student_info, json.dumps(info, indent=2))
    return result


def student_piece_embedder(run: Run):
    """Piece vectors by the encoder that embeds the student's passages (as `edgerag export` will)."""
    from edgerag.runtime.compress import MAX_PIECE_WORDS

    from .compress import PieceEmbedder

    return PieceEmbedder(run.student_passage_encoder if run.teacher_passages else run.student_encoder, MAX_PIECE_WORDS)


def student_query_vectors(run: Run, questions: list[Question]):
    from edgerag.models import load_encoder, normalizes

    from .retrieval import embed

    encoder, tok, pooling, max_length = load_encoder(run.student_encoder)
    return embed(encoder, tok, [q.question for q in questions], pooling, max_length,
                 normalize=normalizes(run.student_encoder))


def student_prompter(run: Run):
    """The compressed student's prompts (the compact template), in the teacher's token ids."""
    from edgerag.models import load_tokenizer

    from .teacher import Prompter

    p = run.recipe.prompt
    return Prompter(load_tokenizer(run.teacher_generator), p.max_prompt_tokens, p.max_answer_tokens, compact=True)


def fitted_compression(run: Run):
    """The recipe's compression, with the selector's lexical weight fitted on train questions (their
    top passages as retrieved, no gold inserted: what the device sees). Returns it and the share of
    questions whose selected pieces hold the answer, for each weight tried."""
    from edgerag.runtime.compress import Compression, Selector

    from .compress import fit_selector

    c = run.recipe.compress
    compression = Compression(c.passages, c.budget, Selector())
    if not c.fit_selector:
        return compression, {}
    questions = run.questions("train")[:c.fit_questions]
    contexts = [[(p.title, p.text) for p in ranked] for ranked in retrieve_for(run, questions, c.passages)]
    positives = None
    if c.fit_target == "teacher":
        from edgerag.models import load_generator

        from .compress import teacher_positives
        from .teacher import Prompter

        teacher, tokenizer = load_generator(run.teacher_generator)
        p = run.recipe.prompt
        positives = teacher_positives(teacher.to(loop.device()).eval(),
                                      Prompter(tokenizer, p.max_prompt_tokens, p.max_answer_tokens),
                                      questions, contexts, compression.max_piece_words)
        del teacher
    selector, shares = fit_selector(compression, questions, student_query_vectors(run, questions), contexts,
                                    student_piece_embedder(run), student_prompter(run).encode, positives)
    kept = "answer in context" if positives is None else "teacher's best piece kept"
    print(f"[student_folder] selector: lexical weight {selector.lexical} ({kept}, %, by weight: {shares})")
    return Compression(c.passages, c.budget, selector), shares


def general_examples(run: Run, tokenizer, passages: int, chunk_tokens: int) -> list:
    """Plain-text distillation examples: a sampled corpus passage's first tokens, every one a target."""
    from .teacher import Example

    corpus = run.corpus()
    rng = random.Random(run.recipe.seed + 4)
    chosen = sorted(rng.sample(range(len(corpus)), min(passages, len(corpus))))
    examples = []
    for i in chosen:
        ids = tokenizer(corpus[i].text, add_special_tokens=False)["input_ids"][:chunk_tokens]
        if len(ids) > 1:
            examples.append(Example(corpus[i].id, ids[:1], ids[1:]))
    return examples


def stage_general_cache(run: Run) -> dict:
    """The teacher's top-k logits on corpus text, for the general pass."""
    from edgerag.models import load_generator

    from .distill import teacher_cache

    cfg = run.recipe.distill_general
    teacher, tok = load_generator(run.teacher_generator)
    examples = general_examples(run, tok, cfg.passages, cfg.chunk_tokens)
    cache = teacher_cache(teacher.to(loop.device()), examples, tok.pad_token_id, cfg.temperature, cfg.top_k,
                          hidden=cfg.hidden_weight > 0, progress="teacher logits (corpus text)")
    loop.atomic_torch_save({"examples": [dataclasses.asdict(e) for e in examples], "cache": cache}, run.general_cache)
    return {"examples": len(examples), "top_k": cfg.top_k, "temperature": cfg.temperature}


def stage_distill_general(run: Run) -> dict:
    # alpha 0: no labels here, the teacher's distribution is the only target
    return distill_on_cache(run, "distill_general", run.recipe.distill_general, alpha=0.0, cache_file=run.general_cache,
                            start=run.student_init_generator, out=run.general_generator,
                            desc="distill generator (corpus text)")


def stage_teacher_logits(run: Run) -> dict:
    from edgerag.models import load_generator

    from .distill import teacher_cache
    from .teacher import Prompter, generate, make_examples

    cfg = run.recipe.distill_generator
    teacher, tok = load_generator(run.teacher_generator)
    teacher.to(loop.device())
    prompter = Prompter(tok, cfg.max_prompt_tokens, run.recipe.prompt.max_answer_tokens)
    questions = run.questions("train")[:cfg.examples]
    compress = run.recipe.compress
    # one retrieval for the teacher's top k and the compressed student's wider look
    ranked = retrieve_for(run, questions, max(cfg.k, compress.passages if compress.enabled else 0))
    examples, contexts = rag_examples(run, questions, prompter, cfg.k, cfg.gold_probability, seed_offset=2, ranked=ranked)
    n_seq = 0
    if cfg.seq_kd:
        # Sequence-level KD: the teacher's own answers become extra targets.
        answers = generate(teacher, prompter, [e.prompt for e in examples], progress="teacher answers")
        extra = [(q, c, a) for q, c, a in zip(questions, contexts, answers) if a and a not in q.answers]
        examples += make_examples(prompter, [x[0] for x in extra], [x[1] for x in extra], [x[2] for x in extra])
        n_seq = len(extra)
    projection = None
    if cfg.gradient_weight > 0:
        from .gradient import projection as random_projection

        projection = random_projection(teacher.config.vocab_size, cfg.gradient_projections, run.recipe.seed)
    cache = teacher_cache(teacher, examples, tok.pad_token_id, cfg.temperature, cfg.top_k, hidden=cfg.hidden_weight > 0,
                          progress="teacher logits", gradient_projection=projection)
    info = {"examples": len(examples), "seq_kd_examples": n_seq, "top_k": cfg.top_k, "temperature": cfg.temperature,
            "teacher_prompt_tokens": round(sum(len(e.prompt) for e in examples) / max(len(examples), 1), 1)}
    if run.recipe.compress.enabled:
        # distillation across contexts: the cache holds the teacher's answer distributions over its full
        # passages; the student learns them reading its compressed context
        examples, share = compressed_student_examples(run, questions, examples, ranked)
        info.update(student_prompt_tokens=round(sum(len(e.prompt) for e in examples) / max(len(examples), 1), 1),
                    student_answer_in_context=share)
    if is_main():
        loop.atomic_torch_save({"examples": [dataclasses.asdict(e) for e in examples], "cache": cache}, run.kd_cache)
    return info


def compressed_student_examples(run: Run, questions: list[Question], examples: list, ranked: list[list[Passage]]):
    """The distillation examples with the student's prompt in place of the teacher's: the compressed
    context of its top `compress.passages` passages (the gold one inserted as the teacher's examples
    insert it), in the compact template. Targets stay as they are, so the teacher's cached
    distributions line up with the student's answer positions."""
    from edgerag.models import read_info
    from edgerag.runtime.compress import Compression

    from .compress import answer_share, compressed_contexts
    from .teacher import Example, rag_context

    r, cfg = run.recipe, run.recipe.distill_generator
    compression = Compression.from_dict(read_info(run.student_dir)["compression"])
    prompter = student_prompter(run)
    rng = random.Random(r.seed + 3)
    wide = [rag_context(q, found, compression.passages, cfg.gold_probability, rng) for q, found in zip(questions, ranked)]
    contexts = compressed_contexts(compression, [q.question for q in questions], student_query_vectors(run, questions),
                                   wide, student_piece_embedder(run), prompter.encode)
    prompts = {q.id: prompter.prompt(q.question, ctx) for q, ctx in zip(questions, contexts)}
    return [Example(e.question_id, prompts[e.question_id], e.target) for e in examples], \
        round(answer_share(questions, contexts), 2)


def distill_on_cache(run: Run, stage: str, cfg, alpha: float, cache_file: Path, start: Path, out: Path, desc: str) -> dict:
    """Train the student generator at `start` on cached teacher logits, save it to `out`. The cache is
    in the teacher's token ids; a student with a trimmed vocabulary gets them mapped to its own."""
    import torch

    from edgerag.models import load_generator, load_tokenizer

    from .distill import KDExample, generator_loss_fn, remap_kd_examples
    from .student import train_top_layers
    from .teacher import Example
    from .vocab import id_map

    student, tok = load_generator(start)
    saved = torch.load(cache_file, weights_only=False)
    examples = [KDExample(Example(**e), c) for e, c in zip(saved["examples"], saved["cache"])]
    mapping = id_map(load_tokenizer(run.teacher_generator), tok)
    dropped = 0
    if mapping is not None:
        n = len(examples)
        examples = remap_kd_examples(examples, mapping)
        dropped = n - len(examples)
        if dropped:
            print(f"[{stage}] skipped {dropped} examples with tokens outside the student's vocabulary")
    if cfg.hidden_weight > 0 and examples and examples[0].cache["hidden"].shape[-1] != student.config.hidden_size:
        raise RunError(f"{stage}.hidden_weight: the student's hidden size ({student.config.hidden_size}) "
                       f"differs from the teacher's ({examples[0].cache['hidden'].shape[-1]}); set it to 0")
    gradient_weight = getattr(cfg, "gradient_weight", 0.0)
    projection = None
    if gradient_weight > 0:
        from .gradient import projection as random_projection

        if mapping is not None:
            raise RunError(f"{stage}.gradient_weight: gradient matching needs the teacher's vocabulary (student.vocabulary = \"full\")")
        # the projection the teacher's gradients were cached with; SDPA's CPU kernel has no double backward
        projection = random_projection(student.config.vocab_size, cfg.gradient_projections, run.recipe.seed)
        student.config._attn_implementation = "eager"
    train_top_layers(student, cfg.train_layers)
    student.to(loop.device())
    loss_fn = generator_loss_fn(tok.pad_token_id, cfg.temperature, alpha, cfg.hidden_weight, gradient_weight, projection)
    log = loop.train(student, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir(stage), desc=desc)
    save_generator(student.cpu(), tok, out)
    return {"examples": len(examples), "skipped_examples": dropped,
            "target_tokens": sum(len(kd.example.target) for kd in examples), "steps": len(log),
            "first": log[0] if log else None, "last": log[-1] if log else None}


def stage_distill_generator(run: Run) -> dict:
    cfg = run.recipe.distill_generator
    return distill_on_cache(run, "distill_generator", cfg, cfg.alpha, cache_file=run.kd_cache,
                            start=run.student_generator_start, out=run.student_generator, desc="distill generator")


def evaluate_side(run: Run, folder: Path, teacher_vectors: bool, answers_out: Path) -> dict:
    """A teacher/student folder on the run's eval questions. With `teacher_vectors` the teacher's index
    is reused; a student with its own passage encoder embeds the corpus itself, as the device will."""
    import numpy as np

    from .evaluate import evaluate_folder

    r = run.recipe
    return evaluate_folder(folder, run.questions("eval"), run.corpus(), r.eval.k,
                           passage_embeddings=np.load(run.index_embeddings) if teacher_vectors else None,
                           batch_size=r.eval.batch_size, max_prompt_tokens=r.prompt.max_prompt_tokens,
                           max_answer_tokens=r.prompt.max_answer_tokens, answers_out=answers_out)


def stage_eval_teacher(run: Run) -> dict:
    result = evaluate_side(run, run.teacher_dir, True, run.stage_dir("eval_teacher") / "teacher_answers.jsonl")
    atomic_write_text(run.teacher_result, json.dumps(result, indent=2))
    return {"f1": result["f1"], "f1_gold": result["f1_gold"]}


def stage_eval(run: Run) -> dict:
    from edgerag.evaluation import format_table

    r = run.recipe
    results = {"teacher": json.loads(run.teacher_result.read_text()),
               "student": evaluate_side(run, run.student_dir, run.teacher_passages,
                                      run.stage_dir("eval") / "student_answers.jsonl")}
    report = {"dataset": r.data.eval, "n_questions": len(run.questions("eval")), "k": r.eval.k, **results}
    atomic_write_text(run.eval_report, json.dumps(report, indent=2))
    print(format_table(results))
    return {"eval": str(run.eval_report)}


# ---------------------------------------------------------------- the stage table

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


def _values(cfg, *drop: str) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in drop}


def _compress_values(c) -> dict:
    # fit_target came later: left out at its default, so that earlier runs' stages stay reusable
    return _values(c, *(["fit_target"] if c.fit_target == "answer" else []))


def _local(*names: str) -> list[Path]:
    """The recipe's model names that are files or folders here (hub ids are named by their settings)."""
    return [Path(n) for n in names if n and Path(n).exists()]


def _data_files(run: Run) -> list[Path]:
    d = run.recipe.data
    return [data_path(name, d.data_dir or None) for name in (d.train, d.eval, d.corpus) if name]


def _teacher_outputs(run: Run) -> list[Path]:
    base = [] if run.recipe.teacher_finetune.enabled else [run.teacher_generator]  # else inside stages/teacher/
    return [run.teacher_encoder, run.teacher_info, *base]


def _kd_settings(r: Recipe) -> dict:
    g = r.distill_generator
    return {"seed": r.seed, "max_answer_tokens": r.prompt.max_answer_tokens, "hidden": g.hidden_weight > 0,
            **{k: getattr(g, k) for k in ("examples", "k", "gold_probability", "max_prompt_tokens", "seq_kd",
                                           "temperature", "top_k")},
            **({"gradient_projections": g.gradient_projections} if g.gradient_weight > 0 else {}),
            **({"compress": _compress_values(r.compress), "prompt": _values(r.prompt)} if r.compress.enabled else {})}


def _compress_inputs(run: Run) -> list[Path]:
    """What a compressed student's contexts depend on: its encoders and the retrieval they select from."""
    if not run.recipe.compress.enabled:
        return []
    return [run.student_encoder, *([run.teacher_encoder] if run.teacher_passages else []), run.teacher_generator,
            run.index_embeddings, run.train_file, run.corpus_file]


def _general_enabled(r: Recipe) -> bool:
    return r.distill_general.passages > 0


STAGES = [
    Stage("data", stage_data,
          inputs=_data_files,
          outputs=lambda run: [run.data_dir],
          settings=lambda r: {"seed": r.seed, "data": _values(r.data), "eval_questions": r.eval.questions}),
    Stage("teacher", stage_teacher,
          inputs=lambda run: _local(run.recipe.teacher.query_encoder, run.recipe.teacher.generator),
          outputs=_teacher_outputs,
          settings=lambda r: {"teacher": _values(r.teacher), "prompt": _values(r.prompt),
                              "finetune": r.teacher_finetune.enabled}),
    Stage("index", stage_index,
          inputs=lambda run: [run.teacher_encoder, run.corpus_file],
          outputs=lambda run: [run.index_dir],
          settings=lambda r: {}),
    Stage("teacher_finetune", stage_teacher_finetune,
          inputs=lambda run: [run.teacher_base_generator, run.teacher_encoder, run.index_embeddings, run.corpus_file,
                              run.train_file],
          outputs=lambda run: [run.teacher_generator],
          settings=lambda r: {"seed": r.seed, "teacher_finetune": _values(r.teacher_finetune),
                              "max_answer_tokens": r.prompt.max_answer_tokens},
          parallel=True, enabled=lambda r: r.teacher_finetune.enabled),
    Stage("student_init", stage_student_init,
          inputs=lambda run: [run.teacher_generator, run.teacher_encoder, run.train_file, run.corpus_file,
                              *_local(run.recipe.student.generator, run.recipe.student.query_encoder)],
          outputs=lambda run: [],
          settings=lambda r: {"seed": r.seed, "student": _values(r.student, "passage_encoder"), "prompt": _values(r.prompt)}),
    # Reads only the student's query encoder: students that differ in their generator share it.
    Stage("distill_encoder", stage_distill_encoder,
          inputs=lambda run: [run.teacher_encoder, run.student_init_encoder, run.index_embeddings, run.corpus_file,
                              run.train_file],
          outputs=lambda run: [run.student_encoder],
          settings=lambda r: {"seed": r.seed, "distill_encoder": _values(r.distill_encoder)},
          parallel=True),
    Stage("student_folder", stage_student_folder,
          inputs=lambda run: [run.student_init_info, *([run.teacher_encoder] if run.teacher_passages else []),
                              *_compress_inputs(run)],
          outputs=lambda run: [run.student_info, *([run.student_passage_encoder] if run.teacher_passages else [])],
          settings=lambda r: {"passage_encoder": r.student.passage_encoder, "prompt": _values(r.prompt),
                              "teacher": r.teacher.generator,
                              **({"compress": _compress_values(r.compress)} if r.compress.enabled else {})}),
    Stage("general_cache", stage_general_cache,
          inputs=lambda run: [run.teacher_generator, run.corpus_file],
          outputs=lambda run: [],
          settings=lambda r: {"seed": r.seed, "hidden": r.distill_general.hidden_weight > 0,
                              **{k: getattr(r.distill_general, k) for k in ("passages", "chunk_tokens", "temperature", "top_k")}},
          enabled=_general_enabled),
    Stage("distill_general", stage_distill_general,
          inputs=lambda run: [run.general_cache, run.student_init_generator, run.teacher_generator],
          outputs=lambda run: [],
          settings=lambda r: {"seed": r.seed, "distill_general": _values(r.distill_general)},
          parallel=True, enabled=_general_enabled),
    Stage("teacher_logits", stage_teacher_logits,
          inputs=lambda run: [run.teacher_generator, run.teacher_encoder, run.index_embeddings, run.corpus_file,
                              run.train_file, *([run.student_info, *_compress_inputs(run)] if run.recipe.compress.enabled else [])],
          outputs=lambda run: [],
          settings=_kd_settings),
    Stage("distill_generator", stage_distill_generator,
          inputs=lambda run: [run.kd_cache, run.student_generator_start, run.teacher_generator],
          outputs=lambda run: [run.student_generator],
          settings=lambda r: {"seed": r.seed, "distill_generator": _values(r.distill_generator)},
          parallel=True),
    Stage("eval_teacher", stage_eval_teacher,
          inputs=lambda run: [run.teacher_encoder, run.teacher_generator, run.teacher_info, run.index_embeddings,
                              run.eval_file, run.corpus_file],
          outputs=lambda run: [],
          settings=lambda r: {"eval": _values(r.eval, "questions"), "prompt": _values(r.prompt)}),
    Stage("eval", stage_eval,
          inputs=lambda run: [run.student_encoder, run.student_generator, run.student_info, run.teacher_result,
                              run.eval_file, run.corpus_file, *([run.index_embeddings] if run.teacher_passages else [])],
          outputs=lambda run: [run.eval_report],
          settings=lambda r: {"eval": _values(r.eval, "questions"), "prompt": _values(r.prompt), "dataset": r.data.eval,
                              "passage_encoder": r.student.passage_encoder}),
]


def plan(recipe: Recipe, stop_after: str | None = None) -> list[Stage]:
    """The stages a run of `recipe` goes through, in order (up to `stop_after`)."""
    table = STAGES
    if recipe.teacher.kind == "hf-rag":
        from .rag import stages as rag_stages

        table = rag_stages()
    names = [s.name for s in table]
    if stop_after is not None and stop_after not in names:
        raise RunError(f"unknown stage {stop_after!r} (stages: {', '.join(names)})")
    last = names.index(stop_after) if stop_after is not None else len(names) - 1
    return [s for s in table[:last + 1] if s.enabled(recipe)]


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


# ---------------------------------------------------------------- the driver

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


def main(argv=None) -> int:
    """`torchrun -m edgerag.train.pipeline distill RECIPE --out RUN`: the `edgerag` command, under torchrun."""
    from edgerag.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
