"""`edgerag eval` on an exported bundle (device runtime, no torch in that path) agrees with the same
models evaluated as a torch folder: same prompt, same retrieval, same greedy answers (fp32 bundle)."""

import json

import pytest

from edgerag.evaluation import evaluate_model
from edgerag.models import INFO_FILE


def test_bundle_and_folder_evaluation_agree(tiny_models, tiny_bundle, tmp_path):
    encoder, generator, jsonl, squad = tiny_models
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "query_encoder").symlink_to(encoder)
    (folder / "generator").symlink_to(generator)
    max_new = manifest["generation"]["max_new_tokens"]
    (folder / INFO_FILE).write_text(json.dumps({"max_prompt_tokens": manifest["generator"]["max_context"] - max_new,
                                                "max_answer_tokens": max_new}))
    # the folder's answers are the generator's own tokens: the bundle's too, to compare them
    bundle_result = evaluate_model(tiny_bundle, squad, n=None, k=2, answers_out=tmp_path / "bundle.jsonl",
                                   answers="free")
    folder_result = evaluate_model(folder, squad, n=None, k=2, batch_size=1, answers_out=tmp_path / "folder.jsonl")
    assert bundle_result["n_questions"] == folder_result["n_questions"] == 4
    for key in ("em", "f1", "em_gold", "f1_gold", "recall@1", "recall@5", "recall@20", "prompt_tokens", "answer_in_context"):
        assert bundle_result[key] == pytest.approx(folder_result[key]), key
    assert 0 < bundle_result["prompt_tokens"] <= manifest["generator"]["max_context"]
    assert bundle_result["seconds_per_question"] > 0
    bundle_rows = [json.loads(l) for l in (tmp_path / "bundle.jsonl").read_text().splitlines()]
    folder_rows = [json.loads(l) for l in (tmp_path / "folder.jsonl").read_text().splitlines()]
    for b, f in zip(bundle_rows, folder_rows):
        assert b["retrieved"][:2] == f["retrieved"][:2], b["question"]
        assert b["answer_gold"] == f["answer_gold"], b["question"]
        assert b["answer"] == f["answer"], b["question"]
