"""The Hugging Face RAG family's stages (recipe teacher.kind = "hf-rag") and their table, `STAGES`,
named as the decoder-only family's are; its model, losses and generation are edgerag.train.rag_model.

  data               sample questions, build the corpus                     RUN/data/
  teacher            the RAG checkpoint, its DPR encoders                    RUN/teacher/ (rag/, query_encoder/, passage_encoder/)
  index              embed the corpus with the DPR context encoder           RUN/index/
  teacher_finetune   RAG's own fine-tuning (question encoder + generator)    RUN/teacher/rag    (teacher_finetune.enabled)
  eval_teacher       the teacher, evaluated                                  RUN/stages/eval_teacher/
  student_init       cut the teacher's BART and question encoder             RUN/stages/student_init/
  distill_encoder    student question encoder <- teacher                     RUN/student/query_encoder
  student_folder     the student's edgerag.json + the DPR passage encoder    RUN/student/
  teacher_logits     the teacher's RAG-token marginal on the KD examples     RUN/stages/teacher_logits/
  distill_generator  student generator <- the teacher's marginal             RUN/student/generator
  eval               the student, by the same code; both reported            RUN/eval.json

The training stages run on one process: they reach into the RAG model's submodules, past DDP's wrapper.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from . import loop
from .common_stages import DATA, DISTILL_ENCODER
from .loop import atomic_write_text, is_main
from .rag_model import (PASSAGE_MAX_LENGTH, QUESTION_MAX_LENGTH, RagExample, answer_gradient, answer_logits,
                        cut_bart, doc_scores_for, dpr_bert, load_rag, make_rag_examples, marginal_logprobs,
                        nll, rag_marginal, save_dpr_encoder, student_input, target_labels)
from .retrieval import DPR_PASSAGE_FORMAT, PassageIndex, embed
from .run import (Stage, distill_questions, distill_values, finetune_values, local_files, save_generator, section_values,
                  train_config, training_settings)
from .teacher import right_pad


def _layers(spec, depth: int, name: str) -> list[int]:
    from .recipe import RecipeError, parse_layers

    layers = parse_layers(spec, depth, name)
    if isinstance(layers, str):
        raise RecipeError(f"{name}: 'auto:N' is not available for hf-rag students; list the layers or give a count")
    return layers


# ---------------------------------------------------------------- retrieval in the run

def search_rows(encoder_folder, questions, k: int, index_embeddings) -> list[list[int]]:
    """Corpus rows of each question's top-k passages, by a DPR question encoder folder."""
    import numpy as np

    from edgerag.models import load_encoder

    encoder, tok, pooling, max_length = load_encoder(encoder_folder)
    vectors = np.load(index_embeddings)
    q = embed(encoder, tok, [x.question for x in questions], pooling, max_length, normalize=False)
    return PassageIndex(range(len(vectors)), vectors).search(q, k)


def _rag_paths(run):
    t = run.teacher_dir
    base = run.stage_dir("teacher") / "rag" if run.recipe.teacher_finetune.enabled else t / "rag"
    return {"rag": t / "rag", "base": base, "passage_encoder": t / "passage_encoder"}


def _examples(run, generator, tokenizer, questions, k, max_tokens, gold_probability, seed_offset, encoder_folder):
    rows = search_rows(encoder_folder, questions, k, run.index_embeddings)
    corpus = run.corpus()
    return make_rag_examples(questions, rows, corpus, tokenizer, generator, k, max_tokens,
                             run.recipe.prompt.max_answer_tokens, gold_probability,
                             random.Random(run.recipe.seed + seed_offset), {p.id: i for i, p in enumerate(corpus)})


def _passage_vectors(run):
    import numpy as np
    import torch

    return torch.from_numpy(np.load(run.index_embeddings))


# ---------------------------------------------------------------- stages

