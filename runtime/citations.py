"""Where an answer stands: the passage, and the sentence of its stored text, that hold it.

An answer is looked for in what the generator read (the passages, or their pieces where the bundle
compresses its context), case and runs of white space aside, and located in the passage's stored
text, so that `text[start:end]` of the passage is the cited sentence and the answer exactly. Of its
places, the sentence that shares the most content words with the question is cited. An answer that
appears nowhere in what was read has no citation and is not supported.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from edgerag.runtime.compress import content_words
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


def cite(answer: str, read: list[tuple[str, str]], passages: list[dict], question: str = "") -> Citation | None:
    """The place, in what was read, that holds the answer verbatim and shares the most content words with
    the question (the first such place on a tie: rank order, then text order, so a repeated sentence is
    cited once, where it first stands). None where the answer is empty or appears nowhere in what was read."""
    wanted = _squeezed(answer)
    if not wanted:
        return None
    pattern, asked = _pattern(answer), content_words(question)
    best, best_overlap = None, -1
    for title, text in read:
        squeezed_read = _squeezed(text)
        if wanted not in squeezed_read:
            continue
        # the first passage (rank order) of that title whose stored text holds the answer
        for passage in passages:
            stored = passage["text"]
            occurrences = [m.span() for m in pattern.finditer(stored)] if passage["title"] == title else []
            if not occurrences:
                continue
            sentences = sentence_spans(stored)
            # occurrences that stand where the generator read them (a compressed context reads some
            # sentences of a passage): the answer with up to three words each side, within its sentence
            read_here = [span for span in occurrences if _squeezed(_around(stored, *span, sentences)) in squeezed_read]
            for start, end in read_here or occurrences[:1]:
                a, b = next(((a, b) for a, b, _ in sentences if a <= start < b), (start, end))
                overlap = len(asked & content_words(stored[a:max(b, end)]))
                if overlap > best_overlap:
                    best = Citation(passage.get("id"), title, a, max(b, end), start, end, stored[a:max(b, end)])
                    best_overlap = overlap
            break
    return best


def _around(text: str, start: int, end: int, sentences, words: int = 3) -> str:
    a, b = next(((a, b) for a, b, _ in sentences if a <= start < b), (start, end))
    before = text[a:start].split()[-words:] if start > a else []
    after = text[end:b].split()[:words]
    return " ".join([*before, text[start:end], *after])
