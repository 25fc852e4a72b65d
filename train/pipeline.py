"""`edgerag distill RECIPE --out RUN`: teacher -> student, stage by stage, resumable.

Stages run in this order; each writes its outputs into RUN and a `RUN/stages/<name>/done` marker,
and reads its inputs from files only, so `--resume` can skip any finished stage and an interrupted
training stage continues from its last checkpoint:

  data               sample questions, build the corpus          RUN/data/
  teacher            load retriever + generator, save HF folders RUN/teacher/
  index              embed the corpus with the teacher encoder   RUN/index/
  teacher_finetune   RAG fine-tuning of the teacher generator    RUN/teacher/generator
  student_init       prune/cut the teacher into a student        RUN/stages/student_init/
  distill_encoder    student query encoder <- teacher            RUN/student/query_encoder
  distill_general    student generator <- teacher on corpus text RUN/stages/distill_general/ (optional)
  teacher_logits     teacher top-k logits on the KD examples     RUN/stages/teacher_logits/
  distill_generator  student generator <- teacher               RUN/student/generator
  eval               teacher and student, same code              RUN/eval.json

Under torchrun the training stages run on every rank (DDP); the others on rank 0 while the rest wait.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import sys
import time
from pathlib import Path

from . import loop
from .data import Passage, Question, data_path, read_passages, read_squad
from .loop import atomic_write_text, barrier, is_main
from .recipe import Recipe, load_recipe, parse_layers

STAGES = ["data", "teacher", "index", "teacher_finetune", "student_init", "distill_encoder", "distill_general",
          "teacher_logits", "distill_generator", "eval"]


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
    """The run folder: where each stage writes, and which stages are done."""

    def __init__(self, out: Path, recipe: Recipe):
        self.out = Path(out)
        self.recipe = recipe

    def stage_dir(self, name: str) -> Path:
        return self.out / "stages" / name

    def done(self, name: str) -> bool:
        return (self.stage_dir(name) / "done").exists()

    def mark_done(self, name: str, info: dict) -> None:
        if is_main():
            atomic_write_text(self.stage_dir(name) / "info.json", json.dumps(info, indent=2))
            atomic_write_text(self.stage_dir(name) / "done", "")

    # inputs shared by several stages
    def questions(self, split: str) -> list[Question]:
        return [question_from_dict(d) for d in read_jsonl(self.out / "data" / f"{split}.jsonl")]

    def corpus(self) -> list[Passage]:
        return [Passage(**d) for d in read_jsonl(self.out / "data" / "corpus.jsonl")]


def train_config(cfg, recipe: Recipe) -> loop.TrainConfig:
    return loop.TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            weight_decay=getattr(cfg, "weight_decay", 0.0), warmup_steps=cfg.warmup_steps,
                            checkpoint_every=recipe.run.checkpoint_every, seed=recipe.seed)


def save_encoder(model, tokenizer, pooling: str, max_length: int, folder: Path) -> None:
    from .sources import write_sentence_transformers_config

    if is_main():
        loop.save_pretrained_atomic(model, tokenizer, folder)
        write_sentence_transformers_config(folder, pooling, max_length, model.config.hidden_size)


def save_generator(model, tokenizer, folder: Path) -> None:
    if is_main():
        loop.save_pretrained_atomic(model, tokenizer, folder)


# ---------------------------------------------------------------- stages

def stage_data(run: Run) -> dict:
    from .evaluate import sample_questions

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
    write_jsonl(run.out / "data" / "train.jsonl", [question_to_dict(q) for q in pool])
    write_jsonl(run.out / "data" / "eval.jsonl", [question_to_dict(q) for q in eval_sample])
    write_jsonl(run.out / "data" / "corpus.jsonl", [dataclasses.asdict(p) for p in corpus])
    info = {"train_questions": len(pool), "eval_questions": len(eval_sample), "corpus_passages": len(corpus),
            "skipped": {d.train: train_skipped, d.eval: eval_skipped}}
    print(f"[data] {len(pool)} train questions, {len(eval_sample)} eval questions, {len(corpus)} corpus passages")
    return info


def folder_info(run: Run, **extra) -> dict:
    p = run.recipe.prompt
    return {"max_prompt_tokens": p.max_prompt_tokens, "max_answer_tokens": p.max_answer_tokens, **extra}


def stage_teacher(run: Run) -> dict:
    from .sources import load_encoder, load_generator
    from .student import count_params

    t = run.recipe.teacher
    encoder, enc_tok, pooling, max_length = load_encoder(t.query_encoder)
    save_encoder(encoder, enc_tok, pooling, max_length, run.out / "teacher" / "query_encoder")
    generator, gen_tok = load_generator(t.generator)
    base = run.stage_dir("teacher") / "generator" if run.recipe.teacher_finetune.enabled else run.out / "teacher" / "generator"
    save_generator(generator, gen_tok, base)
    info = {"query_encoder": t.query_encoder, "generator": t.generator, "pooling": pooling, "max_length": max_length,
            "encoder_params": count_params(encoder), "generator_params": count_params(generator)}
    atomic_write_text(run.out / "teacher" / "edgerag.json", json.dumps(folder_info(run, passage_encoder="query_encoder", **info), indent=2))
    return info


def teacher_base(run: Run) -> Path:
    return run.stage_dir("teacher") / "generator" if run.recipe.teacher_finetune.enabled else run.out / "teacher" / "generator"


def stage_index(run: Run) -> dict:
    from .retrieval import PassageIndex, embed, passage_text
    from .sources import load_encoder

    encoder, tok, pooling, max_length = load_encoder(run.out / "teacher" / "query_encoder")
    corpus = run.corpus()
    emb = embed(encoder, tok, [passage_text(p.title, p.text) for p in corpus], pooling, max_length, progress="index corpus")
    PassageIndex(corpus, emb).save(run.out / "index")
    return {"passages": len(corpus), "dim": int(emb.shape[1])}


def load_index(run: Run):
    import numpy as np

    from .retrieval import PassageIndex

    corpus = run.corpus()
    return corpus, PassageIndex(corpus, np.load(run.out / "index" / "embeddings.npy"))


def retrieve_for(run: Run, questions: list[Question], k: int) -> list[list[Passage]]:
    """Top-k corpus passages for each question, by the teacher retriever."""
    from .retrieval import embed
    from .sources import load_encoder

    corpus, index = load_index(run)
    encoder, tok, pooling, max_length = load_encoder(run.out / "teacher" / "query_encoder")
    q_emb = embed(encoder, tok, [q.question for q in questions], pooling, max_length)
    return [[corpus[i] for i in rows] for rows in index.search(q_emb, max(k, 1))]


def rag_examples(run: Run, questions, prompter, k: int, gold_probability: float, seed_offset: int, answers=None):
    from .teacher import make_examples, rag_context

    ranked = retrieve_for(run, questions, k)
    rng = random.Random(run.recipe.seed + seed_offset)
    contexts = [rag_context(q, r, k, gold_probability, rng) for q, r in zip(questions, ranked)]
    return make_examples(prompter, questions, contexts, answers), contexts


def stage_teacher_finetune(run: Run) -> dict:
    from .sources import load_generator
    from .student import train_top_layers
    from .teacher import Prompter, answer_loss

    cfg = run.recipe.teacher_finetune
    model, tok = load_generator(teacher_base(run))
    model.to(loop.device())
    prompter = Prompter(tok, cfg.max_prompt_tokens, run.recipe.prompt.max_answer_tokens)
    questions = run.questions("train")[:cfg.examples]
    examples, _ = rag_examples(run, questions, prompter, cfg.k, cfg.gold_probability, seed_offset=1)
    train_top_layers(model, cfg.train_layers)
    log = loop.train(model, examples, lambda m, b: (answer_loss(m, b, tok.pad_token_id), {}),
                     train_config(cfg, run.recipe), run.stage_dir("teacher_finetune"), desc="teacher fine-tune")
    save_generator(model.cpu(), tok, run.out / "teacher" / "generator")
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
    from runtime.prompt import CHATML, PLAIN

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
    from .sources import load_encoder, load_generator
    from .student import calibration_batches, count_params, shrink_encoder, shrink_generator
    from .teacher import Prompter

    s = run.recipe.student
    out = run.stage_dir("student_init")
    info = {}
    teacher, tok = load_generator(run.out / "teacher" / "generator")
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
    save_generator(model, s_tok, out / "generator")
    encoder, enc_tok, pooling, max_length = load_encoder(run.out / "teacher" / "query_encoder")
    if s.query_encoder:
        student_enc, s_tok, pooling, max_length = load_encoder(s.query_encoder)
        info["query_encoder"] = {"from": s.query_encoder, "params": count_params(student_enc),
                                 "teacher_params": count_params(encoder)}
        save_encoder(student_enc, s_tok, pooling, max_length, out / "query_encoder")
    else:
        keep = parse_layers(s.encoder_layers, encoder.config.num_hidden_layers, "student.encoder_layers")
        info["query_encoder"] = shrink_encoder(encoder, keep)
        save_encoder(encoder, enc_tok, pooling, max_length, out / "query_encoder")
    g, e = info["generator"], info["query_encoder"]
    print(f"[student] generator {g['params']:,} params ({100 * g['params'] / g['teacher_params']:.0f}% of the teacher), "
          f"query encoder {e['params']:,} ({100 * e['params'] / e['teacher_params']:.0f}%)")
    return info


def stage_distill_encoder(run: Run) -> dict:
    import numpy as np
    import torch

    from .distill import QueryExample, disable_dropout, encoder_loss_fn
    from .retrieval import embed, passage_text
    from .sources import load_encoder

    cfg = run.recipe.distill_encoder
    teacher, t_tok, pooling, max_length = load_encoder(run.out / "teacher" / "query_encoder")
    student, s_tok, s_pooling, s_max_length = load_encoder(run.stage_dir("student_init") / "query_encoder")
    corpus = run.corpus()
    row_of = {p.id: i for i, p in enumerate(corpus)}
    passage_emb = torch.from_numpy(np.load(run.out / "index" / "embeddings.npy"))
    questions = run.questions("train")[:cfg.queries]
    texts = [q.question for q in questions]
    rows = [row_of.get(q.passage_id, -1) for q in questions]
    rng = random.Random(run.recipe.seed + 3)
    for i in sorted(rng.sample(range(len(corpus)), min(cfg.passages, len(corpus)))):
        texts.append(passage_text(corpus[i].title, corpus[i].text))
        rows.append(-1)
    targets = torch.from_numpy(embed(teacher, t_tok, texts, pooling, max_length, progress="teacher embeddings"))
    examples = [QueryExample(t, targets[i], rows[i]) for i, t in enumerate(texts)]
    before = _embedding_distance(student, s_tok, s_pooling, s_max_length, examples)
    disable_dropout(student)
    if getattr(student, "pooler", None) is not None:
        student.pooler.requires_grad_(False)  # unused by mean/CLS pooling; DDP wants every trained weight used
    student.to(loop.device())
    loss_fn = encoder_loss_fn(s_tok, s_pooling, s_max_length, passage_emb, cfg.mse_weight, cfg.cosine_weight,
                              cfg.contrastive_weight, cfg.contrastive_temperature)
    log = loop.train(student, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir("distill_encoder"), desc="distill encoder")
    student.cpu()
    after = _embedding_distance(student, s_tok, s_pooling, s_max_length, examples)
    save_encoder(student, s_tok, s_pooling, s_max_length, run.out / "student" / "query_encoder")
    print(f"[distill encoder] mean cosine to the teacher: {1 - before:.3f} -> {1 - after:.3f}")
    return {"examples": len(examples), "steps": len(log), "cosine_distance_before": before, "cosine_distance_after": after}


def _embedding_distance(model, tok, pooling, max_length, examples) -> float:
    import torch

    from .retrieval import embed

    sample = examples[:256]
    emb = torch.from_numpy(embed(model, tok, [e.text for e in sample], pooling, max_length))
    target = torch.stack([e.target for e in sample])
    return float((1 - (emb * target).sum(-1)).mean())


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


def student_generator_start(run: Run) -> Path:
    """Where the task distillation starts: after the general pass where the recipe has one."""
    return run.stage_dir("distill_general") / "generator" if run.recipe.distill_general.passages else \
        run.stage_dir("student_init") / "generator"


def stage_distill_general(run: Run) -> dict:
    from .distill import teacher_cache
    from .sources import load_generator, load_tokenizer

    cfg = run.recipe.distill_general
    cache_file = run.stage_dir("distill_general") / "teacher_cache.pt"
    t_tok = load_tokenizer(run.out / "teacher" / "generator")
    cached = cache_file.exists()  # computed once, by rank 0; a resumed stage reads it back
    barrier()  # every rank has looked before rank 0 can write it
    if not cached:
        if is_main():
            teacher, _ = load_generator(run.out / "teacher" / "generator")
            examples = general_examples(run, t_tok, cfg.passages, cfg.chunk_tokens)
            cache = teacher_cache(teacher.to(loop.device()), examples, t_tok.pad_token_id, cfg.temperature, cfg.top_k,
                                  hidden=cfg.hidden_weight > 0, progress="teacher logits (corpus text)")
            loop.atomic_torch_save({"examples": [dataclasses.asdict(e) for e in examples], "cache": cache}, cache_file)
            del teacher
        barrier()
    # alpha 0: no labels here, the teacher's distribution is the only target
    return distill_on_cache(run, "distill_general", cfg, alpha=0.0, cache_file=cache_file,
                            start=run.stage_dir("student_init") / "generator",
                            out=run.stage_dir("distill_general") / "generator", desc="distill generator (corpus text)")


def stage_teacher_logits(run: Run) -> dict:
    from .distill import teacher_cache
    from .sources import load_generator
    from .teacher import Prompter, generate, make_examples

    cfg = run.recipe.distill_generator
    teacher, tok = load_generator(run.out / "teacher" / "generator")
    teacher.to(loop.device())
    prompter = Prompter(tok, cfg.max_prompt_tokens, run.recipe.prompt.max_answer_tokens)
    questions = run.questions("train")[:cfg.examples]
    examples, contexts = rag_examples(run, questions, prompter, cfg.k, cfg.gold_probability, seed_offset=2)
    n_seq = 0
    if cfg.seq_kd:
        # Sequence-level KD: the teacher's own answers become extra targets.
        answers = generate(teacher, prompter, [e.prompt for e in examples], progress="teacher answers")
        extra = [(q, c, a) for q, c, a in zip(questions, contexts, answers) if a and a not in q.answers]
        examples += make_examples(prompter, [x[0] for x in extra], [x[1] for x in extra], [x[2] for x in extra])
        n_seq = len(extra)
    cache = teacher_cache(teacher, examples, tok.pad_token_id, cfg.temperature, cfg.top_k, hidden=cfg.hidden_weight > 0,
                          progress="teacher logits")
    if is_main():
        loop.atomic_torch_save({"examples": [dataclasses.asdict(e) for e in examples], "cache": cache},
                               run.stage_dir("teacher_logits") / "cache.pt")
    return {"examples": len(examples), "seq_kd_examples": n_seq, "top_k": cfg.top_k, "temperature": cfg.temperature}


def distill_on_cache(run: Run, stage: str, cfg, alpha: float, cache_file: Path, start: Path, out: Path, desc: str) -> dict:
    """Train the student generator at `start` on cached teacher logits, save it to `out`. The cache is
    in the teacher's token ids; a student with a trimmed vocabulary gets them mapped to its own."""
    import torch

    from .distill import KDExample, generator_loss_fn, remap_kd_examples
    from .sources import load_generator, load_tokenizer
    from .student import train_top_layers
    from .teacher import Example
    from .vocab import id_map

    student, tok = load_generator(start)
    saved = torch.load(cache_file, weights_only=False)
    examples = [KDExample(Example(**e), c) for e, c in zip(saved["examples"], saved["cache"])]
    mapping = id_map(load_tokenizer(run.out / "teacher" / "generator"), tok)
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
    train_top_layers(student, cfg.train_layers)
    student.to(loop.device())
    loss_fn = generator_loss_fn(tok.pad_token_id, cfg.temperature, alpha, cfg.hidden_weight)
    log = loop.train(student, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir(stage), desc=desc)
    save_generator(student.cpu(), tok, out)
    return {"examples": len(examples), "skipped_examples": dropped,
            "target_tokens": sum(len(kd.example.target) for kd in examples), "steps": len(log),
            "first": log[0] if log else None, "last": log[-1] if log else None}


