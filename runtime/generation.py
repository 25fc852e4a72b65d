"""What both generation loops share (runtime.decoder_only's and runtime.encoder_decoder's): the
step interface a generator implements, the Generation a call returns (which holds the one stop
check and the choice of a token, constrained to spans of the context where asked), the greedy calls
around a loop, and the repetition cut that ends a looping answer."""

from __future__ import annotations

import time
from typing import Callable, Container, Iterator

import numpy as np

from edgerag.runtime.session import ORT_DTYPES

class SpanConstraint:
    """Answers that are spans of what the generator read. At each step the token chosen is the model's
    most likely one that keeps the answer a substring of the context (case and runs of white space
    aside), or a stop token. While the answer is spelled as the context spells it, a token that writes
    the same text in the context's case is taken over one that does not, where one of the CANDIDATES
    most likely tokens does ("They" rather than "TheY"). Where none of them fits, the answer ends,
    unless it stands inside a word: then each place it stands offers the first token of the rest of
    that word (its tokenizer's encoding of it), and the likeliest of those goes on ("Ci" of "City"
    becomes "City"). A span starts where a word of the context starts, and a stop is allowed where a
    word ends: spans are matched case aside, so "existence, Warsaw" would otherwise let the answer be
    "Ce, Warsaw". Checked on text, not token ids: an answer's first token is often spelled otherwise in
    the context (no leading space after the template's line break).

    decode: token ids -> text; encode: text -> token ids, no special tokens (None: a word is never
    finished that way). A tokenizer that puts a space before every text it encodes (SentencePiece's
    "▁") finishes no word either: the offered token would not fit."""

    CANDIDATES = 64

    def __init__(self, context: str, decode: Callable[[list[int]], str], stop_token_ids: Container[int],
                 encode: Callable[[str], list[int]] | None = None):
        self.folded = _squeezed(context)
        self.spelled = _squeezed(context, fold=False)
        self.decode = decode
        self.encode = encode
        self.stop = sorted(stop_token_ids)

    def allows(self, tokens: list[int], before: str | None = None, spelled: bool = False) -> bool:
        """Whether the answer `tokens` is still a span (spelled: as the context spells it, case and all);
        before: the text of all but the last (if known)."""
        text = self.decode(tokens)
        before = self.decode(tokens[:-1]) if before is None else before
        # a token must add text: a special token, or white space after white space, would only spend the
        # answer's budget (one space after a word may come as a token of its own)
        if text == before or (_squeezed(text) == _squeezed(before) and (not before.strip() or before[-1].isspace())):
            return False
        whole = text.rstrip("\ufffd")
        span = _squeezed(whole, fold=not spelled).lstrip()
        if len(whole) == len(text):
            if text[-1:].isspace():  # only where the context has white space (or a passage's end) there
                return bool(span) and any(f in ("", " ", "\x00") for f in self._found(span, spelled))
            return bool(span) and any(True for _ in self._found(span, spelled))  # white space alone is no answer
        # a character whose bytes are split over tokens decodes to U+FFFD until its last byte comes:
        # allowed where the context has a character of several bytes (not ASCII) after the span
        if len(text) - len(whole) > 3:
            return False
        return any(following and ord(following) > 127 for following in self._found(span, spelled))

    def ends_word(self, text: str) -> bool:
        """Whether an answer of `text` may stop: it is empty, or a span of the context that ends a word."""
        span = _squeezed(text).lstrip()
        return not span or not _in_word(span[-1]) or any(not _in_word(f) for f in self._found(span))

    def spelled_as_context(self, text: str) -> bool:
        """Whether an answer of `text` is a span of the context case and all (a character still coming aside)."""
        span = _squeezed(text.rstrip("\ufffd"), fold=False).lstrip()
        return not span or any(True for _ in self._found(span, spelled=True))

    def _context(self, spelled: bool) -> str:
        return self.spelled if spelled else self.folded

    def _ends(self, span: str, spelled: bool = False) -> Iterator[int]:
        """For each place `span` occurs in the context starting a word: where it ends."""
        context = self._context(spelled)
        at = context.find(span)
        while at >= 0:
            first = (span or context[at:at + 1])[:1]  # an empty span: a character whose bytes are still coming
            if at == 0 or not _in_word(first) or not _in_word(context[at - 1]):
                yield at + len(span)
            at = context.find(span, at + 1)

    def _found(self, span: str, spelled: bool = False) -> Iterator[str]:
        """For each place `span` occurs in the context starting a word: the character after it ("" at the end)."""
        context = self._context(spelled)
        return (context[end:end + 1] for end in self._ends(span, spelled))

    def _word_rests(self, text: str, spelled: bool) -> set[str]:
        """For each place an answer of `text` occurs in the context and ends inside a word: the rest of
        that word, as the context spells it (spelled) or case folded."""
        context = self._context(spelled)
        rests = set()
        for end in self._ends(_squeezed(text, fold=not spelled).lstrip(), spelled):
            stop = end
            while stop < len(context) and _in_word(context[stop]):
                stop += 1
            if stop > end:
                rests.add(context[end:stop])
        return rests

    def choose(self, logits: np.ndarray, tokens: list[int]) -> int:
        so_far = self.decode(tokens)  # once a step, not once a candidate
        spelled = self.spelled_as_context(so_far)

        def fits(token: int, spelled: bool = False) -> bool:
            if token in self.stop:  # no stop inside a character (its bytes must all come first), nor inside a word
                return not so_far.endswith("\ufffd") and self.ends_word(so_far)
            return self.allows(tokens + [token], so_far, spelled)
        best = int(logits.argmax())
        if fits(best, spelled):  # where the answer is spelled otherwise already, only case aside
            return best
        ranked = self._ranked(logits, self.CANDIDATES)
        chosen = next((t for t in ranked if fits(t)), None)
        if spelled and chosen is not None and chosen not in self.stop and not fits(chosen, spelled=True):
            # the same text as the context spells it, where a likely token writes it: "They" for "TheY"
            wanted = _squeezed(self.decode(tokens + [chosen]))
            chosen = next((t for t in ranked if t not in self.stop and _squeezed(self.decode(tokens + [t])) == wanted
                           and fits(t, spelled=True)), chosen)
        if chosen is None and self.encode is not None and not self.ends_word(so_far):
            # a stop here would leave half a word ("Ci" of "City"): each place the answer stands in one
            # offers the first token of the word's rest, as the context spells it where the answer does
            offered = {ids[0] for rest in self._word_rests(so_far, spelled) if (ids := self.encode(rest))}
            chosen = max((t for t in offered if fits(t)), key=lambda t: (logits[t], -t), default=None)
        return self.stop[0] if chosen is None else chosen

    @staticmethod
    def _ranked(logits: np.ndarray, n: int) -> list[int]:
        """The n most likely tokens, most likely first; ties by token id, as argmax breaks them."""
        n = min(n, len(logits))
        top = np.sort(np.argpartition(-logits, n - 1)[:n])
        return [int(t) for t in top[np.argsort(-logits[top], kind="stable")]]


