"""The runtime's contract beyond single answers: threads, prefix reuse, stop reasons, bad input."""

import json
import shutil
import threading
import time

import numpy as np
import pytest

from edgerag.runtime import BundleError, Pipeline, PromptError
from edgerag.runtime.manifest import MANIFEST, dump_manifest, file_record
from edgerag.runtime.generation import repetition_cut
from edgerag.runtime.pipeline import StrippedText

from conftest import streamed

QUESTIONS = ["Which team won Super Bowl 50?", "What is the capital of Poland?", "Where is Victoria?",
             "What is the atomic number of oxygen?", "Who were the Normans?", "What is geology?",
             "What is pharmacy?", "Which city is the largest in Florida?"]


def test_template_reuse_is_the_same_for_every_prompt_and_exact_in_fp32(tiny_bundle):
    reusing, fresh = Pipeline.load(tiny_bundle), Pipeline.load(tiny_bundle, reuse_prefix="none")
    prefix = len(reusing.tokenizer.encode(reusing.template.prefix, add_special_tokens=False).ids)
    for question in QUESTIONS[:4] + QUESTIONS[:1]:
        a, b = reusing.ask(question, max_new_tokens=8), fresh.ask(question, max_new_tokens=8)
        assert a.timings["reused_prompt_tokens"] == prefix  # never more: nothing depends on the previous question
        assert b.timings["reused_prompt_tokens"] == 0
        assert a.answer == b.answer


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_int8sq"])
def test_threads_sharing_a_pipeline_give_the_sequential_answers(bundle_fixture, request):
    pipeline = Pipeline.load(request.getfixturevalue(bundle_fixture))
    questions = QUESTIONS * 3
    sequential = [pipeline.ask(q, max_new_tokens=10).answer for q in questions]
    results, errors = [None] * len(questions), []

    def worker(offset):
        try:
            for i in range(offset, len(questions), 4):
                results[i] = pipeline.ask(questions[i], max_new_tokens=10).answer
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == sequential


def test_repetition_cut():
    assert repetition_cut([5, 1, 2] + [9] * 16, 16) == 4          # "5 1 2 9", the run of 9s cut
    assert repetition_cut([5, 1] + [7, 8] * 10, 16) == 4          # the first "7 8" kept
    assert repetition_cut([1, 2, 3] * 6, 16) == 3
    assert repetition_cut(list(range(40)), 16) is None
    assert repetition_cut([4] * 15, 16) is None                   # shorter than the window
    assert repetition_cut([4] * 40, 0) is None                    # 0 turns it off


def _bundle_with_head(tiny_models, tmp_path_factory, name: str, head, max_new_tokens: int):
    """The tiny generator with layers that add nothing (each token's hidden state is its embedding)
    and an untied LM head of weights `head(embeddings, tokenizer)`, exported without quantization."""
    import torch

    from edgerag.export import ExportOptions
    from edgerag.export.bundle import export_bundle
    from edgerag.models import load_generator

    encoder, generator, _, squad = tiny_models
    model, tokenizer = load_generator(str(generator))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        weights = head(model.model.embed_tokens.weight, tokenizer)
        model.config.tie_word_embeddings = False
        model.lm_head = torch.nn.Linear(weights.shape[1], weights.shape[0], bias=False)
        model.lm_head.weight.copy_(weights)
    folder = tmp_path_factory.mktemp(name) / "generator"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return export_bundle(str(encoder), str(folder), squad, tmp_path_factory.mktemp("bundles") / name, options=ExportOptions(
        quantize="none", quantize_encoder="none", max_new_tokens=max_new_tokens, max_context=256, parity_questions=2, k=1))


@pytest.fixture(scope="module")
def looping_bundle(tiny_models, tmp_path_factory):
    """A tiny model made to loop: its LM head sends every token to its pair (t -> t^1), so greedy
    decoding alternates two tokens until the limit."""
    def pairs(embeddings, tokenizer):
        special = set(tokenizer.all_special_ids)
        pair = [t if t in special or (t ^ 1) in special or (t ^ 1) >= len(embeddings) else t ^ 1
                for t in range(len(embeddings))]
        return embeddings.detach().clone()[pair]
    return _bundle_with_head(tiny_models, tmp_path_factory, "looping", pairs, max_new_tokens=48)


