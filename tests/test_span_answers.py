"""Answers that are spans of what the generator read (runtime.generation.SpanConstraint, answers="spans")."""

import numpy as np
import pytest

from edgerag.runtime import Pipeline
from edgerag.runtime.generation import SpanConstraint

QUESTIONS = ["Which team won Super Bowl 50?", "What is the capital of Poland?", "Who were the Normans?",
             "What is the atomic number of oxygen?", "Where is Victoria?", "What is geology?"]


def squeezed(text: str) -> str:
    return " ".join(text.split()).casefold()


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle_varied):
    return Pipeline.load(tiny_bundle_varied, retrieval_only=True).tokenizer


def constraint_for(tokenizer, context: str, stop=(0,)) -> SpanConstraint:
    return SpanConstraint(context, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop,
                          lambda text: tokenizer.encode(text, add_special_tokens=False).ids)


def test_the_most_likely_token_that_keeps_a_span_is_chosen(tokenizer):
    context = "the denver broncos won the game"
    constraint = constraint_for(tokenizer, context)
    ids = tokenizer.encode("the denver broncos", add_special_tokens=False).ids
    the = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]) == "the")
    logits = np.zeros(tokenizer.get_vocab_size(), np.float32)
    off_span = tokenizer.encode("the paris", add_special_tokens=False).ids[the]
    logits[off_span], logits[ids[the]] = 5.0, 4.0  # the model prefers a token the context does not continue with
    assert constraint.choose(logits, ids[:the]) == ids[the]
    logits[0] = 6.0  # a stop token ends the answer where it is the most likely and a word has ended
    assert constraint.choose(logits, ids[:the]) == 0
    assert constraint.choose(np.zeros_like(logits), tokenizer.encode("zebra", add_special_tokens=False).ids) == 0


@pytest.mark.parametrize("prompt_lookup", [0, 4])
def test_every_answer_is_a_span_of_what_was_read(tiny_bundle_varied, prompt_lookup):
    pipeline = Pipeline.load(tiny_bundle_varied, answers="spans", prompt_lookup=prompt_lookup)
    free = Pipeline.load(tiny_bundle_varied, answers="free", prompt_lookup=prompt_lookup)
    differ = 0
    for question in QUESTIONS:
        answer = pipeline.ask(question, max_new_tokens=12)
        assert any(squeezed(answer.answer) in squeezed(c["text"]) for c in answer.context)  # within one passage
        differ += answer.answer != free.ask(question, max_new_tokens=12).answer
    assert differ  # the random tiny generator wanders off its context: the constraint had work to do


def test_drafts_on_and_off_give_the_same_span_answers(tiny_bundle_varied, tiny_bundle):
    for bundle in (tiny_bundle_varied, tiny_bundle):
        drafting = Pipeline.load(bundle, answers="spans", prompt_lookup=4)
        single = Pipeline.load(bundle, answers="spans", prompt_lookup=0)
        assert drafting.generator.prompt_lookup > 0
        for question in QUESTIONS:
            a, b = drafting.ask(question, max_new_tokens=16), single.ask(question, max_new_tokens=16)
            assert (a.answer, a.stop_reason, a.new_tokens) == (b.answer, b.stop_reason, b.new_tokens)


def test_answers_setting_is_checked(tiny_bundle):
    with pytest.raises(ValueError, match="answers"):
        Pipeline.load(tiny_bundle, answers="extractive")
    pipeline = Pipeline.load(tiny_bundle, retrieval_only=True)
    assert pipeline.answers == pipeline.manifest.generation.answers == "spans"  # export's default
    from edgerag.runtime.manifest import Manifest

    older = pipeline.manifest.to_dict()
    del older["generation"]["answers"]  # a bundle exported before the setting existed
    assert Manifest.from_dict(older).generation.answers == "free"
    older["generation"]["answers"] = "extractive"
    with pytest.raises(Exception, match="generation.answers"):
        Manifest.from_dict(older)


def test_a_character_split_over_tokens_is_allowed_to_finish(tokenizer):
    context = "the meeting was held in zürich and in são paulo"
    constraint = constraint_for(tokenizer, context)
    for word in ("zürich", "são paulo"):
        ids = tokenizer.encode(word, add_special_tokens=False).ids
        assert all(constraint.allows(ids[:i]) for i in range(1, len(ids) + 1))
    assert not constraint.allows(tokenizer.encode("zurich", add_special_tokens=False).ids)


def test_a_span_starts_where_a_word_starts(tokenizer):
    # matched case aside, "Ce, Warsaw" is in "existence, warsaw"; it must not start inside "existence"
    constraint = constraint_for(tokenizer, "throughout its existence, warsaw has been a city")
    assert not constraint.allows(tokenizer.encode("Ce, Warsaw", add_special_tokens=False).ids)
    assert constraint.allows(tokenizer.encode("existence, Warsaw", add_special_tokens=False).ids)
    assert constraint.allows(tokenizer.encode(" Warsaw", add_special_tokens=False).ids)
    # a word inside another elsewhere still counts where it also stands alone
    assert constraint_for(tokenizer, "a citadel in the city").allows(tokenizer.encode("city", add_special_tokens=False).ids)


