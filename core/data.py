"""Question-answering data: SQuAD-format JSON (optionally gzipped) and JSONL passage corpora.

Passages get stable ids derived from their text, so the same paragraph has the same id in the
train file, the eval file, the corpus and the bundle.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = os.environ.get("EDGERAG_DATA", "../shared/data")

OFFICIAL_SQUAD_URLS = {
    "squad-v1.1-train.json": "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json",
    "squad-v1.1-dev.json": "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",
    "xquad-en.json": "https://raw.githubusercontent.com/google-deepmind/xquad/master/xquad.en.json",
}


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]
    passage_id: str
    title: str = ""
    context: str = field(default="", repr=False)


def question_to_dict(q: Question) -> dict:
    """A question as one JSON object (a run's train/eval files, a student's calibration.jsonl)."""
    return {**asdict(q), "answers": list(q.answers)}


def question_from_dict(d: dict) -> Question:
    return Question(**{**d, "answers": tuple(d["answers"])})


class DataError(ValueError):
    """Input data that cannot be read; the message names the file and, where known, the line."""


def passage_id(title: str, text: str) -> str:
    return "p" + hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:12]


def data_path(name: str, data_dir: str | Path | None = None) -> Path:
    """A data file by name, in the configured folder (EDGERAG_DATA, default ../shared/data)."""
    path = Path(name)
    if path.exists() or path.is_absolute() or len(path.parts) > 1:
        return path
    return Path(data_dir or DEFAULT_DATA_DIR) / name


def fetch_official(name: str, data_dir: str | Path | None = None) -> Path:
    """Download an official SQuAD/XQuAD file (for users who are online) and gzip it beside the others."""
    stem = name.removesuffix(".gz")
    if stem not in OFFICIAL_SQUAD_URLS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(OFFICIAL_SQUAD_URLS)}")
    target = Path(data_dir or DEFAULT_DATA_DIR) / (stem + ".gz")
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(OFFICIAL_SQUAD_URLS[stem], timeout=60) as response:
        payload = response.read()
    json.loads(payload)  # refuse to store an error page
    tmp = target.with_suffix(".part")
    with gzip.open(tmp, "wb") as f:
        f.write(payload)
    tmp.replace(target)
    return target


def _open_text(path: Path):
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def is_squad(path: Path) -> bool:
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith("{") and '"data"' in head and '"paragraphs"' in head


def read_squad(path: str | Path) -> tuple[list[Passage], list[Question], int]:
    """(unique passages, questions with answers, number of questions skipped for having none)."""
    path = Path(path)
    with _open_text(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if "data" not in doc:
        raise DataError(f"{path}: not SQuAD format (no 'data' key)")
    passages: dict[str, Passage] = {}
    questions: list[Question] = []
    skipped = 0
    for article in doc["data"]:
        title = article.get("title", "").replace("_", " ")
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            pid = passage_id(title, context)
            passages.setdefault(pid, Passage(pid, title, context))
            for qa in paragraph.get("qas", []):
                answers = tuple(dict.fromkeys(a["text"] for a in qa.get("answers", []) if a.get("text")))
                if not answers:
                    skipped += 1
                    continue
                questions.append(Question(qa["id"], qa["question"].strip(), answers, pid, title, context))
    return list(passages.values()), questions, skipped


def read_jsonl_passages(path: str | Path) -> list[Passage]:
    """A JSONL corpus, one {"id", "title", "text"} object a line. A bad line is named by its number."""
    path = Path(path)
    passages = []
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with a 'text' string")
            title = str(row.get("title", ""))
            pid = str(row["id"]) if row.get("id") is not None else passage_id(title, row["text"])
            passages.append(Passage(pid, title, row["text"]))
    return passages


def read_passages(path: str | Path) -> list[Passage]:
    """Passages from a SQuAD JSON file or a JSONL corpus (either may be gzipped), deduplicated by id."""
    path = data_path(str(path))
    found = read_squad(path)[0] if is_squad(path) else read_jsonl_passages(path)
    unique = {}
    for p in found:
        unique.setdefault(p.id, p)
    return list(unique.values())


def read_questions(path: str | Path) -> list[Question]:
    return read_squad(data_path(str(path)))[1]


def split_into_passages(passages: list[Passage], tokenizer, max_tokens: int = 200, overlap: int = 40) -> list[Passage]:
    """Split long documents into windows of `max_tokens` tokens that overlap by `overlap`.

    For corpora that are not already split (SQuAD paragraphs are). Windows are cut on token
    offsets of the original text, so no text is rewritten.
    """
    if overlap >= max_tokens:
        raise ValueError("overlap must be smaller than max_tokens")
    out = []
    for p in passages:
        enc = tokenizer(p.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_tokens:
            out.append(p)
            continue
        step = max_tokens - overlap
        for n, start in enumerate(range(0, len(offsets), step)):
            window = offsets[start:start + max_tokens]
            text = p.text[window[0][0]:window[-1][1]]
            out.append(Passage(f"{p.id}-{n}", p.title, text))
            if start + max_tokens >= len(offsets):
                break
    return out


def sample_questions(questions: list[Question], n: int | None, seed: int = 0) -> list[Question]:
    """A seeded random sample of n questions; all of them, in file order, when n is None or 0."""
    if not n:
        return list(questions)
    return random.Random(seed).sample(list(questions), min(n, len(questions)))


def holds_answer(text: str, question: Question) -> bool:
    """Whether `text` holds one of the question's answers as words of its own (case aside): "1" is not
    held by "1990"."""
    import re

    folded = text.casefold()
    return any(answer.strip() and re.search(r"(?<!\w)" + re.escape(answer.strip().casefold()) + r"(?!\w)", folded)
               for answer in question.answers)


def unanswerable_passages(question: Question, ranked: list[Passage], others: list[Passage], k: int,
                          rng: random.Random) -> list[Passage]:
    """k passages that cannot answer `question`, as a model trained to abstain meets them: half the
    time retrieval's top passages without the gold one and any that holds an answer (retrieval that
    missed), else the passages of another article (ranked: the question's retrieved passages, deep
    enough to leave k; others: a pool to draw other articles from). An answer so common that every
    other article holds it ("one") does not rule an article out."""
    if rng.random() < 0.5:
        missed = [p for p in ranked if p.id != question.passage_id and not holds_answer(p.text, question)][:k]
        if len(missed) == k:
            return missed
    by_title: dict[str, list[Passage]] = {}
    loose: dict[str, list[Passage]] = {}
    for p in others:
        if p.title != question.title and p.id != question.passage_id:
            loose.setdefault(p.title, []).append(p)
            if not holds_answer(p.text, question):
                by_title.setdefault(p.title, []).append(p)
    by_title = by_title or loose
    if not by_title:
        raise DataError(f"no passage of another article to pair with question {question.id}: the pool holds one article")
    article = by_title[rng.choice(sorted(by_title))]
    return rng.sample(article, min(k, len(article)))


def unanswerable_sample(questions: list[Question], share: float, seed: int) -> set[str]:
    """The ids of a seeded `share` of the questions, to be asked over passages that cannot answer them."""
    return {q.id for q in random.Random(seed + 1).sample(questions, round(share * len(questions)))} if share else set()