def test_a_looping_answer_is_cut_and_says_so(looping_bundle):
    pipeline = Pipeline.load(looping_bundle, answers="free")  # the generator's own loop, not a span of the context
    answer = pipeline.ask("Which team won Super Bowl 50?")
    assert answer.stop_reason == "repetition"
    assert answer.new_tokens <= 2   # one block of the two alternating tokens is kept
    record = answer.to_record()
    assert record["stop_reason"] == "repetition" and json.loads(json.dumps(record)) == record


def test_a_cut_loop_is_neverstreamed(looping_bundle):
    pieces, answer = streamed(Pipeline.load(looping_bundle, answers="free").stream("Which team won Super Bowl 50?"))
    assert answer.stop_reason == "repetition" and "".join(pieces).strip() == answer.answer


def test_repetition_window_comes_from_the_manifest(looping_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(looping_bundle, copy)
    data = json.loads((copy / MANIFEST).read_text())
    data["generation"]["repetition_window"] = 0
    (copy / MANIFEST).write_bytes(dump_manifest(data))
    answer = Pipeline.load(copy, answers="free").ask("Which team won Super Bowl 50?")
    assert answer.stop_reason == "length" and answer.new_tokens == 48


@pytest.mark.parametrize("pieces, text", [
    (["Den", "ver", ".\n"], "Denver."),                 # a piece that ends in white space: its text now, its newline never
    (["\n", " ", " Den", "ver"], "Denver"),
    (["Den", " \n", "ver", " "], "Den \nver"),          # white space inside the answer is kept
    (["  ", "\t"], ""),
])
def test_streamed_chunks_join_to_the_stripped_text(pieces, text):
    streamed = StrippedText()
    chunks = [streamed.add(piece) for piece in pieces]
    assert "".join(chunks) == "".join(pieces).strip() == text
    assert all(chunk == chunk.rstrip() for chunk in chunks)   # nothing streamed that the end may strip


@pytest.fixture(scope="module")
def half_character_bundle(tiny_models, tmp_path_factory):
    """A tiny model that always says the byte 0xC3, the first of the two bytes of "é": every embedding
    carries a large first coordinate, and the LM head reads only that one, into the byte's token."""
    def lead_byte_only(embeddings, tokenizer):
        embeddings[:, 0] = 8.0
        weights = embeddings.new_zeros(embeddings.shape)
        weights[tokenizer.convert_tokens_to_ids("\u00c3"), 0] = 10.0  # byte 0xC3 in the byte-level alphabet
        return weights
    return _bundle_with_head(tiny_models, tmp_path_factory, "half-character", lead_byte_only, max_new_tokens=8)


def test_an_answer_cut_inside_a_character_keeps_no_half_of_it(half_character_bundle):
    pipeline = Pipeline.load(half_character_bundle, answers="free")
    pieces, answer = streamed(pipeline.stream(QUESTIONS[0], max_new_tokens=1))
    assert answer.new_tokens == 1 and answer.stop_reason == "length"
    half = pipeline.tokenizer.token_to_id("\u00c3")
    assert pipeline.tokenizer.decode([half]) == "\ufffd"   # what the answer's text was before
    assert answer.answer == "".join(pieces).strip() == ""


def test_stop_reasons(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle)
    assert pipeline.ask(QUESTIONS[0], max_new_tokens=1).stop_reason in ("length", "stop")
    late = pipeline.ask(QUESTIONS[0], max_new_tokens=12, deadline=time.monotonic() - 1)
    assert late.stop_reason == "deadline" and late.new_tokens == 1


@pytest.mark.parametrize("question", ["", "   \n\t", "\ud800 lone surrogate", None, 42, ["a list"]])
def test_unaskable_questions_are_clear_errors(tiny_bundle, question):
    pipeline = Pipeline.load(tiny_bundle)
    with pytest.raises(PromptError):
        pipeline.ask(question)
    with pytest.raises(PromptError, match="question 1 of the batch"):
        pipeline.ask_batch(["Where is Victoria?", question])


@pytest.mark.parametrize("settings", [{"k": 0}, {"k": -1}, {"k": "3"}, {"k": 2.5}, {"max_new_tokens": 0},
                                      {"max_new_tokens": -4}, {"max_new_tokens": True}])
def test_bad_settings_are_clear_errors(tiny_bundle, settings):
    pipeline = Pipeline.load(tiny_bundle)
    with pytest.raises(PromptError, match="positive integer"):
        pipeline.ask(QUESTIONS[0], **settings)
    with pytest.raises(PromptError, match="positive integer"):
        pipeline.ask_batch(QUESTIONS[:2], **settings)


def test_an_empty_batch_is_no_answers(tiny_bundle):
    assert Pipeline.load(tiny_bundle).ask_batch([]) == []


def test_cancel_stops_an_answer(tiny_bundle):
    cancel = threading.Event()
    cancel.set()
    answer = Pipeline.load(tiny_bundle).ask(QUESTIONS[0], max_new_tokens=12, cancel=cancel)
    assert answer.stop_reason == "cancelled" and answer.new_tokens == 1


def test_retrieval_only(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle, retrieval_only=True)
    assert pipeline.generator is None and pipeline.retrieve(QUESTIONS[0], k=2)
    with pytest.raises(ValueError, match="retrieval_only"):
        pipeline.ask(QUESTIONS[0])


def test_far_too_long_question_still_answers(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle)
    answer = pipeline.ask("Which team won Super Bowl 50? " * 5000, max_new_tokens=4)
    assert answer.prompt_tokens <= pipeline.manifest.generator.max_context - 4


def _resign(bundle, change_files):
    data = json.loads((bundle / MANIFEST).read_text())
    change_files(data)
    data["files"] = {name: vars(file_record(bundle / name)) for name in data["files"]}
    (bundle / MANIFEST).write_bytes(dump_manifest(data))


def test_index_whose_size_disagrees_with_the_manifest_is_refused(tiny_bundle, tmp_path):
    import hnswlib

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    dim = json.loads((copy / MANIFEST).read_text())["index"]["dim"]
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=3)
    index.add_items(np.eye(3, dim, dtype=np.float32))
    index.save_index(str(copy / "index.hnsw"))
    _resign(copy, lambda d: None)   # the checksums match: only the count gives it away
    with pytest.raises(BundleError, match="index.hnsw"):
        Pipeline.load(copy)


