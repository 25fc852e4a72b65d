"""Where an answer stands (runtime.citations): the passage and the spans, in its stored text, of the
sentence and the answer; on answers of real bundles, and on chosen cases."""

import pytest

from edgerag.runtime import Pipeline
from edgerag.runtime.citations import cite

QUESTIONS = ["Which team won Super Bowl 50?", "What is the capital of Poland?", "Who were the Normans?",
             "What is the atomic number of oxygen?", "Where is Victoria?", "What is geology?"]


def squeezed(text: str) -> str:
    return " ".join(text.split()).casefold()


def check_spans(citation: dict, passages: list[dict], answer: str) -> None:
    """The spans, cut from the stored passage text, are the cited sentence and the answer."""
    stored = next(p["text"] for p in passages if p["id"] == citation["passage_id"] and p["title"] == citation["title"])
    assert stored[citation["sentence_start"]:citation["sentence_end"]] == citation["sentence"]
    assert squeezed(stored[citation["answer_start"]:citation["answer_end"]]) == squeezed(answer)
    assert citation["sentence_start"] <= citation["answer_start"] < citation["answer_end"] <= citation["sentence_end"]


def test_a_repeated_sentence_is_cited_once_at_its_first_place():
    text = "The fort fell in 1204. Merchants came back.  The fort fell in 1204. It was rebuilt."
    passages = [{"id": "other", "title": "Harbour", "text": "Boats left at dawn."},
                {"id": "p1", "title": "Fort", "text": text}]
    citation = cite("fort fell in\n1204", [("Harbour", passages[0]["text"]), ("Fort", text)], passages)
    assert (citation.passage_id, citation.answer_start, citation.sentence) == ("p1", 4, "The fort fell in 1204.")
    check_spans(citation.to_dict(), passages, "fort fell in 1204")


def test_of_several_places_the_sentence_closest_to_the_question_is_cited():
    text = "Warsaw has been a multi-cultural city. Warsaw is the capital and largest city of Poland."
    passages = [{"id": "w", "title": "Warsaw", "text": text}]
    citation = cite("Warsaw", [("Warsaw", text)], passages, "What is the largest city of Poland?")
    assert citation.sentence == "Warsaw is the capital and largest city of Poland."
    assert cite("Warsaw", [("Warsaw", text)], passages).sentence.startswith("Warsaw has been")  # no question: the first


def test_the_cited_place_is_one_the_generator_read():
    """A compressed context read the second sentence only: the citation points there, not to the first."""
    text = "Warsaw is large. In 1596 the king moved the capital to Warsaw from Kraków. Warsaw grew."
    passages = [{"id": "w", "title": "Warsaw", "text": text}]
    read = [("Warsaw", "In 1596 the king moved the capital to Warsaw from Kraków.")]
    citation = cite("Warsaw", read, passages)
    assert citation.sentence.startswith("In 1596") and text[citation.answer_start:citation.answer_end] == "Warsaw"
    assert citation.answer_start > text.index("Warsaw is")


def test_an_answer_not_in_what_was_read_has_no_citation():
    passages = [{"id": "w", "title": "Warsaw", "text": "Warsaw is the capital."}]
    assert cite("Kraków", [("Warsaw", "Warsaw is the capital.")], passages) is None
    assert cite("", [("Warsaw", "Warsaw is the capital.")], passages) is None
    assert cite("capital", [("Warsaw", "Warsaw is large.")], passages) is None  # in the store, not read


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle_varied", "tiny_bundle_compressed"])
def test_every_span_answer_cites_its_sentence(bundle_fixture, request):
    pipeline = Pipeline.load(request.getfixturevalue(bundle_fixture), answers="spans")
    cited = 0
    for question in QUESTIONS:
        answer = pipeline.ask(question, max_new_tokens=10)
        if not answer.answer:
            continue
        assert answer.supported and len(answer.citations) == 1, answer
        check_spans(answer.citations[0], answer.passages, answer.answer)
        cited += 1
    assert cited >= 3


def test_a_free_answer_off_the_context_is_not_supported(tiny_bundle_varied):
    pipeline = Pipeline.load(tiny_bundle_varied, answers="free")
    answers = [pipeline.ask(q, max_new_tokens=10) for q in QUESTIONS]
    for answer in answers:
        held = bool(answer.answer) and any(squeezed(answer.answer) in squeezed(c["text"]) for c in answer.context)
        assert answer.supported == held and len(answer.citations) == held
    assert not all(a.supported for a in answers)  # the random generator wanders: some answers stand nowhere
