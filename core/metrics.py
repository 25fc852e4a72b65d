"""SQuAD v1.1 answer metrics (the official normalization) and retrieval recall, and what every
evaluation (bundle or model folder) reports with them: the averaged scores, the context figures, the
answers file and the plain-text results table.

No torch here: the bundle evaluation path uses these on the base install.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from pathlib import Path

_PUNCT = set(string.punctuation)

# what every evaluation reports, and how deep it ranks passages (for recall@20)
METRICS = ("em", "f1", "em_gold", "f1_gold", "recall@1", "recall@5", "recall@20")
RECALL_DEPTH = 20


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official SQuAD v1.1 script)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_over_references(metric, prediction: str, references) -> float:
    """The official script scores a prediction against every reference answer and keeps the best."""
    return max(metric(prediction, ref) for ref in references) if references else 0.0


def recall_at(ranked_ids, gold_id: str, k: int) -> float:
    return float(gold_id in list(ranked_ids)[:k])


def aggregate(rows: list[dict]) -> dict:
    """Mean of each numeric key over rows, as a percentage (0-100) for 0/1 or 0..1 scores."""
    if not rows:
        return {}
    keys = rows[0].keys()
    return {k: 100.0 * sum(r[k] for r in rows) / len(rows) for k in keys}


# ---------------------------------------------------------------- an evaluation's report

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
    contains = [any(normalize_answer(a) in normalize_answer(text) for a in q.answers)
                for q, text in zip(questions, prompts_text)]
    n = max(len(prompt_lengths), 1)
    return {"prompt_tokens": round(sum(prompt_lengths) / n, 1), "answer_in_context": round(100.0 * sum(contains) / n, 2)}


def garbled_copies(questions, answers: list[str], prompts_text: list[str]) -> dict:
    """Of the questions whose prompt holds a gold answer, the share (0-100) whose answer appears
    nowhere in it: a copy gone wrong ("Pantu Steelers" for "Pittsburgh Steelers"), not a wrong span."""
    held = [(answer, normalize_answer(text)) for q, answer, text in zip(questions, answers, prompts_text)
            if any(normalize_answer(a) in normalize_answer(text) for a in q.answers)]
    garbled = sum(normalize_answer(answer) not in text for answer, text in held)
    return {"garbled_copies": round(100.0 * garbled / max(len(held), 1), 2)}


def spelled_as_read(answers: list[str], read: list[str]) -> dict:
    """Of the answers given, the share (0-100) found in the text read exactly as it spells them (case kept,
    runs of white space aside): what a user can check against the passage. None where none was given."""
    pairs = [(" ".join(answer.split()), " ".join(text.split())) for answer, text in zip(answers, read) if answer.strip()]
    found = sum(answer in text for answer, text in pairs)
    return {"spelled_as_read": round(100.0 * found / len(pairs), 2) if pairs else None}


ABSTENTION_ROWS = ("threshold", "f1_overall", "f1_overall_without_abstention", "has_answer_f1",
                   "has_answer_f1_without_abstention", "has_answer_abstained", "no_answer_accuracy")


def abstains(confidence: float | None, threshold: float | None) -> bool:
    """Whether an answer of this confidence is an abstention (None: an answer that has no confidence, or a
    threshold that never abstains)."""
    return confidence is not None and threshold is not None and confidence < threshold


def answer_record(question, answer: str, confidence: float | None, answerable: bool) -> dict:
    """What abstention_figures needs of one answer (its F1 and EM with abstention off)."""
    return {"answerable": answerable, "confidence": confidence,
            "f1": best_over_references(f1, answer, question.answers) if answerable else 0.0,
            "em": best_over_references(exact_match, answer, question.answers) if answerable else 0.0}


def abstention_figures(records: list[dict], threshold: float) -> dict:
    """SQuAD 2.0's figures (0-100) over answerable and unanswerable records at a threshold.

    A record: {"answerable", "f1", "em" (of the answer given with abstention off), "confidence"}. An
    abstention scores 1 on an unanswerable question and 0 on an answerable one; an answer scores its
    F1 (0 where the question is unanswerable). `..._without_abstention` is the same sample with abstention
    off, so that its cost is read on the same answers."""
    answerable = [r for r in records if r["answerable"]]
    unanswerable = [r for r in records if not r["answerable"]]

    def mean(values) -> float:
        values = list(values)
        return round(100.0 * sum(values) / max(len(values), 1), 2)
    answered = [0.0 if abstains(r["confidence"], threshold) else r["f1"] for r in answerable]
    refused = [float(abstains(r["confidence"], threshold)) for r in unanswerable]
    return {"threshold": round(threshold, 4), "answerable": len(answerable), "unanswerable": len(unanswerable),
            "f1_overall": mean(answered + refused), "f1_overall_without_abstention": mean([r["f1"] for r in answerable]
                                                                                      + [0.0] * len(unanswerable)),
            "has_answer_f1": mean(answered), "has_answer_f1_without_abstention": mean(r["f1"] for r in answerable),
            "has_answer_em": mean(0.0 if abstains(r["confidence"], threshold) else r["em"] for r in answerable),
            "has_answer_abstained": mean(abstains(r["confidence"], threshold) for r in answerable),
            "no_answer_accuracy": mean(refused)}


def fit_threshold(records: list[dict], max_answer_cost: float = 2.0) -> float:
    """The threshold, in [0, 1], with the best overall F1 on the records among those whose abstentions
    cost the answerable questions at most `max_answer_cost` points of F1 (the lowest where several tie):
    0 or halfway between two confidences seen. Without the bound, a model that is often wrong would
    abstain on every uncertain answer, right ones too, since SQuAD 2.0's scoring charges nothing for
    abstaining on a wrong one."""
    seen = sorted({r["confidence"] for r in records if r["confidence"] is not None})
    candidates = [0.0] + [(a + b) / 2 for a, b in zip(seen, seen[1:])] + ([min(1.0, seen[-1] + 1e-6)] if seen else [])
    answerable = max(sum(r["answerable"] for r in records), 1)

    def cost(t: float) -> float:  # points of F1 lost on the answerable questions
        return 100.0 * sum(r["f1"] for r in records if r["answerable"] and abstains(r["confidence"], t)) / answerable

    def overall(t: float) -> float:  # unrounded: ties are ties of the scores, not of their rounding
        return sum((not abstains(r["confidence"], t)) * r["f1"] if r["answerable"] else abstains(r["confidence"], t) for r in records)
    return max((t for t in candidates if cost(t) <= max_answer_cost + 1e-9), key=lambda t: (overall(t), -t))


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


def format_table(columns: dict[str, dict]) -> str:
    """A plain-text table: one row per metric, one column per model."""
    names = list(columns)
    # the unanswerable mix's figures (evaluation.evaluate_bundle) as rows of their own
    columns = {n: {**c, **c.get("abstention", {}), **{f"citations_{k}": v for k, v in c.get("citations", {}).items()}}
               for n, c in columns.items()}
    extra = [k for c in columns.values() for k in c if k in ABSTENTION_ROWS or k.startswith("citations_")]
    keys = list(METRICS) + [k for k in ("prompt_tokens", "answer_in_context") if any(k in c for c in columns.values())]
    keys += list(dict.fromkeys(extra))
    keys += ["generator_params", "encoder_params", "seconds_per_question"]
    lines = [f"{'':22}" + "".join(f"{n:>14}" for n in names)]
    for key in keys:
        cells = []
        for n in names:
            v = columns[n].get(key)
            cells.append(f"{v:>14,}" if isinstance(v, int) else f"{v:>14.2f}" if isinstance(v, float) else f"{str(v):>14}")
        lines.append(f"{key:22}" + "".join(cells))
    return "\n".join(lines)