@pytest.mark.parametrize("section,key,value,message", [
    ("index", "ef", 0, "index.ef is 0"), ("query_encoder", "max_length", -1, "query_encoder.max_length"),
    ("passages", "file", "index.hnsw", "does not load"), ("query_encoder", "onnx", "query_tokenizer.json", "does not load")])
def test_manifest_values_that_cannot_work_are_refused(tiny_bundle, tmp_path, section, key, value, message):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    _resign(copy, lambda d: d[section].update({key: value}))
    with pytest.raises(BundleError, match=message):
        Pipeline.load(copy)


def test_passage_count_that_disagrees_with_the_manifest_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    _resign(copy, lambda d: d["passages"].update(count=d["passages"]["count"] + 1))
    with pytest.raises(BundleError, match="passages.sqlite"):
        Pipeline.load(copy)


def test_iterating_passages_and_public_prompt(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle)
    ids = [pid for pid, _, _ in pipeline.passages()]
    assert len(ids) == pipeline.manifest.passages.count == len(set(ids))
    found = pipeline.retrieve(QUESTIONS[0], k=2)
    rows = [ids.index(p["id"]) for p in found]
    assert [p["id"] for p in pipeline.passages_at(rows)] == [p["id"] for p in found]
    prompt = pipeline.prompt_ids(QUESTIONS[0], [(p["title"], p["text"]) for p in found])
    assert pipeline.ask(QUESTIONS[0], k=2).prompt_tokens == len(prompt)


def test_the_device_side_loads_no_pickle():
    """Nothing under runtime/ can unpickle: bundles are ONNX, JSON, hnswlib and sqlite files only."""
    from pathlib import Path

    import edgerag.runtime

    for path in Path(edgerag.runtime.__file__).parent.glob("*.py"):
        source = path.read_text()
        for needle in ("pickle", "np.load", "torch.load", "joblib", "marshal"):
            assert needle not in source, f"{path.name} mentions {needle}"