class Abstention:
    """A generator that learned to write NO_ANSWER where its context holds no answer.

    The answer's confidence starts as 1 minus the probability that it begins NO_ANSWER
    (runtime.prompt.no_answer_token_ids) at the first step; below the threshold the generation
    abstains there, with no token. Otherwise those tokens are ruled out at the first step, so that
    the answer is the model's best one that is not NO_ANSWER. With `reads_answer`, the confidence is
    then multiplied by the geometric mean of the probabilities of the answer's tokens, its end
    included: a model that is unsure of what it writes is unsure of the answer too. That is known
    once the answer is written (`Generation.settle`), and the answer is held back until then."""

    def __init__(self, token_ids: list[int], threshold: float, reads_answer: bool = False):
        self.token_ids = list(token_ids)
        self.threshold = threshold
        self.reads_answer = reads_answer

    def confidence(self, logits: np.ndarray) -> float:
        return self.screen(logits)[0]

    def screen(self, logits: np.ndarray) -> tuple[float, float]:
        """(1 - P(NO_ANSWER), the log of softmax's denominator once NO_ANSWER is ruled out): one exp
        over the vocabulary serves both the confidence and the first answer token's probability."""
        top = float(logits.max())
        weights = np.exp(logits - top, dtype=np.float32)
        total, no_answer = float(weights.sum()), float(weights[self.token_ids].sum())
        return 1.0 - no_answer / total, top + float(np.log(max(total - no_answer, np.finfo(np.float32).tiny)))


