"""Prompt lookup decoding: a decode step feeds tokens drafted from the prompt and keeps those the
model would have chosen itself. The greedy tokens must stay the ones of one token a step."""

import numpy as np
import pytest

from edgerag.runtime import Pipeline
from edgerag.runtime.generation import draft_by_lookup

PASSAGES = [("Super Bowl 50", "The Denver Broncos defeated the Carolina Panthers 24-10 to win Super Bowl 50."),
            ("Warsaw", "Warsaw is the capital and largest city of Poland, on the Vistula river.")]
QUESTIONS = ["Which team won Super Bowl 50?", "What is the capital of Poland?", "Which river flows through Warsaw?"]


def _draft(tokens, length=None, max_ngram=3, count=4):
    return list(draft_by_lookup(np.array(tokens), len(tokens) if length is None else length, max_ngram, count))


def test_draft_follows_the_first_earlier_occurrence_of_the_longest_ngram():
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 8, 2, 3, 7, 6, 2]
    assert _draft(tokens) == [3, 9, 8, 2]  # only the 1-gram [2] occurs before: first at 1
    assert _draft(tokens + [3]) == [9, 8, 2, 3]  # the 2-gram [2, 3]: first at 1
    assert _draft([4, 2, 3, 5, 1, 2, 3, 6, 1, 2, 3]) == [6, 1, 2, 3]  # the 3-gram [1, 2, 3] beats [2, 3] at 1
    assert _draft(tokens + [3], max_ngram=1) == [9, 8, 2, 3]  # [3] first at 2


def test_draft_stops_at_the_context_and_at_its_count():
    assert _draft([5, 6, 7, 5]) == [6, 7, 5]  # no further than the context's end
    assert _draft([5, 6, 7, 5], count=1) == [6]
    assert _draft([5, 6, 7, 5, 0, 0], length=4) == [6, 7, 5]  # the context is the first `length` tokens
    assert _draft([5, 6, 7, 5], count=0) == []
    assert _draft([5, 6, 7, 8]) == []  # the tail never matches itself
    assert _draft([5]) == []


@pytest.mark.parametrize("reuse", ["template", "previous"])
def test_drafts_leave_the_greedy_tokens_unchanged(tiny_bundle, reuse):
    """fp32: a step that checks a draft chooses the tokens of one token a step. The tiny model repeats
    itself, so drafts from its own answer are accepted: the test sees steps that chose several tokens."""
    drafting = Pipeline.load(tiny_bundle, reuse_prefix=reuse)
    single = Pipeline.load(tiny_bundle, reuse_prefix=reuse, prompt_lookup=0)
    assert drafting.generator.prompt_lookup > 0 and single.generator.prompt_lookup == 0
    several = 0
    for question in QUESTIONS + QUESTIONS[:1]:
        prompt = drafting.prompt_ids(question, PASSAGES)
        a, b = drafting.generator.greedy(prompt, 24), single.generator.greedy(prompt, 24)
        assert (a.tokens, a.stop_reason) == (b.tokens, b.stop_reason)
        # every token after the prefill's was chosen by some step: kept, or the stop token
        assert a.decode_tokens == b.decode_tokens == len(a.tokens) - 1 + (a.stop_reason == "stop")
        assert b.decode_steps == b.decode_tokens and a.decode_steps <= a.decode_tokens
        several += a.decode_steps < a.decode_tokens
    assert several


def test_drafts_respect_max_new_tokens_and_stop_tokens(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle, prompt_lookup=6)
    prompt = pipeline.prompt_ids(QUESTIONS[0], PASSAGES)
    for limit in (1, 2, 3, 7):
        generation = pipeline.generator.greedy(prompt, limit)
        assert len(generation.tokens) <= limit
        assert generation.stop_reason == "stop" or len(generation.tokens) == limit
    # a stop token chosen inside an accepted draft ends the answer there
    free = pipeline.generator.greedy(prompt, 24)
    assert free.decode_steps < free.decode_tokens, "the tiny model's answer should accept a draft"
    stop_at = len(free.tokens) - 2
    stopping = type(pipeline.generator)(pipeline.generator.session, [free.tokens[stop_at]], reuse_prefix="none",
                                        kv_in_place=True, prompt_lookup=6)
    stopped = stopping.greedy(prompt, 24)
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == free.tokens[:free.tokens.index(free.tokens[stop_at])]


def test_quantized_answers_keep_their_accounting(tiny_bundle_int8sq):
    """int8sq shares a dynamic quantization scale across the rows a step feeds, so its tokens may move
    within the quantization error (README, "Prompt lookup"); the counts must still add up."""
    pipeline = Pipeline.load(tiny_bundle_int8sq)
    for question in QUESTIONS:
        answer = pipeline.ask(question, max_new_tokens=16)
        t = answer.timings
        assert t["decode_steps"] <= t["decode_tokens"] <= 16
        assert answer.tokens_per_second == pytest.approx(t["decode_tokens"] / t["decode_ms"] * 1000)


def test_graphs_without_logits_to_keep_decode_one_token_a_step(tiny_bundle_optimum):
    pipeline = Pipeline.load(tiny_bundle_optimum, prompt_lookup=4)
    assert pipeline.generator.prompt_lookup == 0
    answer = pipeline.ask(QUESTIONS[0], max_new_tokens=8)
    assert answer.timings["decode_steps"] == answer.timings["decode_tokens"]


@pytest.mark.parametrize("value", [-1, 1.5, True, "4"])
def test_prompt_lookup_must_be_a_count(tiny_bundle, value):
    with pytest.raises(ValueError, match="prompt_lookup"):
        Pipeline.load(tiny_bundle, prompt_lookup=value)
