"""Evaluation, the same for teacher, student and exported bundle.

Per question: retrieve top-k from the whole corpus and answer greedily with the shared prompt
(open-domain EM/F1), the rank of the gold passage (recall@1/5/20), and the answer with the gold
passage given (EM/F1 gold). Scores are SQuAD v1.1 EM/F1 (best over the references), in 0-100.

A bundle (manifest.json) is run here with the device runtime, which needs no torch; a model
folder (query_encoder/ + generator/) with torch, by edgerag.train.evaluate.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from edgerag.data import Passage, Question, data_path, read_passages, read_questions
from edgerag.metrics import best_over_references, exact_match, f1, recall_at

METRICS = ("em", "f1", "em_gold", "f1_gold", "recall@1", "recall@5", "recall@20")
RECALL_DEPTH = 20


def sample_questions(questions: list[Question], n: int | None, seed: int = 0) -> list[Question]:
    """A seeded random sample of n questions; all of them, in file order, when n is None or 0."""
    if not n:
        return list(questions)
    return random.Random(seed).sample(list(questions), min(n, len(questions)))


def score(questions, open_answers, ranked_ids, gold_answers) -> dict:
    rows = []
    for q, answer, ranked, gold in zip(questions, open_answers, ranked_ids, gold_answers):
        rows.append({
            "em": best_over_references(exact_match, answer, q.answers),
            "f1": best_over_references(f1, answer, q.answers),
            "em_gold": best_over_references(exact_match, gold, q.answers),
            "f1_gold": best_over_references(f1, gold, q.answers),
            "recall@1": recall_at(ranked, q.passage_id, 1),
            "recall@5": recall_at(ranked, q.passage_id, 5),
            "recall@20": recall_at(ranked, q.passage_id, 20),
        })
    n = max(len(rows), 1)
    return {m: round(100.0 * sum(r[m] for r in rows) / n, 2) for m in METRICS}


def context_figures(questions, prompts_text: list[str], prompt_lengths: list[int]) -> dict:
    """prompt_tokens: the mean prompt length in tokens; answer_in_context: the share (0-100) of
    questions whose prompt, as the model reads it (after truncation), holds a gold answer string."""
    from edgerag.metrics import normalize_answer

    contains = [any(normalize_answer(a) in normalize_answer(text) for a in q.answers)
                for q, text in zip(questions, prompts_text)]
    n = max(len(prompt_lengths), 1)
    return {"prompt_tokens": round(sum(prompt_lengths) / n, 1), "answer_in_context": round(100.0 * sum(contains) / n, 2)}


def write_answers(path, questions, open_answers, gold_answers, ranked_ids) -> None:
    """Every question's answers and retrieved passage ids, as JSONL (written whole, then renamed)."""
    path = Path(path)
    rows = [{"id": q.id, "question": q.question, "references": list(q.answers), "answer": a, "answer_gold": g,
             "retrieved": r[:5], "gold_passage": q.passage_id}
            for q, a, g, r in zip(questions, open_answers, gold_answers, ranked_ids)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def evaluate_bundle(bundle: Path, questions: list[Question], passages: list[Passage] | None, k: int = 3,
                    answers_out: Path | None = None) -> dict:
    """Metrics of an exported bundle through the device runtime; `passages` (if given) are added to its corpus."""
    from edgerag.runtime import Pipeline

    p = Pipeline.load(bundle)
    if passages:
        p.add_passages([(x.id, x.title, x.text) for x in passages])
    open_answers, ranked_ids, gold_answers, read = [], [], [], []
    start = time.perf_counter()
    for q in questions:
        answer = p.ask(q.question, k=k)
        open_answers.append(answer.answer)
        read.append([(d["title"], d["text"]) for d in answer.context])  # after compression, where the bundle does it
    seconds = (time.perf_counter() - start) / max(len(questions), 1)
    prompts = [p.prompt_ids(q.question, passages) for q, passages in zip(questions, read)]
    for q in questions:
        ranked_ids.append([d["id"] for d in p.retrieve(q.question, RECALL_DEPTH)])
        gold_answers.append(p.answer_with_passages(q.question, [(q.title, q.context)]).answer)
    result = score(questions, open_answers, ranked_ids, gold_answers)
    result.update(context_figures(questions, [p.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts],
                                  [len(ids) for ids in prompts]))
    result.update({"generator_params": p.manifest.generator.parameters,
                   "encoder_params": p.manifest.query_encoder.parameters,
                   "seconds_per_question": round(seconds, 4)})
    if answers_out is not None:
        write_answers(answers_out, questions, open_answers, gold_answers, ranked_ids)
    return result


def evaluate_model(model_path, questions_path, corpus_path=None, n=None, k: int | None = None, seed: int = 0,
                   batch_size: int = 8, answers_out=None) -> dict:
    """Evaluate a teacher/student folder or a bundle on a SQuAD-format file.

    The corpus is `corpus_path` (SQuAD or JSONL) if given, else the passages of the questions file.
    k: passages per question; None: the model's own (a bundle's default, a compressed student's
    setting, else 3).
    Returns {"dataset", "n_questions", "k", "model", "em", "f1", ..., "seconds_per_question"};
    `answers_out` (a path) also gets every question's answers and retrieved passage ids as JSONL.
    """
    model_path = Path(model_path)
    questions = sample_questions(read_questions(questions_path), n, seed)
    from edgerag.runtime.manifest import MANIFEST

    if (model_path / MANIFEST).exists():
        if k is None:
            from edgerag.runtime.manifest import read_manifest

            k = read_manifest(model_path).generation.k
        passages = read_passages(corpus_path) if corpus_path else None
        metrics = evaluate_bundle(model_path, questions, passages, k, answers_out)
    else:
        if not ((model_path / "generator").is_dir() or (model_path / "rag").is_dir()) or not (model_path / "query_encoder").is_dir():
            raise FileNotFoundError(f"{model_path}: neither a bundle (manifest.json) nor a model folder (query_encoder/ and generator/)")
        from edgerag.models import read_info

        passages = read_passages(corpus_path or questions_path)
        if k is None:  # the passages the model was trained to read: a compressed student looks at more
            k = (read_info(model_path).get("compression") or {}).get("passages", 3)
        if read_info(model_path).get("family") == "encoder-decoder":  # a hf-rag run's teacher or student
            from edgerag.train.rag import evaluate_rag_folder

            metrics = evaluate_rag_folder(model_path, questions, passages, k, batch_size=batch_size, answers_out=answers_out)
        else:
            from edgerag.train.evaluate import evaluate_folder

            metrics = evaluate_folder(model_path, questions, passages, k, batch_size=batch_size, answers_out=answers_out)
    return {"dataset": str(data_path(str(questions_path))), "n_questions": len(questions), "k": k,
            "model": str(model_path), **metrics}


def format_table(columns: dict[str, dict]) -> str:
    """A plain-text table: one row per metric, one column per model."""
    names = list(columns)
    keys = list(METRICS) + [k for k in ("prompt_tokens", "answer_in_context") if any(k in c for c in columns.values())]
    keys += ["generator_params", "encoder_params", "seconds_per_question"]
    lines = [f"{'':22}" + "".join(f"{n:>14}" for n in names)]
    for key in keys:
        cells = []
        for n in names:
            v = columns[n].get(key)
            cells.append(f"{v:>14,}" if isinstance(v, int) else f"{v:>14.2f}" if isinstance(v, float) else f"{str(v):>14}")
        lines.append(f"{key:22}" + "".join(cells))
    return "\n".join(lines)
