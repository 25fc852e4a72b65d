"""Where an answer stands: the passage, and the sentence of its stored text, that hold it.

An answer is looked for in what the generator read (the passages, or their pieces where the bundle
compresses its context), in rank order, case and runs of white space aside, and then located in that
passage's stored text, so that `text[start:end]` of the passage is the cited sentence and the answer
exactly. An answer that appears nowhere in what was read has no citation and is not supported.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from edgerag.runtime.documents import sentence_spans


@dataclass(frozen=True)
class Citation:
    passage_id: str | None
    title: str
    sentence_start: int       # the sentence's span in the stored passage text
    sentence_end: int
    answer_start: int         # the answer's span there
    answer_end: int
    sentence: str

    def to_dict(self) -> dict:
        return asdict(self)


def _squeezed(text: str) -> str:
    return " ".join(text.split()).casefold()


def _pattern(answer: str) -> re.Pattern:
    return re.compile(r"\s+".join(map(re.escape, answer.split())), re.IGNORECASE)


def cite(answer: str, read: list[tuple[str, str]], passages: list[dict]) -> Citation | None:
    """The first place, in what was read, that holds the answer verbatim: in the first passage (rank
    order) with that title whose stored text holds it within a sentence that was read. None where the
    answer is empty or appears nowhere in what was read."""
    wanted = _squeezed(answer)
    if not wanted:
        return None
    pattern = _pattern(answer)
    for title, text in read:
        squeezed_read = _squeezed(text)
        if wanted not in squeezed_read:
            continue
        for passage in passages:
            if passage["title"] != title:
                continue
            stored = passage["text"]
            occurrences = [m.span() for m in pattern.finditer(stored)]
            if not occurrences:
                continue
            sentences = sentence_spans(stored)
            # the first occurrence that stands where the generator read it (a compressed context reads
            # some sentences of a passage): the answer with up to three words each side, within its sentence
            read_here = [span for span in occurrences if _squeezed(_around(stored, *span, sentences)) in squeezed_read]
            start, end = (read_here or occurrences)[0]
            a, b = next(((a, b) for a, b, _ in sentences if a <= start < b), (start, end))
            return Citation(passage.get("id"), title, a, max(b, end), start, end, stored[a:max(b, end)])
    return None


def _around(text: str, start: int, end: int, sentences, words: int = 3) -> str:
    a, b = next(((a, b) for a, b, _ in sentences if a <= start < b), (start, end))
    before = text[a:start].split()[-words:] if start > a else []
    after = text[end:b].split()[:words]
    return " ".join([*before, text[start:end], *after])
