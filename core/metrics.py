"""SQuAD v1.1 answer metrics (the official normalization) and retrieval recall.

No torch here: the bundle evaluation path uses these on the base install.
"""

from __future__ import annotations

import collections
import re
import string

_PUNCT = set(string.punctuation)


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
