"""The decoder-only family (recipe teacher.kind = "decoder-only"): a sentence-transformers retriever and
a causal LM teacher, distilled into a smaller one; its stages and their table, `STAGES` (in run order).

  data               sample questions, build the corpus                RUN/data/
  teacher            load retriever + generator, save HF folders       RUN/teacher/
  index              embed the corpus with the teacher encoder         RUN/index/
  teacher_finetune   RAG fine-tuning of the teacher generator          RUN/teacher/generator    (teacher_finetune.enabled)
  eval_teacher       the teacher, evaluated                            RUN/stages/eval_teacher/
  student_init       prune/cut the teacher into a student              RUN/stages/student_init/
  distill_encoder    student query encoder <- teacher                  RUN/student/query_encoder
  student_folder     the student's edgerag.json (+ passage encoder)    RUN/student/
  general_cache      teacher top-k logits on corpus text               RUN/stages/general_cache/   (distill_general.passages)
  distill_general    student generator <- teacher on corpus text       RUN/stages/distill_general/ (distill_general.passages)
  teacher_logits     teacher top-k logits on the KD examples           RUN/stages/teacher_logits/
  distill_generator  student generator <- teacher                      RUN/student/generator
  eval               the student, by the same code; both reported      RUN/eval.json

`data` and `distill_encoder` are every family's (edgerag.train.common_stages); a compressed student's
parts are edgerag.train.compressed_student.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from edgerag.data import question_to_dict
from edgerag.runtime.prompt import NO_ANSWER

from . import loop
from .common_stages import DATA, DISTILL_ENCODER
from .compressed_student import compressed_examples, compressed_student_examples, fitted_compression, teacher_reader
from .loop import atomic_write_text, is_main
from .recipe import Recipe, parse_layers
from .retrieval import PassageIndex, embed, passage_text, retrieve_for
from .run import (Run, RunError, Stage, distill_questions, distill_values, finetune_values, local_files,
                  save_encoder, save_generator, section_values, train_config, training_settings, write_jsonl)
from .teacher import example_length


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

    encoder, tok, pooling, max_length = load_encoder(run.teacher_encoder)
    corpus = run.corpus()
    emb = embed(encoder, tok, [passage_text(p.title, p.text) for p in corpus], pooling, max_length, progress="index corpus")
    PassageIndex(corpus, emb).save(run.index_dir)
    return {"passages": len(corpus), "dim": int(emb.shape[1])}


def rag_examples(run: Run, questions, prompter, k: int, gold_probability: float, seed_offset: int, answers=None,
                 ranked=None):
    """Examples of the questions over their top-k passages (`ranked`: retrieved before, at least k deep)."""
    from .teacher import make_examples, rag_context

    ranked = ranked or retrieve_for(run, questions, k)
    rng = random.Random(run.recipe.seed + seed_offset)
    contexts = [rag_context(q, r, k, gold_probability, rng) for q, r in zip(questions, ranked)]
    return make_examples(prompter, questions, contexts, answers), contexts


def negative_passages(run: Run, questions, ranked, k: int, seed_offset: int) -> list[list]:
    """For each question, k passages that cannot answer it (data.unanswerable_passages); ranked: its
    retrieved passages, deep enough to leave k once those that hold an answer are gone."""
    from edgerag.data import unanswerable_passages

    pool = run.corpus()
    rng = random.Random(run.recipe.seed + seed_offset)
    return [unanswerable_passages(q, found, pool, k, rng) for q, found in zip(questions, ranked)]


def negative_examples(prompter, questions, passages) -> list:
    """Examples that answer NO_ANSWER from passages that cannot answer; their ids are the questions'
    with NEGATIVE_ID appended (a compressed student's prompts are matched to examples by id)."""
    from .teacher import NEGATIVE_ID, make_examples

    examples = make_examples(prompter, questions, [[(p.title, p.text) for p in ps] for ps in passages],
                             [NO_ANSWER] * len(questions))
    return [dataclasses.replace(e, question_id=e.question_id + NEGATIVE_ID) for e in examples]


def split_negatives(run: Run, questions: list) -> tuple[list, list]:
    """The stage's questions that get their passages (the first examples - negatives) and those that are
    also asked over passages that cannot answer (the first `abstain.negatives` share of the examples)."""
    negatives = round(len(questions) * run.recipe.abstain.negatives)
    return questions[:len(questions) - negatives], questions[:negatives]


# retrieved passages, deep enough that k remain once those holding an answer are left out
NEGATIVE_DEPTH = 20


def load_for_stage(run: Run, folder, cfg, questions: list | None = None):
    """A generator on the training device, its tokenizer, the prompter of a stage's settings, and the
    stage's training questions (default: the first cfg.examples)."""
    from edgerag.models import load_generator

    from .teacher import Prompter

    model, tok = load_generator(folder)
    model.to(loop.device())
    return model, tok, Prompter(tok, cfg.max_prompt_tokens, run.recipe.prompt.max_answer_tokens), \
        run.questions("train")[:cfg.examples] if questions is None else questions


def stage_teacher_finetune(run: Run) -> dict:
    from edgerag.models import read_info

    from .student import train_top_layers
    from .teacher import answer_loss

    cfg = run.recipe.teacher_finetune
    model, tok, prompter, questions = load_for_stage(run, run.teacher_base_generator, cfg)
    answered, unanswerable = split_negatives(run, questions)
    compressed = cfg.context == "compressed"
    wide = run.recipe.compress.passages if compressed else cfg.k
    depth = max(wide, NEGATIVE_DEPTH if unanswerable else 0)
    ranked = retrieve_for(run, questions, depth) if unanswerable or compressed else None
    examples, _ = rag_examples(run, answered, prompter, cfg.k, cfg.gold_probability, seed_offset=1, ranked=ranked)
    negatives = negative_passages(run, unanswerable, ranked, wide, 5) if unanswerable else []
    examples += negative_examples(prompter, unanswerable, [ps[:cfg.k] for ps in negatives])
    info = {}
    teacher_info = {k: v for k, v in read_info(run.teacher_dir).items() if k not in ("compression", "template", "k")}
    if compressed:
        # the teacher learns to read what the student will: the pieces of its top passages (the gold one
        # inserted where retrieval missed it, with cfg.gold_probability), chosen by its own encoder
        reader = teacher_reader(run)
        examples, share = compressed_examples(run, reader, answered, examples, ranked, list(zip(unanswerable, negatives)),
                                              cfg.gold_probability, seed_offset=1)
        info.update(prompt_tokens=round(sum(len(e.prompt) for e in examples) / max(len(examples), 1), 1),
                    answer_in_context=share)
        teacher_info.update(compression=reader.compression.to_dict(), template="compact", k=reader.compression.passages)
    train_top_layers(model, cfg.train_layers)
    log = loop.train(model, examples, lambda m, b: (answer_loss(m, b, tok.pad_token_id), {}),
                     train_config(cfg, run.recipe), run.stage_dir("teacher_finetune"), desc="teacher fine-tune",
                     length=example_length)
    save_generator(model.cpu(), tok, run.teacher_generator)
    if is_main():  # what the teacher reads travels with its folder: evaluation and teacher_logits read it there
        atomic_write_text(run.teacher_info, json.dumps(teacher_info, indent=2))
    return {"examples": len(examples), "negatives": len(unanswerable), "steps": len(log),
            "first_loss": log[0]["loss"] if log else None, "last_loss": log[-1]["loss"] if log else None, **info}


def calibration_sequences(run: Run, prompter, n: int) -> list[list[int]]:
    """Gold-passage prompts with their answers: text like what the student will see."""
    from .teacher import make_examples

    questions = run.questions("train")[:n]
    examples = make_examples(prompter, questions, [[(q.title, q.context)] for q in questions])
    return [e.prompt + e.target for e in examples]


def vocabulary_texts(run: Run, max_rank: int = 20) -> list[str]:
    """Every piece of text the student reads or writes, in the pieces the prompt tokenizes separately:
    the templates, corpus passages and their headers, the train questions and their answers. A
    compressed context starts a passage's text at its first kept piece, which may be any of its
    sentences ("They ..." where the passage has " They"), so each piece counts as a start too."""
    from edgerag.runtime.prompt import CHATML, CHATML_COMPACT, PLAIN, PLAIN_COMPACT

    texts = [NO_ANSWER]
    for template in (CHATML, PLAIN, CHATML_COMPACT, PLAIN_COMPACT):
        texts += [template["prefix"], template["passage_end"], template["answer_end"], *template["question"].split("{question}")]
    for p in run.corpus():
        texts += passage_texts(p.title, p.text, max_rank)
    for q in run.questions("train"):
        texts.append(q.question.strip())
        texts += [a.strip() for a in q.answers]
    return texts


def passage_texts(title: str, text: str, max_rank: int = 20) -> list[str]:
    """A passage as prompts tokenize it: its text, each of its pieces as the start of a compressed
    context's text, and its headers (ranked, and compact)."""
    from edgerag.runtime.compress import split_pieces
    from edgerag.runtime.prompt import CHATML, CHATML_COMPACT

    return [text, *split_pieces(text), *[CHATML["passage"].format(rank=rank, title=title) for rank in range(1, max_rank + 1)],
            CHATML_COMPACT["passage"].format(title=title)]


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
    if run.keeps_teacher_encoder:  # distill_encoder copies it into the student folder
        params = count_params(encoder)
        info["query_encoder"] = {"from": "teacher", "params": params, "teacher_params": params}
    elif s.query_encoder:
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


def stage_student_folder(run: Run) -> dict:
    """RUN/student/edgerag.json, before any generator is there: the prompt settings, how the student was
    made, and which encoder embeds its passages. A student ranked against the teacher's passage vectors
    carries that encoder (student/passage_encoder), so export needs nothing else."""
    r = run.recipe
    made = {k: v for k, v in json.loads(run.student_init_info.read_text()).items() if k not in ("seconds", "fingerprint")}
    if run.separate_passage_encoder:
        loop.copy_tree_atomic(run.teacher_encoder, run.student_passage_encoder)
    passage_encoder = run.student_passage_encoder.name if run.separate_passage_encoder else "query_encoder"
    info = folder_info(run, passage_encoder=passage_encoder, student=made, teacher=r.teacher.generator)
    result = {"passage_encoder": passage_encoder}
    if r.compress.enabled:
        compression, shares = fitted_compression(run)
        # the template and the passages to retrieve travel with the student (edgerag export reads them)
        info.update(compression=compression.to_dict(), template="compact", k=compression.passages)
        kept = "teacher_piece_kept" if r.compress.fit_target == "teacher" else "answer_in_context"
        result.update(selector=compression.selector.to_dict(), **{f"{kept}_by_lexical_weight": shares})
    if r.abstain.negatives:
        info["abstention"] = {"no_answer": NO_ANSWER, "calibration": CALIBRATION_FILE}
        result["calibration_questions"] = len(write_calibration(run))
    atomic_write_text(run.student_info, json.dumps(info, indent=2))
    return result


# in the student folder: held-in questions (with their passages) that export fits the abstention threshold on
CALIBRATION_FILE = "calibration.jsonl"


def write_calibration(run: Run) -> list:
    """abstain.calibration_questions of the train file's questions, those the run does not train on first."""
    from edgerag.data import data_path, read_squad, sample_questions

    d = run.recipe.data
    _, questions, _ = read_squad(data_path(d.train, d.data_dir or None))
    used = {q.id for q in run.questions("train")}
    n = run.recipe.abstain.calibration_questions
    # questions the run does not train on, topped up with those it does where the file has too few
    held = sample_questions([q for q in questions if q.id not in used], n, run.recipe.seed + 7)
    held += sample_questions([q for q in questions if q.id in used], n - len(held), run.recipe.seed + 7)[:max(n - len(held), 0)]
    write_jsonl(run.student_dir / CALIBRATION_FILE, [question_to_dict(q) for q in held])
    return held


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
                          hidden=cfg.hidden_weight > 0, progress="teacher logits (corpus text)",
                          precision=run.recipe.run.precision, checkpoint=run.stage_dir("general_cache") / "checkpoint.pt",
                          checkpoint_every=run.recipe.run.checkpoint_every)
    loop.atomic_torch_save({"examples": [dataclasses.asdict(e) for e in examples], "cache": cache}, run.general_cache)
    return {"precision": loop.resolve_precision(run.recipe.run.precision), "examples": len(examples), "top_k": cfg.top_k,
            "temperature": cfg.temperature}


