import pytest

from edgerag.runtime.prompt import (CHATML, CHATML_COMPACT, PLAIN, PLAIN_COMPACT, PromptError, PromptTemplate,
                                     build_prompt_ids, question_at)

TEMPLATE = PromptTemplate.from_dict(PLAIN)


def encode(text):
    """One id per character: token counts are easy to reason about."""
    return [ord(c) for c in text]


def decode(ids):
    return "".join(chr(i) for i in ids)


def test_prompt_fits_untouched():
    ids = build_prompt_ids(encode, TEMPLATE, "Who?", [("A", "alpha"), ("B", "beta")], 10_000)
    text = decode(ids)
    assert "[1] A: alpha\n[2] B: beta\n" in text
    assert text.endswith("Question: Who?\nAnswer:")


def test_lowest_ranked_passage_is_cut_first():
    full = len(build_prompt_ids(encode, TEMPLATE, "Who?", [("A", "a" * 50), ("B", "b" * 50)], 10_000))
    ids = build_prompt_ids(encode, TEMPLATE, "Who?", [("A", "a" * 50), ("B", "b" * 50)], full - 20)
    text = decode(ids)
    assert len(ids) == full - 20
    assert "a" * 50 in text and "[2] B: " + "b" * 30 + "\n" in text


def test_passage_dropped_whole_then_question_truncated():
    question = "q" * 400
    ids = build_prompt_ids(encode, TEMPLATE, question, [("A", "a" * 100), ("B", "b" * 100)], 200)
    text = decode(ids)
    assert len(ids) <= 200
    assert "[1]" not in text and "[2]" not in text  # passages go before the question is cut
    assert text.endswith("\nAnswer:") and "Question: qqq" in text


def test_empty_question_is_refused():
    with pytest.raises(PromptError, match="empty"):
        build_prompt_ids(encode, TEMPLATE, "   ", [("A", "a")], 100)


def test_context_smaller_than_template_is_refused():
    with pytest.raises(PromptError, match="cannot hold"):
        build_prompt_ids(encode, TEMPLATE, "Who?", [], 5)


def test_template_choice_follows_vocabulary():
    assert PromptTemplate.for_vocab({"<|im_start|>": 1}.get).prefix == CHATML["prefix"]
    assert PromptTemplate.for_vocab({}.get).prefix == PLAIN["prefix"]


@pytest.mark.parametrize("base", [PLAIN, CHATML, CHATML_COMPACT, PLAIN_COMPACT])
def test_question_first_is_asked_before_the_passages_and_once(base):
    template = PromptTemplate.from_dict(question_at(base, "first"))
    text = decode(build_prompt_ids(encode, template, "Who won?", [("A", "alpha"), ("B", "beta")], 10_000))
    assert text.count("Who won?") == 1
    assert text.index("Who won?") < text.index("alpha") < text.index("beta")
    assert text.endswith(base["question"].partition("{question}")[2])  # the answer still starts where it did
    # the opening, whose KV the device computes once for every prompt, stops short of the question
    assert text.startswith(template.opening) and "Who" not in template.opening and "{" not in template.opening


def test_question_both_places_and_end_is_unchanged():
    both = PromptTemplate.from_dict(question_at(CHATML_COMPACT, "both"))
    text = decode(build_prompt_ids(encode, both, "Who won?", [("A", "alpha")], 10_000))
    assert text.count("Who won?") == 2 and text.index("Who won?") < text.index("alpha") < text.rindex("Who won?")
    assert question_at(CHATML_COMPACT, "end") == CHATML_COMPACT
    assert PromptTemplate.for_vocab({"<|im_start|>": 1}.get, True, "both") == both


def test_a_question_asked_twice_is_cut_in_both_places_within_the_budget():
    both = PromptTemplate.from_dict(question_at(PLAIN_COMPACT, "both"))
    question = "q" * 100
    ids = build_prompt_ids(encode, both, question, [("A", "a" * 100)], 150)
    text = decode(ids)
    assert len(ids) <= 150 and "a" not in text.replace("Answer", "")  # the passage went first
    first, second = text.split("\n")[0], text.split("\n")[-2]
    assert first == second and first.startswith("Question: qq")  # the same question, cut alike


def test_an_unknown_question_place_is_refused():
    with pytest.raises(ValueError, match="first"):
        question_at(PLAIN, "middle")