def stage_teacher(run) -> dict:
    from transformers import AutoTokenizer, DPRContextEncoder

    from edgerag.models import resolve

    from .student import count_params

    t, paths = run.recipe.teacher, _rag_paths(run)
    model, tok = load_rag(t.rag)
    ctx_path = resolve(t.context_encoder).path
    ctx = DPRContextEncoder.from_pretrained(ctx_path)
    save_dpr_encoder(dpr_bert(ctx), AutoTokenizer.from_pretrained(ctx_path), paths["passage_encoder"], PASSAGE_MAX_LENGTH)
    if is_main():
        loop.save_pretrained_atomic(model, tok, paths["base"])
    if not run.recipe.teacher_finetune.enabled:
        save_dpr_encoder(dpr_bert(model.question_encoder), tok.question_encoder, run.teacher_encoder, QUESTION_MAX_LENGTH)
    info = {"rag": t.rag, "context_encoder": t.context_encoder, "architecture": type(model).__name__,
            "question_encoder_params": count_params(model.question_encoder),
            "generator_params": count_params(model.generator), "context_encoder_params": count_params(ctx)}
    atomic_write_text(run.teacher_info, json.dumps(_folder_info(run, **info), indent=2))
    return info


def _folder_info(run, **extra) -> dict:
    p = run.recipe.prompt
    return {"family": "encoder-decoder", "max_prompt_tokens": p.max_prompt_tokens, "max_answer_tokens": p.max_answer_tokens,
            "passage_encoder": "passage_encoder", "passage_format": DPR_PASSAGE_FORMAT, **extra}


def stage_index(run) -> dict:
    from edgerag.models import load_encoder

    encoder, tok, pooling, max_length = load_encoder(_rag_paths(run)["passage_encoder"])
    corpus = run.corpus()
    vectors = embed(encoder, tok, [run.passage_string(p) for p in corpus], pooling, max_length,
                    progress="index corpus (DPR)", normalize=False)
    PassageIndex(corpus, vectors).save(run.index_dir)
    return {"passages": len(corpus), "dim": int(vectors.shape[1])}


def _unwrap(model):
    return getattr(model, "module", model)


def stage_teacher_finetune(run) -> dict:
    """RAG's fine-tuning: the question encoder and the generator learn, on the marginal likelihood of
    the gold answer over the top-k passages; the passage encoder and the index stay fixed. Passages
    are retrieved once, by the checkpoint's question encoder; doc scores follow it as it learns."""
    cfg, paths = run.recipe.teacher_finetune, _rag_paths(run)
    model, tok = load_rag(paths["base"])
    with_encoder = paths["base"].parent / "question_encoder"
    save_dpr_encoder(dpr_bert(model.question_encoder), tok.question_encoder, with_encoder, QUESTION_MAX_LENGTH)
    questions = run.questions("train")[:cfg.examples]
    examples = _examples(run, model.generator, tok.generator, questions, cfg.k, cfg.max_prompt_tokens,
                         cfg.gold_probability, 1, with_encoder)
    vectors, pad_id = _passage_vectors(run), model.config.generator.pad_token_id

    def loss_fn(m, batch):
        m = _unwrap(m)
        logprobs = marginal_logprobs(m.generator, dpr_bert(m.question_encoder), tok.question_encoder, batch, vectors, pad_id)
        return nll(logprobs, target_labels(batch)), {}

    model.to(loop.device())
    # marginal_logprobs pads every passage of the batch to the longest one
    log = loop.train(model, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir("teacher_finetune"),
                     length=lambda e: max(len(c) for c in e.contexts),
                     desc="teacher fine-tune (RAG)")
    model.cpu()
    if is_main():
        loop.save_pretrained_atomic(model, tok, paths["rag"])
    save_dpr_encoder(dpr_bert(model.question_encoder), tok.question_encoder, run.teacher_encoder, QUESTION_MAX_LENGTH)
    return {"examples": len(examples), "steps": len(log), "first_loss": log[0]["loss"] if log else None,
            "last_loss": log[-1]["loss"] if log else None}


def stage_student_init(run) -> dict:
    s = run.recipe.student
    model, tok = load_rag(_rag_paths(run)["rag"])
    generator = model.generator
    info = {"generator": cut_bart(generator,
                                  _layers(s.generator_encoder_layers, generator.config.encoder_layers, "student.generator_encoder_layers"),
                                  _layers(s.layers, generator.config.decoder_layers, "student.layers"))}
    if is_main():
        loop.save_pretrained_atomic(generator, tok.generator, run.student_init_generator)
    from .student import count_params, shrink_encoder

    question = dpr_bert(model.question_encoder)
    if run.keeps_teacher_encoder:  # distill_encoder copies it into the student folder
        params = count_params(question)
        info["query_encoder"] = {"from": "teacher", "params": params, "teacher_params": params}
    else:
        info["query_encoder"] = shrink_encoder(question, _layers(s.encoder_layers, question.config.num_hidden_layers,
                                                                 "student.encoder_layers"))
        save_dpr_encoder(question, tok.question_encoder, run.student_init_encoder, QUESTION_MAX_LENGTH)
    g, e = info["generator"], info["query_encoder"]
    print(f"[student] generator {g['params']:,} params ({100 * g['params'] / g['teacher_params']:.0f}% of the teacher's), "
          f"question encoder {e['params']:,} ({100 * e['params'] / e['teacher_params']:.0f}%)")
    return info


