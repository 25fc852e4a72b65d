import pytest

from edgerag.runtime.prompt import CHATML, PLAIN, PromptError, PromptTemplate, build_prompt_ids

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
