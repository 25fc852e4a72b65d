"""Evaluation, the same for teacher, student and exported bundle.

Per question: retrieve top-k from the whole corpus and answer greedily with the shared prompt
(open-domain EM/F1), the rank of the gold passage (recall@1/5/20), and the answer with the gold
passage given (EM/F1 gold). Scores are SQuAD v1.1 EM/F1 (best over the references), in 0-100.

A bundle (manifest.json) is run here with the device runtime, which needs no torch; a model
folder (query_encoder/ + generator/) with torch, by edgerag.train.folder_eval. The scores and the
results table are edgerag.metrics, which imports no model code.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from edgerag.data import (Passage, Question, data_path, holds_answer, read_passages, read_questions, sample_questions,
                          unanswerable_passages, unanswerable_sample)
from edgerag.metrics import (RECALL_DEPTH, abstains, abstention_figures, answer_record, context_figures,
                             garbled_copies, score, spelled_as_read, write_answers)


def evaluate_bundle(bundle: Path, questions: list[Question], passages: list[Passage] | None, k: int = 3,
                    answers_out: Path | None = None, answers: str | None = None, unanswerable: float = 0.0,
                    abstain_threshold: float | None = None, seed: int = 0, budget: int | None = None) -> dict:
    """Metrics of an exported bundle through the device runtime; `passages` (if given) are added to its
    corpus; answers: "spans" or "free" (None: the bundle's setting).

    A bundle that abstains is scored as the device answers (an abstention is an empty answer), at its
    threshold or `abstain_threshold`. unanswerable: the share of the questions paired with passages
    that cannot answer them instead (data.unanswerable_passages), scored as SQuAD 2.0 is
    (metrics.abstention_figures), with the answers' citations."""
    from edgerag.runtime import Pipeline

    p = Pipeline.load(bundle, answers=answers, abstain_threshold=abstain_threshold, budget=budget)
    threshold = p.abstain_threshold
    if threshold is not None:
        # every answer generated with abstention off and its confidence kept: abstaining is then a
        # comparison, and the same answers give the figures with and without it
        p.abstain_threshold = 0.0
    if passages:
        p.add_passages([(x.id, x.title, x.text) for x in passages])
    made_unanswerable = unanswerable_sample(questions, unanswerable, seed)
    open_answers, ranked_ids, gold_answers, read, records = [], [], [], [], []
    start = time.perf_counter()
    for q in questions:
        answer = p.ask(q.question, k=k)
        open_answers.append("" if abstains(answer.confidence, threshold) else answer.answer)
        read.append([(d["title"], d["text"]) for d in answer.context])  # after compression, where the bundle does it
        if unanswerable and q.id not in made_unanswerable:
            records.append(_record(q, answer, True))
    seconds = (time.perf_counter() - start) / max(len(questions), 1)
    records += unanswerable_records(p, [q for q in questions if q.id in made_unanswerable], k, seed)
    prompts = [p.prompt_ids(q.question, passages) for q, passages in zip(questions, read)]
    for q in questions:
        ranked_ids.append([d["id"] for d in p.retrieve(q.question, RECALL_DEPTH)])
        gold = p.answer_with_passages(q.question, [(q.title, q.context)])
        gold_answers.append("" if abstains(gold.confidence, threshold) else gold.answer)
    result = score(questions, open_answers, ranked_ids, gold_answers)
    if threshold is not None:
        result["abstain_threshold"] = threshold
    if unanswerable:
        result["abstention"] = abstention_figures(records, threshold if threshold is not None else 0.0)
        # what other thresholds would buy on the same answers: no-answer accuracy against answerable F1
        result["abstention_by_threshold"] = {
            f"{t:.1f}": {key: value for key, value in abstention_figures(records, t).items()
                         if key in ("no_answer_accuracy", "has_answer_f1", "f1_overall")}
            for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)} if threshold is not None else {}
        result["citations"] = citation_figures([r for r in records if r["answerable"]
                                                and not abstains(r["confidence"], threshold)])
    prompts_text = [p.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
    result.update(context_figures(questions, prompts_text, [len(ids) for ids in prompts]))
    result.update(garbled_copies(questions, open_answers, prompts_text))
    result.update(spelled_as_read(open_answers, [" ".join(text for _, text in passages) for passages in read]))
    if p.compression is not None:
        result["budget"] = p.compression.budget
    result["answers"] = p.answers
    result.update({"generator_params": p.manifest.generator.parameters,
                   "encoder_params": p.manifest.query_encoder.parameters,
                   "seconds_per_question": round(seconds, 4)})
    if answers_out is not None:
        write_answers(answers_out, questions, open_answers, gold_answers, ranked_ids)
    return result


def unanswerable_records(p, questions: list[Question], k: int, seed: int) -> list[dict]:
    """Each question answered by the pipeline from k passages that cannot answer it (built as training
    builds them, from its retrieval and the pipeline's other articles), as records of abstention_figures."""
    if not questions:
        return []
    pool = [Passage(*row) for row in p.passages()]
    rng = random.Random(seed + 2)
    records = []
    for q in questions:
        ranked = [Passage(d["id"], d["title"], d["text"]) for d in p.retrieve(q.question, RECALL_DEPTH)]
        negatives = unanswerable_passages(q, ranked, pool, k, rng)
        records.append(_record(q, p.answer_with_passages(q.question, [(x.title, x.text) for x in negatives]), False))
    return records


def abstention_records(p, questions: list[Question], share: float, k: int, seed: int = 0) -> list[dict]:
    """Records of abstention_figures: a `share` of the questions over passages that cannot answer them,
    the rest asked as the device asks (retrieval from the pipeline's corpus, which must hold their passages)."""
    made = unanswerable_sample(questions, share, seed)
    return [_record(q, p.ask(q.question, k=k), True) for q in questions if q.id not in made] + \
        unanswerable_records(p, [q for q in questions if q.id in made], k, seed)


def _record(q: Question, answer, answerable: bool) -> dict:
    """What abstention_figures and citation_figures need of one answer."""
    read = " ".join(" ".join(d["text"].split()) for d in answer.context).casefold()
    text = " ".join(answer.answer.split()).casefold()
    return {**answer_record(q, answer.answer, answer.confidence, answerable),
            "verbatim": bool(text) and text in read, "cited": bool(answer.citations),
            "cited_gold": any(holds_answer(c["sentence"], q) for c in answer.citations)}


def citation_figures(records: list[dict]) -> dict:
    """Of the answers given (0-100): those with a citation, those whose cited sentence holds a gold
    answer, and of the answers found verbatim in what was read, those cited (their span holds them)."""
    def share(part, whole) -> float:
        return round(100.0 * len(part) / max(len(whole), 1), 2)
    verbatim = [r for r in records if r["verbatim"]]
    return {"answers": len(records), "with_citation": share([r for r in records if r["cited"]], records),
            "citation_holds_gold": share([r for r in records if r["cited_gold"]], records),
            "verbatim_answers": len(verbatim), "verbatim_cited": share([r for r in verbatim if r["cited"]], verbatim)}


def evaluate_model(model_path, questions_path, corpus_path=None, n=None, k: int | None = None, seed: int = 0,
                   batch_size: int = 8, answers_out=None, answers: str | None = None, unanswerable: float = 0.0,
                   abstain_threshold: float | None = None, budget: int | None = None) -> dict:
    """Evaluate a teacher/student folder or a bundle on a SQuAD-format file.

    The corpus is `corpus_path` (SQuAD or JSONL) if given, else the passages of the questions file.
    k: passages per question; None: the model's own (a bundle's default, a compressed student's
    setting, else 3).
    Returns {"dataset", "n_questions", "k", "model", "em", "f1", ..., "seconds_per_question"};
    `answers_out` (a path) also gets every question's answers and retrieved passage ids as JSONL.
    budget: a bundle's compressed context, tokens of piece text (None: the bundle's own).
    """
    model_path = Path(model_path)
    questions = sample_questions(read_questions(questions_path), n, seed)
    from edgerag.runtime.manifest import MANIFEST

    if (model_path / MANIFEST).exists():
        if k is None:
            from edgerag.runtime.manifest import read_manifest

            k = read_manifest(model_path).generation.k
        passages = read_passages(corpus_path) if corpus_path else None
        metrics = evaluate_bundle(model_path, questions, passages, k, answers_out, answers, unanswerable,
                                  abstain_threshold, seed, budget)
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