def stage_student_folder(run) -> dict:
    """RUN/student/edgerag.json and the teacher's DPR passage encoder beside the student (passages
    keep the teacher's vectors)."""
    loop.copy_tree_atomic(_rag_paths(run)["passage_encoder"], run.student_passage_encoder)
    made = {k: v for k, v in json.loads(run.student_init_info.read_text()).items() if k not in ("seconds", "fingerprint")}
    atomic_write_text(run.student_info, json.dumps(_folder_info(run, reading=run.recipe.student.reading, student=made,
                                                                teacher=run.recipe.teacher.rag,
                                                                k=run.recipe.distill_generator.k), indent=2))
    return {"reading": run.recipe.student.reading}


def stage_teacher_logits(run) -> dict:
    """The teacher's RAG-token marginal on the KD examples (top-k log-probs at temperature T per answer
    position); with gradient matching, also the teacher's projected input gradient on the input the
    student will read (the generator reading the student's context: both gradients at one point)."""
    import torch

    from .gradient import project, projection, token_space_map

    cfg, reading = run.recipe.distill_generator, run.recipe.student.reading
    model, tok = load_rag(_rag_paths(run)["rag"])
    model.to(loop.device())
    questions = distill_questions(run)
    examples = _examples(run, model.generator, tok.generator, questions, cfg.k, cfg.max_prompt_tokens,
                         cfg.gold_probability, 2, run.teacher_encoder)
    vectors, pad_id = _passage_vectors(run), model.config.generator.pad_token_id
    question = dpr_bert(model.question_encoder)
    token_map = None
    if cfg.gradient_weight > 0:
        token_map = token_space_map(model.generator, projection(model.config.generator.vocab_size,
                                                                cfg.gradient_projections, run.recipe.seed)).detach()
    from tqdm.auto import tqdm

    cache = []
    precision = run.recipe.run.precision
    for e in tqdm(examples, desc="teacher marginal"):
        with torch.no_grad(), loop.autocast(precision, loop.device().type):
            doc_scores = doc_scores_for(question, tok.question_encoder, [e], vectors).float()
            marginal = rag_marginal(answer_logits(model.generator, e.contexts, [e.decoder] * len(e.rows), pad_id).float(),
                                    doc_scores, len(e.rows))[0]
            values, ids = torch.log_softmax(marginal / cfg.temperature, -1).topk(cfg.top_k, -1)
        item = {"logp": values.float().cpu(), "ids": ids.to(torch.int32).cpu()}
        if token_map is not None:
            rows = student_input(e, reading)
            with loop.autocast(precision, loop.device().type):
                grad, mask = answer_gradient(model.generator, rows, e, doc_scores, pad_id)
            item["gradient"] = project(grad.float(), mask, token_map).detach().cpu()
        cache.append(item)
    if is_main():
        loop.atomic_torch_save({"examples": [dataclasses.asdict(e) for e in examples], "cache": cache}, run.kd_cache)
    return {"precision": loop.resolve_precision(precision), "examples": len(examples), "top_k": cfg.top_k,
            "temperature": cfg.temperature, "gradient_projections": cfg.gradient_projections if token_map is not None else 0}


