"""Evaluation, the same for teacher, student and exported bundle.

Per question: retrieve top-k from the whole corpus and answer greedily with the shared prompt
(open-domain EM/F1), the rank of the gold passage (recall@1/5/20), and the answer with the gold
passage given (EM/F1 gold). Scores are SQuAD v1.1 EM/F1 (best over the references), in 0-100.

A bundle (manifest.json) is run here with the device runtime, which needs no torch; a model
folder (query_encoder/ + generator/) with torch, by edgerag.train.folder_eval. The scores and the
results table are edgerag.metrics, which imports no model code.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgerag.data import Passage, Question, data_path, read_passages, read_questions, sample_questions
from edgerag.metrics import RECALL_DEPTH, context_figures, garbled_copies, score, write_answers


def evaluate_bundle(bundle: Path, questions: list[Question], passages: list[Passage] | None, k: int = 3,
                    answers_out: Path | None = None, answers: str | None = None) -> dict:
    """Metrics of an exported bundle through the device runtime; `passages` (if given) are added to its
    corpus; answers: "spans" or "free" (None: the bundle's setting)."""
    from edgerag.runtime import Pipeline

    p = Pipeline.load(bundle, answers=answers)
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
    prompts_text = [p.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
    result.update(context_figures(questions, prompts_text, [len(ids) for ids in prompts]))
    result.update(garbled_copies(questions, open_answers, prompts_text))
    result["answers"] = p.answers
    result.update({"generator_params": p.manifest.generator.parameters,
                   "encoder_params": p.manifest.query_encoder.parameters,
                   "seconds_per_question": round(seconds, 4)})
    if answers_out is not None:
        write_answers(answers_out, questions, open_answers, gold_answers, ranked_ids)
    return result


def evaluate_model(model_path, questions_path, corpus_path=None, n=None, k: int | None = None, seed: int = 0,
                   batch_size: int = 8, answers_out=None, answers: str | None = None) -> dict:
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
        metrics = evaluate_bundle(model_path, questions, passages, k, answers_out, answers)
    else:
        if not ((model_path / "generator").is_dir() or (model_path / "rag").is_dir()) or not (model_path / "query_encoder").is_dir():
            raise FileNotFoundError(f"{model_path}: neither a bundle (manifest.json) nor a model folder (query_encoder/ and generator/)")
        from edgerag.models import read_info

        passages = read_passages(corpus_path or questions_path)
        if k is None:  # the passages the model was trained to read: a compressed student looks at more
            k = (read_info(model_path).get("compression") or {}).get("passages", 3)
        if read_info(model_path).get("family") == "encoder-decoder":  # a hf-rag run's teacher or student
            from edgerag.train.folder_eval import evaluate_rag_folder

            metrics = evaluate_rag_folder(model_path, questions, passages, k, batch_size=batch_size, answers_out=answers_out)
        else:
            from edgerag.train.folder_eval import evaluate_folder

            metrics = evaluate_folder(model_path, questions, passages, k, batch_size=batch_size, answers_out=answers_out)
    return {"dataset": str(data_path(str(questions_path))), "n_questions": len(questions), "k": k,
            "model": str(model_path), **metrics}