def log_probability(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token]; ruled-out tokens (at -inf) take no share of the probability."""
    top = float(logits.max())
    return float(logits[token]) - top - float(np.log(np.exp(logits - top, dtype=np.float32).sum()))


# scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, CJK, Japanese kana, Hangul
# with its attached particles): any of their characters may start or end an answer
_UNSPACED = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x2E80, 0xD7FF), (0xF900, 0xFAFF),
             (0xFF66, 0xFFDC), (0x20000, 0x3FFFF))


def _in_word(char: str) -> bool:
    """Whether `char` is part of a word that a span may not start or end inside of."""
    return char.isalnum() and not any(low <= ord(char) <= high for low, high in _UNSPACED)


def _squeezed(text: str, fold: bool = True) -> str:
    """Runs of white space as one space, and case folded (fold=False: case kept)."""
    text = " ".join(text.split())
    return text.casefold() if fold else text


class Generation:
    """One greedy generation: iterate it for the new token ids; its figures fill in as it runs."""

    def __init__(self, decode: Callable[["Generation"], Iterator[int]], stop_token_ids: Container[int],
                 constraint: SpanConstraint | None = None, abstention: Abstention | None = None):
        self.constraint = constraint
        self.abstention = abstention
        self.confidence: float | None = None  # with an abstention: set at the first step (and by settle())
        self.abstained = False
        self.abstain_ms = 0.0  # what the abstention's arithmetic took, screening and answer's tokens
        self._answer_log_probability = 0.0  # of the chosen tokens, where the abstention reads the answer
        self._scored_tokens = 0
        self._first_log_denominator: float | None = None  # the first step's, from its screening
        self.tokens: list[int] = []
        self.prefill_ms = 0.0
        # the time of each forward pass after the prefill, in order, the one that produced a stop
        # token included (the first ones after a prefill run slower)
        self.step_ms: list[float] = []
        # the tokens those passes handed out, a stop token included: more than the passes where the
        # model accepts tokens that prompt lookup drafted
        self.decode_tokens = 0
        self.reused_prompt_tokens = 0
        # "stop" (a stop token), "length" (max_new_tokens) or "abstained" once it has run to its end
        self.stop_reason = ""
        self._stop = stop_token_ids
        self._steps = decode(self)  # the decoding loop, which records its figures on this object

    def choose(self, logits: np.ndarray) -> int:
        """The next token from a position's logits: the argmax, or the constraint's choice."""
        if not self.tokens and self.abstention is not None:
            logits = self._first_step(logits)
            if logits is None:
                return self._abstain_token
        token = int(logits.argmax()) if self.constraint is None else self.constraint.choose(logits, self.tokens)
        self._score(logits, token)
        return token

    def _score(self, logits: np.ndarray, token: int) -> None:
        if self.abstention is not None and self.abstention.reads_answer:
            started = time.perf_counter()
            if self._scored_tokens == 0 and self._first_log_denominator is not None:
                self._answer_log_probability += float(logits[token]) - self._first_log_denominator
            else:
                self._answer_log_probability += log_probability(logits, token)
            self._scored_tokens += 1
            self.abstain_ms += (time.perf_counter() - started) * 1000

    def settle(self) -> None:
        """Once the answer is written: where the abstention reads it, its confidence takes in the
        answer's tokens, and below the threshold the answer is an abstention after all."""
        a = self.abstention
        if a is None or not a.reads_answer or self.abstained or not self._scored_tokens:
            return
        self.confidence *= float(np.exp(self._answer_log_probability / self._scored_tokens))
        if self.confidence < a.threshold:
            self.abstained = True
            self.stop_reason = "abstained"

    def _first_step(self, logits: np.ndarray) -> np.ndarray | None:
        """The first step's logits with NO_ANSWER ruled out, or None where the generation abstains."""
        started = time.perf_counter()
        self.confidence, self._first_log_denominator = self.abstention.screen(logits)
        if self.confidence < self.abstention.threshold:
            self.abstained = True
            logits = None
        else:
            logits = logits.copy()
            logits[self.abstention.token_ids] = -np.inf
        self.abstain_ms += (time.perf_counter() - started) * 1000
        return logits

    @property
    def _abstain_token(self) -> int:
        return min(self._stop)  # any stop token ends the generation with no answer

    def choose_checking(self, logits: np.ndarray, draft: np.ndarray) -> np.ndarray:
        """The token at each of a step's positions, the answer so far followed by the draft before it:
        under a constraint, the positions after the first that differs from its draft are -1 (the
        step accepts no draft beyond it)."""
        if not self.tokens and self.abstention is not None:
            first = self._first_step(logits[0])
            if first is None:
                return np.array([self._abstain_token], dtype=np.int64)
            logits = np.concatenate([first[None], logits[1:]])
        if self.constraint is None:
            chosen = logits.argmax(-1)
        else:
            chosen = np.full(len(logits), -1, dtype=np.int64)
            for j in range(len(logits)):
                chosen[j] = self.constraint.choose(logits[j], self.tokens + [int(t) for t in draft[:j]])
                if j >= len(draft) or chosen[j] != draft[j]:
                    break
        for j in range(len(chosen)):  # the tokens the step keeps: its drafts up to the first it rejects, and one more
            self._score(logits[j], int(chosen[j]))
            if j >= len(draft) or chosen[j] != draft[j]:
                break
        return chosen

    @property
    def decode_ms(self) -> float:
        return sum(self.step_ms)

    @property
    def decode_steps(self) -> int:
        return len(self.step_ms)

    def __iter__(self) -> Iterator[int]:
        for token in self._steps:
            # every family's stop check: a stop token ends the answer, and is neither kept nor yielded
            if token in self._stop:
                self.stop_reason = "abstained" if self.abstained else "stop"
                return
            self.tokens.append(token)
            yield token
        self.stop_reason = "length"