def stage_distill_general(run: Run) -> dict:
    # alpha 0: no labels here, the teacher's distribution is the only target
    return distill_on_cache(run, "distill_general", run.recipe.distill_general, alpha=0.0, cache_file=run.general_cache,
                            start=run.student_init_generator, out=run.general_generator,
                            desc="distill generator (corpus text)")


def stage_teacher_logits(run: Run) -> dict:
    from edgerag.models import read_info

    from .distill import teacher_cache
    from .teacher import generate, make_examples

    cfg = run.recipe.distill_generator
    teacher, tok, prompter, questions = load_for_stage(run, run.teacher_generator, cfg, distill_questions(run))
    compress = run.recipe.compress
    answered, unanswerable = split_negatives(run, questions)
    wide = compress.passages if compress.enabled else 0
    # one retrieval for the teacher's top k, the compressed student's wider look and the negatives
    ranked = retrieve_for(run, questions, max(cfg.k, wide, NEGATIVE_DEPTH if unanswerable else 0))
    examples, contexts = rag_examples(run, answered, prompter, cfg.k, cfg.gold_probability, seed_offset=2, ranked=ranked)
    # the teacher reads the first k of the passages that cannot answer, the compressed student all of them
    negatives = negative_passages(run, unanswerable, ranked, max(cfg.k, wide), 6)
    asked_negatives = negative_examples(prompter, unanswerable, [ps[:cfg.k] for ps in negatives])
    teacher_compression = read_info(run.teacher_dir).get("compression")
    if teacher_compression:
        # a teacher fine-tuned on compressed contexts reads them here too: the student's own wide
        # contexts (the same gold insertions, seed offset 3), selected by the teacher's encoder
        from edgerag.runtime.compress import Compression

        reader = teacher_reader(run, Compression.from_dict(teacher_compression))
        both, _ = compressed_examples(run, reader, answered, examples + asked_negatives, ranked,
                                      list(zip(unanswerable, negatives)), cfg.gold_probability, seed_offset=3)
        examples, asked_negatives = both[:len(examples)], both[len(examples):]
    n_seq = 0
    if cfg.seq_kd:
        # Sequence-level KD: the teacher's own answers, to the prompts it reads, become extra targets.
        answers = generate(teacher, prompter, [e.prompt for e in examples], progress="teacher answers")
        extra = [(q, c, a) for q, c, a in zip(answered, contexts, answers) if a and a not in q.answers]
        extras = make_examples(prompter, [x[0] for x in extra], [x[1] for x in extra], [x[2] for x in extra])
        if teacher_compression:  # an extra reads its question's compressed prompt
            prompt_of = {e.question_id: e.prompt for e in examples}
            extras = [dataclasses.replace(e, prompt=prompt_of[e.question_id]) for e in extras]
        examples += extras
        n_seq = len(extra)
    examples += asked_negatives
    projection = None
    if cfg.gradient_weight > 0:
        from .gradient import projection as random_projection

        projection = random_projection(teacher.config.vocab_size, cfg.gradient_projections, run.recipe.seed)
    cache = teacher_cache(teacher, examples, tok.pad_token_id, cfg.temperature, cfg.top_k, hidden=cfg.hidden_weight > 0,
                          progress="teacher logits", gradient_projection=projection, precision=run.recipe.run.precision,
                          checkpoint=run.stage_dir("teacher_logits") / "checkpoint.pt",
                          checkpoint_every=run.recipe.run.checkpoint_every)
    info = {"precision": loop.resolve_precision(run.recipe.run.precision), "examples": len(examples), "negatives": len(unanswerable), "seq_kd_examples": n_seq, "top_k": cfg.top_k, "temperature": cfg.temperature,
            "teacher_prompt_tokens": round(sum(len(e.prompt) for e in examples) / max(len(examples), 1), 1)}
    if run.recipe.compress.enabled:
        # distillation across contexts: the cache holds the teacher's answer distributions over its full
        # passages; the student learns them reading its compressed context
        examples, share = compressed_student_examples(run, answered, examples, ranked,
                                                      list(zip(unanswerable, negatives)))
        info.update(student_prompt_tokens=round(sum(len(e.prompt) for e in examples) / max(len(examples), 1), 1),
                    student_answer_in_context=share)
    if is_main():
        loop.atomic_torch_save({"examples": [dataclasses.asdict(e) for e in examples], "cache": cache}, run.kd_cache)
    return info