def stage_distill_generator(run) -> dict:
    """The student's generator learns the teacher's marginal: alpha * CE(gold) + (1 - alpha) * T^2 *
    KL(teacher marginal || student), plus gradient_weight * gradient matching where set."""
    import torch
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from edgerag.models import load_encoder

    from .distill import disable_dropout, kl_to_topk
    from .gradient import input_embeddings, matching_loss, project, projection, token_space_map

    cfg, reading = run.recipe.distill_generator, run.recipe.student.reading
    # gradient matching backpropagates through a gradient: SDPA's CPU kernel has no double backward
    student = BartForConditionalGeneration.from_pretrained(
        run.student_init_generator, **({"attn_implementation": "eager"} if cfg.gradient_weight > 0 else {}))
    tok = AutoTokenizer.from_pretrained(run.student_init_generator)
    saved = torch.load(run.kd_cache, weights_only=False)
    examples = [(RagExample(**e), c) for e, c in zip(saved["examples"], saved["cache"])]
    pad_id, T = student.config.pad_token_id, cfg.temperature
    doc_scores = {}
    if reading == "marginalized":  # the student's own retrieval scores, from its distilled question encoder
        encoder, q_tok, _, _ = load_encoder(run.student_encoder)
        vectors = _passage_vectors(run)
        with torch.no_grad():
            for e, _ in examples:
                doc_scores[e.question_id] = doc_scores_for(encoder, q_tok, [e], vectors)
    P = projection(student.config.vocab_size, cfg.gradient_projections, run.recipe.seed) if cfg.gradient_weight > 0 else None

    def loss_fn(m, batch):
        m = _unwrap(m)
        ce, kl, grads, targets, n = 0.0, 0.0, [], [], 0
        token_map = token_space_map(m, P) if P is not None else None
        for e, cache in batch:
            rows = student_input(e, reading)
            embeds = None
            if token_map is not None:  # one forward pass serves the loss and the input gradient
                ids, mask = right_pad(rows, pad_id)
                embeds = input_embeddings(m, ids.to(next(m.parameters()).device), create_graph=True)
            logits = answer_logits(m, rows, [e.decoder] * len(rows), pad_id, inputs_embeds=embeds)
            if reading == "concatenated":
                logprobs = torch.log_softmax(logits.float(), -1)[0]
            else:
                logprobs = rag_marginal(logits, doc_scores[e.question_id].to(logits.device), len(rows))[0]
            labels = torch.tensor(e.target, device=logprobs.device)
            answer_loglik = logprobs[torch.arange(len(labels)), labels].sum()
            ce = ce - answer_loglik
            kl = kl + kl_to_topk(torch.log_softmax(logprobs / T, -1), cache)
            n += len(labels)
            if token_map is not None:
                grad, = torch.autograd.grad(answer_loglik, embeds, create_graph=True)
                grads.append(project(grad, mask, token_map))
                targets.append(cache["gradient"])
        ce, kl = ce / n, kl / n * T ** 2
        loss = cfg.alpha * ce + (1 - cfg.alpha) * kl
        parts = {"ce": ce.detach(), "kl": kl.detach()}
        if grads:
            matching = matching_loss(grads, targets)
            loss = loss + cfg.gradient_weight * matching
            parts["gradient"] = matching.detach()
        return loss, parts

    disable_dropout(student)
    student.to(loop.device())
    log = loop.train(student, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir("distill_generator"),
                     desc="distill generator (RAG marginal)")
    save_generator(student.cpu(), tok, run.student_generator)
    return {"examples": len(examples), "steps": len(log), "reading": reading,
            "first": log[0] if log else None, "last": log[-1] if log else None}


# ---------------------------------------------------------------- evaluation

def evaluate_rag(run, side: str, answers_out: Path) -> dict:
    """The run's teacher or student on its eval questions and corpus (the teacher's DPR index)."""
    import numpy as np

    from .folder_eval import evaluate_rag_folder

    r = run.recipe
    folder = run.teacher_dir if side == "teacher" else run.student_dir
    return evaluate_rag_folder(folder, run.questions("eval"), run.corpus(), r.eval.k, np.load(run.index_embeddings),
                               r.prompt.max_prompt_tokens, r.prompt.max_answer_tokens, r.eval.batch_size, answers_out)


def stage_eval_teacher(run) -> dict:
    result = evaluate_rag(run, "teacher", run.stage_dir("eval_teacher") / "teacher_answers.jsonl")
    atomic_write_text(run.teacher_result, json.dumps(result, indent=2))
    return {"f1": result["f1"], "f1_gold": result["f1_gold"]}


def stage_eval(run) -> dict:
    from edgerag.metrics import format_table

    r = run.recipe
    results = {"teacher": json.loads(run.teacher_result.read_text()),
               "student": evaluate_rag(run, "student", run.stage_dir("eval") / "student_answers.jsonl")}
    report = {"dataset": r.data.eval, "n_questions": len(run.questions("eval")), "k": r.eval.k, **results}
    atomic_write_text(run.eval_report, json.dumps(report, indent=2))
    print(format_table(results))
    return {"eval": str(run.eval_report)}