def stage_distill_generator(run: Run) -> dict:
    cfg = run.recipe.distill_generator
    return distill_on_cache(run, "distill_generator", cfg, cfg.alpha, cache_file=run.stage_dir("teacher_logits") / "cache.pt",
                            start=student_generator_start(run), out=run.out / "student" / "generator",
                            desc="distill generator")


def teacher_eval_key(run: Run, questions: list[Question], corpus: list[Passage]) -> str:
    """What a teacher evaluation depends on: the teacher's files, the questions, the corpus and the
    eval settings. Runs that share a teacher (a curve's points) reuse its evaluation by this key."""
    from runtime.manifest import sha256_file

    r = run.recipe
    teacher = run.out / "teacher"
    key = {"teacher": {str(f.relative_to(teacher)): sha256_file(f) for f in sorted(teacher.rglob("*")) if f.is_file()},
           "questions": [q.id for q in questions], "corpus": [p.id for p in corpus], "k": r.eval.k,
           "prompt": dataclasses.asdict(r.prompt)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def stage_eval(run: Run) -> dict:
    import numpy as np

    from .evaluate import evaluate_folder, format_table

    r = run.recipe
    questions = run.questions("eval")
    corpus = run.corpus()
    info = json.loads((run.stage_dir("student_init") / "info.json").read_text())
    teacher_passages = r.student.passage_encoder == "teacher"
    if teacher_passages and is_main():
        # The student's folder carries the encoder of its passage vectors, so export needs nothing else.
        loop.copy_tree_atomic(run.out / "teacher" / "query_encoder", run.out / "student" / "passage_encoder")
    atomic_write_text(run.out / "student" / "edgerag.json", json.dumps(folder_info(
        run, passage_encoder="passage_encoder" if teacher_passages else "query_encoder", student=info,
        teacher=r.teacher.generator), indent=2))
    results = {}
    saved_teacher = run.stage_dir("eval") / "teacher_result.json"
    key = teacher_eval_key(run, questions, corpus)
    if saved_teacher.exists() and json.loads(saved_teacher.read_text())["key"] == key:
        results["teacher"] = json.loads(saved_teacher.read_text())["result"]
        print(f"[eval] teacher: reusing its evaluation on the same questions ({saved_teacher})")
    for name in ("teacher", "student"):
        if name in results:
            continue
        # The teacher's index is reused; a student with its own passage encoder embeds the corpus
        # itself, as the device will.
        emb = np.load(run.out / "index" / "embeddings.npy") if name == "teacher" or teacher_passages else None
        results[name] = evaluate_folder(run.out / name, questions, corpus, r.eval.k, passage_embeddings=emb,
                                        batch_size=r.eval.batch_size, max_prompt_tokens=r.prompt.max_prompt_tokens,
                                        max_answer_tokens=r.prompt.max_answer_tokens,
                                        answers_out=run.stage_dir("eval") / f"{name}_answers.jsonl")
        if name == "teacher":
            atomic_write_text(saved_teacher, json.dumps({"key": key, "result": results[name]}, indent=2))
    report = {"dataset": r.data.eval, "n_questions": len(questions), "k": r.eval.k, **results}
    atomic_write_text(run.out / "eval.json", json.dumps(report, indent=2))
    print(format_table(results))
    return {"eval": str(run.out / "eval.json")}


STAGE_FUNCTIONS = {
    "data": stage_data, "teacher": stage_teacher, "index": stage_index, "teacher_finetune": stage_teacher_finetune,
    "student_init": stage_student_init, "distill_encoder": stage_distill_encoder, "distill_general": stage_distill_general,
    "teacher_logits": stage_teacher_logits, "distill_generator": stage_distill_generator, "eval": stage_eval,
}
PARALLEL = {"teacher_finetune", "distill_encoder", "distill_general", "distill_generator"}   # DDP training stages


# ---------------------------------------------------------------- the driver

def distill(recipe_path, out_dir, resume: bool = False, stop_after: str | None = None) -> dict | None:
    """Run (or resume) every stage of a recipe into `out_dir`; returns the eval report (None if stopped early)."""
    import torch

    recipe = load_recipe(recipe_path)
    out = Path(out_dir)
    text = Path(recipe_path).read_text()
    recipe_copy = out / "recipe.toml"
    if (out / "stages").exists():
        if not resume:
            raise RunError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        # Settings, not text: a recipe whose comments changed still resumes.
        if recipe_copy.exists() and dataclasses.asdict(load_recipe(recipe_copy, check_models=False)) != dataclasses.asdict(recipe):
            raise RunError(f"{recipe_path} sets other values than the recipe {out} was started with ({recipe_copy}); "
                           "start a new run instead of resuming")
    rank, world_size = loop.world()
    torch.set_flush_denormal(True)  # denormal floats make CPU matmuls several times slower
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(recipe_copy, text)
    barrier()
    started = time.time()
    timings = {}
    for name in (STAGES if stop_after is None else STAGES[:STAGES.index(stop_after) + 1]):
        if name == "teacher_finetune" and not recipe.teacher_finetune.enabled:
            continue
        if name == "distill_general" and not recipe.distill_general.passages:
            continue
        run = Run(out, recipe)
        if run.done(name):
            print(f"[{name}] done already, skipped")
            continue
        t0 = time.time()
        loop.seed_everything(recipe.seed)
        if name in PARALLEL or rank == 0:
            info = STAGE_FUNCTIONS[name](run)
            timings[name] = round(time.time() - t0, 1)
            info["seconds"] = timings[name]
            run.mark_done(name, info)
            if rank == 0:  # a finished stage never resumes; its optimizer state is dead weight (660 MB at 55M params)
                (run.stage_dir(name) / "checkpoint.pt").unlink(missing_ok=True)
            if rank == 0:
                print(f"[{name}] finished in {timings[name]:.0f} s")
        barrier()
    if rank == 0:
        print(f"distill: {time.time() - started:.0f} s in all; stages: {timings}")
    if stop_after is None and (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    return None


# ---------------------------------------------------------------- command line

def add_cli(subparsers) -> None:
    """Register `distill` and `eval` on an argparse subparsers object."""
    p = subparsers.add_parser("distill", help="distill the teacher into a student (RUN/student, RUN/eval.json)")
    p.add_argument("recipe", help="recipe TOML (see recipes/)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=_cmd_distill)

    e = subparsers.add_parser("eval", help="evaluate a teacher/student folder or a bundle")
    e.add_argument("model", help="a folder with query_encoder/ and generator/, or a bundle (manifest.json)")
    e.add_argument("--questions", required=True, help="SQuAD-format questions (e.g. xquad-en.json.gz)")
    e.add_argument("--corpus", default=None, help="retrieval corpus (SQuAD or JSONL); default: the questions' passages")
    e.add_argument("--n", type=int, default=None, help="evaluate a seeded sample of N questions")
    e.add_argument("--k", type=int, default=3, help="passages in the prompt")
    e.add_argument("--out", required=True, help="where to write the metrics JSON")
    e.set_defaults(func=_cmd_eval)


def _cmd_distill(args) -> int:
    from .recipe import RecipeError

    try:
        distill(args.recipe, args.out, resume=args.resume)
    except (RecipeError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate_model, format_table

    result = evaluate_model(args.model, args.questions, args.corpus, args.n, args.k)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(format_table({Path(args.model).name or "model": result}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.pipeline")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