def distill_on_cache(run: Run, stage: str, cfg, alpha: float, cache_file: Path, start: Path, out: Path, desc: str) -> dict:
    """Train the student generator at `start` on cached teacher logits, save it to `out`. The cache is
    in the teacher's token ids; a student with a trimmed vocabulary gets them mapped to its own."""
    import torch

    from edgerag.models import load_generator, load_tokenizer

    from .distill import KDExample, Respelling, generator_loss_fn, remap_kd_examples
    from .student import train_top_layers
    from .teacher import Example
    from .vocab import id_map

    student, tok = load_generator(start)
    saved = torch.load(cache_file, weights_only=False)
    examples = [KDExample(Example(**e), c) for e, c in zip(saved["examples"], saved["cache"])]
    teacher_tok = load_tokenizer(run.teacher_generator)
    mapping = id_map(teacher_tok, tok)
    dropped = respelled = 0
    if mapping is not None:
        n = len(examples)
        respell = Respelling(teacher_tok, tok)
        examples = remap_kd_examples(examples, mapping, respell)
        dropped, respelled = n - len(examples), respell.count
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
    log = loop.train(student, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir(stage), desc=desc,
                     length=lambda kd: example_length(kd.example))
    save_generator(student.cpu(), tok, out)
    return {"examples": len(examples), "skipped_examples": dropped, "respelled_prompts": respelled,
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

    from .folder_eval import evaluate_folder

    r = run.recipe
    return evaluate_folder(folder, run.questions("eval"), run.corpus(), r.eval.k,
                           passage_embeddings=np.load(run.index_embeddings) if teacher_vectors else None,
                           batch_size=r.eval.batch_size, max_prompt_tokens=r.prompt.max_prompt_tokens,
                           max_answer_tokens=r.prompt.max_answer_tokens, answers_out=answers_out,
                           unanswerable=r.eval.unanswerable, seed=r.seed)


def stage_eval_teacher(run: Run) -> dict:
    result = evaluate_side(run, run.teacher_dir, True, run.stage_dir("eval_teacher") / "teacher_answers.jsonl")
    atomic_write_text(run.teacher_result, json.dumps(result, indent=2))
    return {"f1": result["f1"], "f1_gold": result["f1_gold"]}


def stage_eval(run: Run) -> dict:
    from edgerag.metrics import format_table

    r = run.recipe
    results = {"teacher": json.loads(run.teacher_result.read_text()),
               "student": evaluate_side(run, run.student_dir, run.teacher_passages,
                                      run.stage_dir("eval") / "student_answers.jsonl")}
    report = {"dataset": r.data.eval, "n_questions": len(run.questions("eval")), "k": r.eval.k, **results}
    atomic_write_text(run.eval_report, json.dumps(report, indent=2))
    print(format_table(results))
    return {"eval": str(run.eval_report)}


# ---------------------------------------------------------------- the stage table

def _compressed_teacher(r: Recipe) -> bool:
    return r.teacher_finetune.context == "compressed"


def _compress_values(c) -> dict:
    # fit_target came later: left out at its default, so that earlier runs' stages stay reusable
    return section_values(c, *(["fit_target"] if c.fit_target == "answer" else []))


def _teacher_outputs(run: Run) -> list[Path]:
    base = [] if run.recipe.teacher_finetune.enabled else [run.teacher_generator]  # else inside stages/teacher/
    return [run.teacher_encoder, run.teacher_info, *base]


def _kd_settings(r: Recipe) -> dict:
    g = r.distill_generator
    return {"seed": r.seed, "max_answer_tokens": r.prompt.max_answer_tokens, "hidden": g.hidden_weight > 0,
            **{k: getattr(g, k) for k in ("examples", "k", "gold_probability", "max_prompt_tokens", "seq_kd",
                                           "temperature", "top_k")},
            **({"gradient_projections": g.gradient_projections} if g.gradient_weight > 0 else {}),
            **({"questions": g.questions} if g.questions != "teacher" else {}),
            **({"compress": _compress_values(r.compress), "prompt": section_values(r.prompt)} if r.compress.enabled else {}),
            **_negatives(r), **training_settings(r, batched=False)}


def _compress_inputs(run: Run) -> list[Path]:
    """What a compressed student's contexts depend on: its encoders and the retrieval they select from."""
    if not run.recipe.compress.enabled:
        return []
    return [run.student_encoder, *([run.teacher_encoder] if run.teacher_passages else []), run.teacher_generator,
            run.index_embeddings, run.train_file, run.corpus_file]


def _negatives(r: Recipe) -> dict:
    # only where set, so that the runs made before abstention keep their fingerprints
    return {"negatives": r.abstain.negatives} if r.abstain.negatives else {}


def _no_unanswerable(r: Recipe) -> tuple:
    # left out where 0, so that the runs made before it keep their fingerprints
    return () if r.eval.unanswerable else ("unanswerable",)


def _general_enabled(r: Recipe) -> bool:
    return r.distill_general.passages > 0


STAGES = [
    DATA,
    Stage("teacher", stage_teacher,
          inputs=lambda run: local_files(run.recipe.teacher.query_encoder, run.recipe.teacher.generator),
          outputs=_teacher_outputs,
          settings=lambda r: {"teacher": section_values(r.teacher), "prompt": section_values(r.prompt),
                              "finetune": r.teacher_finetune.enabled}),
    Stage("index", stage_index,
          inputs=lambda run: [run.teacher_encoder, run.corpus_file],
          outputs=lambda run: [run.index_dir],
          settings=lambda r: {}),
    Stage("teacher_finetune", stage_teacher_finetune,
          inputs=lambda run: [run.teacher_base_generator, run.teacher_encoder, run.index_embeddings, run.corpus_file,
                              run.train_file],
          outputs=lambda run: [run.teacher_generator, *([run.teacher_info] if _compressed_teacher(run.recipe) else [])],
          settings=lambda r: {"seed": r.seed, "teacher_finetune": finetune_values(r.teacher_finetune),
                              "max_answer_tokens": r.prompt.max_answer_tokens, **_negatives(r), **training_settings(r),
                              **({"compress": _compress_values(r.compress), "prompt": section_values(r.prompt)}
                                 if _compressed_teacher(r) else {})},
          parallel=True, enabled=lambda r: r.teacher_finetune.enabled),
    # right after the teacher is final: a teacher not worth copying shows before any student is made
    Stage("eval_teacher", stage_eval_teacher,
          inputs=lambda run: [run.teacher_encoder, run.teacher_generator, run.teacher_info, run.index_embeddings,
                              run.eval_file, run.corpus_file],
          outputs=lambda run: [],
          settings=lambda r: {"eval": section_values(r.eval, "questions", *_no_unanswerable(r)),
                              "prompt": section_values(r.prompt)}),
    Stage("student_init", stage_student_init,
          inputs=lambda run: [run.teacher_generator, run.teacher_encoder, run.train_file, run.corpus_file,
                              *local_files(run.recipe.student.generator,
                                          *([] if run.keeps_teacher_encoder else [run.recipe.student.query_encoder]))],
          outputs=lambda run: [],
          settings=lambda r: {"seed": r.seed, "student": section_values(r.student, "passage_encoder"), "prompt": section_values(r.prompt)}),
    DISTILL_ENCODER,
    Stage("student_folder", stage_student_folder,
          inputs=lambda run: [run.student_init_info, *([run.teacher_encoder] if run.separate_passage_encoder else []),
                              *_compress_inputs(run)],
          outputs=lambda run: [run.student_info, *([run.student_passage_encoder] if run.separate_passage_encoder else []),
                               *([run.student_dir / CALIBRATION_FILE] if run.recipe.abstain.negatives else [])],
          settings=lambda r: {"passage_encoder": r.student.passage_encoder, "prompt": section_values(r.prompt),
                              "teacher": r.teacher.generator,
                              **({"compress": _compress_values(r.compress)} if r.compress.enabled else {}),
                              **({"abstain": section_values(r.abstain)} if r.abstain.negatives else {})}),
    Stage("general_cache", stage_general_cache,
          inputs=lambda run: [run.teacher_generator, run.corpus_file],
          outputs=lambda run: [],
          settings=lambda r: {"seed": r.seed, "hidden": r.distill_general.hidden_weight > 0,
                              **{k: getattr(r.distill_general, k) for k in ("passages", "chunk_tokens", "temperature", "top_k")},
                              **training_settings(r, batched=False)},
          enabled=_general_enabled),
    Stage("distill_general", stage_distill_general,
          inputs=lambda run: [run.general_cache, run.student_init_generator, run.teacher_generator],
          outputs=lambda run: [],
          settings=lambda r: {"seed": r.seed, "distill_general": section_values(r.distill_general), **training_settings(r)},
          parallel=True, enabled=_general_enabled),
    Stage("teacher_logits", stage_teacher_logits,
          inputs=lambda run: [run.teacher_generator, run.teacher_encoder, run.index_embeddings, run.corpus_file,
                              run.train_file, *([run.student_info, *_compress_inputs(run)] if run.recipe.compress.enabled else [])],
          outputs=lambda run: [],
          settings=_kd_settings),
    Stage("distill_generator", stage_distill_generator,
          inputs=lambda run: [run.kd_cache, run.student_generator_start, run.teacher_generator],
          outputs=lambda run: [run.student_generator],
          settings=lambda r: {"seed": r.seed, "distill_generator": distill_values(r.distill_generator), **training_settings(r)},
          parallel=True),
    Stage("eval", stage_eval,
          inputs=lambda run: [run.student_encoder, run.student_generator, run.student_info, run.teacher_result,
                              run.eval_file, run.corpus_file, *([run.index_embeddings] if run.teacher_passages else [])],
          outputs=lambda run: [run.eval_report],
          settings=lambda r: {"eval": section_values(r.eval, "questions", *_no_unanswerable(r)),
                              "prompt": section_values(r.prompt), "dataset": r.data.eval,
                              "passage_encoder": r.student.passage_encoder}),
]