class GreedyDecoder:
    """generate() and greedy() around a family's loop. The step interface that a generator implements:

    steps(result, prompt_ids, max_new_tokens)
        the decoding loop: yields the token ids the model chooses, at most `max_new_tokens`, a stop
        token included (the Generation ends the answer there), and records its figures on `result`
        (prefill_ms, step_ms, decode_tokens, reused_prompt_tokens).
    stop
        the stop token ids.
    past_inputs
        the graph's KV-cache inputs, [batch, heads, past_length, head_dim].
    """

    stop: set[int]
    past_inputs: list

    def steps(self, result: Generation, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        raise NotImplementedError

    def generate(self, prompt_ids: list[int], max_new_tokens: int, constraint: SpanConstraint | None = None,
                 abstention: Abstention | None = None) -> Generation:
        """Greedy decoding from `prompt_ids`, token by token as the result is iterated; the stop token is
        not yielded. constraint: the answer a span of the context (SpanConstraint); abstention: the
        answer's confidence taken at the first step, and no answer below its threshold."""
        return Generation(lambda result: self.steps(result, prompt_ids, max_new_tokens), self.stop, constraint,
                          abstention)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        """The whole generation at once."""
        generation = self.generate(prompt_ids, max_new_tokens)
        for _ in generation:
            pass
        return generation

    def empty_cache(self) -> dict[str, np.ndarray]:
        # heads and head_dim are fixed in the graph; the past is empty
        return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=ORT_DTYPES[i.type]) for i in self.past_inputs}


def _periodic_run(tokens: list[int], period: int) -> int:
    """Length of the longest tail of `tokens` in which every token equals the one `period` before it
    (counting that first block)."""
    i = len(tokens) - period - 1
    while i >= 0 and tokens[i] == tokens[i + period]:
        i -= 1
    return len(tokens) - 1 - i


def repetition_cut(tokens: list[int], window: int) -> int | None:
    """Where to cut an answer whose last `window` tokens repeat one block (at least three times over):
    after the first occurrence of the block in that run. None where they do not, or window is 0.

    A small model decoding greedily can loop ("Angularananan..." up to the token limit); the run of
    repeats is cut, its first block kept.
    """
    if window <= 0 or len(tokens) < window:
        return None
    for period in range(1, window // 3 + 1):
        run = _periodic_run(tokens, period)
        if run >= window:
            return len(tokens) - run + period
    return None


def periodic_tail(tokens: list[int], max_period: int) -> int:
    """Length of the longest tail of `tokens` that repeats one block of at most `max_period` tokens at
    least twice: what a stream holds back while a loop may be starting (0 where none does)."""
    runs = [_periodic_run(tokens, period) for period in range(1, max_period + 1)]
    return max([run for period, run in enumerate(runs, start=1) if run >= 2 * period], default=0)