# ---------------------------------------------------------------- the stage table

def _finetune(r) -> bool:
    return r.teacher_finetune.enabled


def _teacher_outputs(run) -> list[Path]:
    paths = _rag_paths(run)
    return [paths["passage_encoder"], run.teacher_info] + ([] if run.recipe.teacher_finetune.enabled
                                                           else [paths["rag"], run.teacher_encoder])


def _kd_settings(r) -> dict:
    return {"seed": r.seed, "reading": r.student.reading, "max_answer_tokens": r.prompt.max_answer_tokens,
            **{k: getattr(r.distill_generator, k) for k in ("examples", "k", "gold_probability", "max_prompt_tokens",
                                                            "temperature", "top_k", "gradient_projections")},
            **({"questions": r.distill_generator.questions} if r.distill_generator.questions != "teacher" else {}),
            "gradient": r.distill_generator.gradient_weight > 0}


STAGES = [
    DATA,
    Stage("teacher", stage_teacher,
          inputs=lambda run: local_files(run.recipe.teacher.rag, run.recipe.teacher.context_encoder),
          outputs=_teacher_outputs,
          settings=lambda r: {"teacher": section_values(r.teacher), "prompt": section_values(r.prompt),
                              "finetune": _finetune(r)}),
    Stage("index", stage_index,
          inputs=lambda run: [_rag_paths(run)["passage_encoder"], run.corpus_file],
          outputs=lambda run: [run.index_dir], settings=lambda r: {}),
    Stage("teacher_finetune", stage_teacher_finetune,
          inputs=lambda run: [_rag_paths(run)["base"], run.index_embeddings, run.corpus_file, run.train_file],
          outputs=lambda run: [_rag_paths(run)["rag"], run.teacher_encoder],
          settings=lambda r: {"seed": r.seed, "teacher_finetune": finetune_values(r.teacher_finetune),
                              "max_answer_tokens": r.prompt.max_answer_tokens, **training_settings(r)},
          enabled=_finetune),  # one process: the RAG losses reach into submodules, past DDP's wrapper
    Stage("eval_teacher", stage_eval_teacher,
          inputs=lambda run: [_rag_paths(run)["rag"], run.teacher_encoder, run.index_embeddings, run.eval_file,
                              run.corpus_file],
          outputs=lambda run: [],
          settings=lambda r: {"eval": section_values(r.eval, "questions", "unanswerable"), "prompt": section_values(r.prompt)}),
    Stage("student_init", stage_student_init,
          inputs=lambda run: [_rag_paths(run)["rag"]], outputs=lambda run: [],
          settings=lambda r: {"student": section_values(r.student, "reading")}),
    DISTILL_ENCODER,
    Stage("student_folder", stage_student_folder,
          inputs=lambda run: [run.student_init_info, _rag_paths(run)["passage_encoder"]],
          outputs=lambda run: [run.student_info, run.student_passage_encoder],
          settings=lambda r: {"reading": r.student.reading, "prompt": section_values(r.prompt), "teacher": r.teacher.rag}),
    Stage("teacher_logits", stage_teacher_logits,
          inputs=lambda run: [_rag_paths(run)["rag"], run.teacher_encoder, run.index_embeddings, run.corpus_file,
                              run.train_file],
          outputs=lambda run: [], settings=lambda r: {**_kd_settings(r), **training_settings(r, batched=False)}),
    Stage("distill_generator", stage_distill_generator,
          inputs=lambda run: [run.kd_cache, run.student_init_generator,
                              *([run.student_encoder] if run.recipe.student.reading == "marginalized" else [])],
          outputs=lambda run: [run.student_generator],
          settings=lambda r: {"seed": r.seed, "distill_generator": distill_values(r.distill_generator),
                              **training_settings(r, batched=False)}),
    Stage("eval", stage_eval,
          inputs=lambda run: [run.student_encoder, run.student_generator, run.student_info, run.teacher_result,
                              run.eval_file, run.corpus_file, run.index_embeddings],
          outputs=lambda run: [run.eval_report],
          settings=lambda r: {"eval": section_values(r.eval, "questions", "unanswerable"), "prompt": section_values(r.prompt),
                              "dataset": r.data.eval, "reading": r.student.reading}),
]