def test_a_stop_inside_a_word_is_refused(tokenizer):
    context = "the denver broncos won the game"
    constraint = constraint_for(tokenizer, context)
    assert constraint.ends_word("the denver") and constraint.ends_word("Broncos") and constraint.ends_word("")
    assert not constraint.ends_word("the denv") and not constraint.ends_word("bronc")
    ids = tokenizer.encode("denver", add_special_tokens=False).ids
    assert len(ids) > 1 and constraint.allows(ids[:1]) and not constraint.ends_word(tokenizer.decode(ids[:1]))
    logits = np.zeros(tokenizer.get_vocab_size(), np.float32)
    logits[0], logits[ids[1]] = 6.0, 1.0  # the stop is the most likely token, but the answer stands inside "denver"
    assert constraint.choose(logits, ids[:1]) == ids[1]
    assert constraint.choose(logits, ids) == 0


def test_a_word_is_finished_where_none_of_the_likeliest_tokens_goes_on_with_it(tokenizer):
    constraint = constraint_for(tokenizer, "the denver broncos won the game")
    ids = tokenizer.encode("denver", add_special_tokens=False).ids
    assert len(ids) > 1 and not constraint.ends_word(tokenizer.decode(ids[:1]))
    off_span = [t for t in range(1, tokenizer.get_vocab_size()) if not constraint.allows(ids[:1] + [t])]
    logits = np.full(tokenizer.get_vocab_size(), -10.0, np.float32)
    # the stop and the CANDIDATES likeliest tokens after it would all leave the answer inside "denver"
    logits[0], logits[off_span[:2 * SpanConstraint.CANDIDATES]] = 6.0, 5.0
    chosen = constraint.choose(logits, ids[:1])
    assert chosen != 0 and "denver".startswith(tokenizer.decode(ids[:1] + [chosen]))
    assert constraint.choose(logits, ids) == 0  # where the word has ended, the answer still stops
    without_encode = SpanConstraint("the denver broncos won the game", constraint.decode, constraint.stop)
    assert without_encode.choose(logits, ids[:1]) == 0


def test_the_context_s_spelling_is_preferred_where_a_likely_token_has_it(tokenizer):
    constraint = constraint_for(tokenizer, "They won the game")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    the, upper, lower = encode("The"), encode("Y"), encode("y")
    assert len(upper) == len(lower) == 1 and constraint.allows(the + upper) and not constraint.allows(the + upper, spelled=True)
    logits = np.zeros(tokenizer.get_vocab_size(), np.float32)
    logits[upper], logits[lower] = 5.0, 4.0
    assert constraint.choose(logits, the) == lower[0]  # "They", not "TheY"
    off_span = [t for t in range(1, tokenizer.get_vocab_size()) if not constraint.allows(the + [t])]
    logits[off_span[:SpanConstraint.CANDIDATES]], logits[lower] = 4.5, -1.0
    assert constraint.choose(logits, the) == upper[0]  # out of the likeliest tokens: the answer goes on case aside
    logits[lower] = 4.0
    shouted = encode("THE")  # an answer spelled otherwise already is held to the context case aside only
    assert constraint.choose(logits, shouted) == upper[0]


def test_a_word_is_finished_as_the_context_spells_it(tokenizer):
    constraint = constraint_for(tokenizer, "the CITY CHARTER and the city")
    ci = tokenizer.encode("CI", add_special_tokens=False).ids
    off_span = [t for t in range(1, tokenizer.get_vocab_size()) if not constraint.allows(ci + [t])]
    logits = np.full(tokenizer.get_vocab_size(), -10.0, np.float32)
    logits[0], logits[off_span[:2 * SpanConstraint.CANDIDATES]] = 6.0, 5.0
    chosen = constraint.choose(logits, ci)
    assert "CITY".startswith(tokenizer.decode(ci + [chosen])) and len(tokenizer.decode(ci + [chosen])) > 2


def test_a_space_does_not_end_a_word_the_context_continues(tokenizer):
    constraint = constraint_for(tokenizer, "the denver broncos won")
    assert constraint.allows(tokenizer.encode("the ", add_special_tokens=False).ids)  # "the denver"
    prefix = tokenizer.encode("bronc", add_special_tokens=False).ids
    space = tokenizer.encode(" ", add_special_tokens=False).ids
    assert len(space) == 1 and not constraint.allows(prefix + space)  # "bronc " is nowhere in the context


def test_scripts_without_spaces_keep_their_spans():
    constraint = SpanConstraint("北京是中国的首都。", lambda ids: "".join(map(chr, ids)), (0,))
    assert constraint.allows([ord(c) for c in "中国"]) and constraint.ends_word("北京")
