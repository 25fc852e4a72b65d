"""The stages that every family runs the same way, and their declarations in the stage tables.

  data               sample questions, build the corpus                RUN/data/
  distill_encoder    student query encoder <- teacher                  RUN/student/query_encoder

The encoder distillation reads the teacher's and the student's query encoders as sentence-transformers
folders, whatever the family: a decoder-only run's MiniLM, a RAG run's DPR question encoder.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from edgerag.data import data_path, question_to_dict, read_passages, read_squad, sample_questions

from . import loop
from .run import Run, Stage, save_encoder, section_values, train_config, training_settings, write_jsonl


def stage_data(run: Run) -> dict:
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


def stage_distill_encoder(run: Run) -> dict:
    if run.keeps_teacher_encoder:
        if loop.is_main():  # one writer under torchrun: the driver's barrier holds the other ranks
            loop.copy_tree_atomic(run.teacher_encoder, run.student_encoder)
        print("[distill encoder] the student keeps the teacher's query encoder")
        return {"kept": "teacher"}
    import numpy as np
    import torch

    from edgerag.model_files import normalizes
    from edgerag.models import load_encoder

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
    token_counts = {t: len(ids) for t, ids in zip(texts, s_tok(texts, truncation=True, max_length=s_max_length)["input_ids"])}
    log = loop.train(student, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir("distill_encoder"),
                     desc="distill encoder", length=lambda e: token_counts[e.text])
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


def _data_files(run: Run) -> list[Path]:
    d = run.recipe.data
    return [data_path(name, d.data_dir or None) for name in (d.train, d.eval, d.corpus) if name]


DATA = Stage("data", stage_data,
             inputs=_data_files,
             outputs=lambda run: [run.data_dir],
             settings=lambda r: {"seed": r.seed, "data": section_values(r.data), "eval_questions": r.eval.questions})

# Reads only the student's query encoder: students that differ in their generator share it.
DISTILL_ENCODER = Stage("distill_encoder", stage_distill_encoder,
                        inputs=lambda run: [run.teacher_encoder] if run.keeps_teacher_encoder else
                                           [run.teacher_encoder, run.student_init_encoder, run.index_embeddings,
                                            run.corpus_file, run.train_file],
                        outputs=lambda run: [run.student_encoder],
                        settings=lambda r: {"kept": "teacher"} if r.student.keeps_teacher_encoder else
                                           {"seed": r.seed, "distill_encoder": section_values(r.distill_encoder),
                                            **training_settings(r)},
                        parallel=True)
