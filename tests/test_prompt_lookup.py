"""Prompt lookup decoding: a decode step feeds tokens drafted from the prompt and keeps those the
model would have chosen itself. The greedy tokens must stay the ones of one token a step."""

import numpy as np
import pytest

from edgerag.runtime import Pipeline
from edgerag.runtime.decoder_only import draft_by_lookup

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
@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_varied"])
def test_drafts_leave_the_greedy_tokens_unchanged(bundle_fixture, reuse, request, monkeypatch):
    """fp32: a step that checks a draft chooses the tokens of one token a step. One tiny model repeats
    itself, so drafts from its own answer are accepted; the other's tokens vary, so its drafts (from
    1-gram matches in the prompt) are mostly rejected and undone."""
    from edgerag.runtime import decoder_only

    bundle = request.getfixturevalue(bundle_fixture)
    drafting = Pipeline.load(bundle, reuse_prefix=reuse)
    single = Pipeline.load(bundle, reuse_prefix=reuse, prompt_lookup=0)
    assert drafting.generator.prompt_lookup > 0 and single.generator.prompt_lookup == 0
    drafted = []

    def watched(*args):
        draft = draft_by_lookup(*args)
        drafted.append(len(draft))
        return draft

    monkeypatch.setattr(decoder_only, "draft_by_lookup", watched)
    several = 0
    for question in QUESTIONS + QUESTIONS[:1]:
        prompt = drafting.prompt_ids(question, PASSAGES)
        a, b = drafting.generator.greedy(prompt, 24), single.generator.greedy(prompt, 24)
        assert (a.tokens, a.stop_reason) == (b.tokens, b.stop_reason)
        # every token after the prefill's was handed out by some step: kept, or the stop token
        assert a.decode_tokens == b.decode_tokens == len(a.tokens) - 1 + (a.stop_reason == "stop")
        assert b.decode_steps == b.decode_tokens and a.decode_steps <= a.decode_tokens
        several += a.decode_steps < a.decode_tokens
    assert any(drafted)
    if bundle_fixture == "tiny_bundle":
        assert several
    else:
        assert len(set(a.tokens)) > 3


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


def _unstopped(pipeline, prompt_lookup, stop=()):
    generator = pipeline.generator
    return type(generator)(generator.session, list(stop), reuse_prefix="none", kv_in_place=True,
                           prompt_lookup=prompt_lookup)


@pytest.mark.parametrize("drafts", ["right", "wrong", "right then wrong"])
def test_accepted_and_rejected_drafts_give_the_tokens_of_one_token_a_step(tiny_bundle_varied, monkeypatch, drafts):
    """Drafts from a replay of the greedy answer itself, each of them wrong, or right for its first half:
    steps accept all, none or part of them, and undo the rest, and the tokens stay the same."""
    pipeline = Pipeline.load(tiny_bundle_varied)
    prompt = pipeline.prompt_ids(QUESTIONS[1], PASSAGES)
    reference = _unstopped(pipeline, 0).greedy(prompt, 24)
    assert len(reference.tokens) == 24 and len(set(reference.tokens)) > 5
    answer = np.array(prompt + reference.tokens)

    def replay(context, length, max_ngram, count):
        assert np.array_equal(context[:length], answer[:length])  # what the loop drafts from is the answer so far
        draft = answer[length:length + count].copy()
        if drafts == "wrong":
            draft += 1
        elif drafts == "right then wrong":
            draft[len(draft) // 2:] += 1
        return draft

    monkeypatch.setattr("edgerag.runtime.decoder_only.draft_by_lookup", replay)
    drafting = _unstopped(pipeline, 4).greedy(prompt, 24)
    assert (drafting.tokens, drafting.stop_reason, drafting.decode_tokens) == (reference.tokens, "length", 23)
    expected_steps = {"right": 5, "wrong": 23}  # 23 tokens after the prefill's: 5 a step, or 1
    if drafts in expected_steps:
        assert drafting.decode_steps == expected_steps[drafts]
    else:
        assert expected_steps["right"] < drafting.decode_steps < expected_steps["wrong"]


def test_a_stop_token_inside_an_accepted_draft_ends_the_answer(tiny_bundle_varied, monkeypatch):
    pipeline = Pipeline.load(tiny_bundle_varied)
    prompt = pipeline.prompt_ids(QUESTIONS[0], PASSAGES)
    reference = _unstopped(pipeline, 0).greedy(prompt, 12)
    at = next(i for i in (3, 4, 2) if reference.tokens[i] not in reference.tokens[:i])  # the first step's draft covers 1-4
    answer = np.array(prompt + reference.tokens)
    monkeypatch.setattr("edgerag.runtime.decoder_only.draft_by_lookup",
                        lambda context, length, max_ngram, count: answer[length:length + count])
    stopped = _unstopped(pipeline, 4, stop=[reference.tokens[at]]).greedy(prompt, 12)
    assert (stopped.tokens, stopped.stop_reason) == (reference.tokens[:at], "stop")
    assert (stopped.decode_steps, stopped.decode_tokens) == (1, at)  # the stop token counted, not kept


def test_quantized_answers_draft_and_keep_their_accounting(tiny_bundle_int8sq):
    """int8sq shares a dynamic quantization scale across the rows a step feeds, so its tokens may move
    within the quantization error (docs/bundle.md, "Decoding"); it drafts all the same, and the counts
    add up."""
    pipeline = Pipeline.load(tiny_bundle_int8sq, answers="free")  # the repeating tiny model's own tokens draft
    assert pipeline.generator.prompt_lookup > 0
    several = 0
    for question in QUESTIONS:
        answer = pipeline.ask(question, max_new_tokens=16)
        t = answer.timings
        assert t["decode_steps"] <= t["decode_tokens"] <= 16
        assert answer.tokens_per_second == pytest.approx(t["decode_tokens"] / t["decode_ms"] * 1000)
        several += t["decode_steps"] < t["decode_tokens"]
    assert several


def test_graphs_without_logits_to_keep_decode_one_token_a_step(tiny_bundle_optimum):
    pipeline = Pipeline.load(tiny_bundle_optimum, prompt_lookup=4)
    assert pipeline.generator.prompt_lookup == 0
    answer = pipeline.ask(QUESTIONS[0], max_new_tokens=8)
    assert answer.timings["decode_steps"] == answer.timings["decode_tokens"]


@pytest.mark.parametrize("value", [-1, 1.5, True, "4"])
def test_prompt_lookup_must_be_a_count(tiny_bundle, value):
    with pytest.raises(ValueError, match="prompt_lookup"):
        Pipeline.load(tiny_bundle, prompt_lookup=value)
