import gzip
import json

import pytest

from edgerag.data import DataError, read_passages, read_squad


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "a", "title": "T", "text": "fine"}\n{"id": "b", "text": broken}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: not valid JSON"):
        read_passages(path)


def test_jsonl_without_text_is_named(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "a", "title": "T"}\n')
    with pytest.raises(DataError, match=r":1: expected an object"):
        read_passages(path)


def test_squad_gzip_unique_passages_and_skipped_questions(tmp_path):
    doc = {"data": [{"title": "T_1", "paragraphs": [
        {"context": "Alpha beta.", "qas": [{"id": "1", "question": "Q?", "answers": [{"text": "Alpha"}, {"text": "Alpha"}]},
                                            {"id": "2", "question": "Q2?", "answers": []}]},
        {"context": "Alpha beta.", "qas": []}]}]}
    path = tmp_path / "s.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(doc, f)
    passages, questions, skipped = read_squad(path)
    assert len(passages) == 1 and passages[0].title == "T 1"
    assert [q.answers for q in questions] == [("Alpha",)] and skipped == 1
    assert questions[0].passage_id == passages[0].id
    assert read_passages(path)[0].id == passages[0].id  # stable ids
