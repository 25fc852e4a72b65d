"""SQuAD metrics: the official normalization on known cases; no torch needed."""

import pytest

from edgerag.metrics import best_over_references, exact_match, f1, normalize_answer, recall_at, spelled_as_read


@pytest.mark.parametrize("raw, normalized", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  a   cat, an owl & the DOG! ", "cat owl dog"),
    ("Theatre", "theatre"),              # 'the' inside a word stays
    ("1,000 km.", "1000 km"),
    ("Anne's", "annes"),
    ("", ""),
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_and_f1():
    assert exact_match("the Denver Broncos", "Denver Broncos!") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # precision 1/1, recall 1/2 -> F1 2/3
    assert f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    assert f1("Carolina Panthers", "Denver Broncos") == 0.0
    assert f1("", "Denver") == 0.0
    # repeated tokens count with multiplicity
    assert f1("x y y", "y y z") == pytest.approx(2 / 3)
    assert f1("a y y", "y y z") == pytest.approx(0.8)  # the article is dropped first


def test_best_over_references_takes_the_best():
    refs = ["Broncos", "Denver Broncos", "the Denver Broncos team"]
    assert best_over_references(exact_match, "Denver Broncos", refs) == 1.0
    assert best_over_references(f1, "Denver", refs) == pytest.approx(2 / 3)
    assert best_over_references(f1, "x", []) == 0.0


def test_recall_at():
    ranked = ["p3", "p1", "p2"]
    assert recall_at(ranked, "p1", 1) == 0.0
    assert recall_at(ranked, "p1", 2) == 1.0
    assert recall_at(ranked, "p9", 20) == 0.0


def test_spelled_as_read_counts_answers_given_as_the_text_spells_them():
    read = ["The Cold War drew to a close.", "Melodram, a  theatre", "the Broncos"]
    assert spelled_as_read(["The Cold  War", "Melodram, a theatre", "the Broncos"], read)["spelled_as_read"] == 100.0
    assert spelled_as_read(["the Cold War", "MeloDram", ""], read)["spelled_as_read"] == 0.0  # case counts; "" is no answer
    assert spelled_as_read(["", ""], read[:2])["spelled_as_read"] is None  # no answer given: no share


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, edgerag.train, edgerag.data, edgerag.metrics, edgerag.train.folder_eval, edgerag.train.recipe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
