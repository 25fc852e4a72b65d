"""The reliability suite's sections, each run small (`make reliability` runs them at full size)."""

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("starlette")

from edgerag.benchmarks.reliability import damage, fuzzing, kills, load_and_soak  # noqa: E402
from edgerag.runtime import Pipeline  # noqa: E402

QUESTIONS = ["Which team won Super Bowl 50?", "What is the capital of Poland?", "Where is Victoria?"]


def test_fuzzed_questions_get_answers_or_clear_errors(tiny_bundle):
    outcome = fuzzing.fuzz_python(Pipeline.load(tiny_bundle), examples=150)
    assert outcome["inputs"] == 150 and outcome["crash"] == 0, outcome["crashes"][:3]
    assert outcome["answered"] > 0 and outcome["clear_error"] > 0


def test_fuzzed_manifests_load_or_are_refused(tiny_bundle):
    outcome = fuzzing.fuzz_manifest(tiny_bundle, examples=80)
    assert outcome["crash"] == 0, outcome["crashes"][:3]
    assert outcome["refused"] > 0


def test_fuzzed_passage_files_read_or_are_refused():
    outcome = fuzzing.fuzz_passages(examples=150)
    assert outcome["crash"] == 0, outcome["crashes"][:3]
    assert outcome["refused"] > 0 and outcome["read"] > 0


def test_server_under_fuzz_load_and_soak(tiny_bundle, live_server, tmp_path):
    pipeline = Pipeline.load(tiny_bundle)
    reference = [pipeline.ask(q, max_new_tokens=6).answer for q in QUESTIONS]
    with live_server("--max-queue", "16") as (url, pid):
        fuzz = fuzzing.fuzz_http(url, examples=150)
        assert fuzz["inputs"] == 150 and fuzz["server_error"] == 0 and fuzz["unreadable"] == 0, fuzz
        assert fuzz["client_error"] > 0 and fuzz["ok"] > 0 and fuzz["health_after"] == 200
        rows = load_and_soak.load(url, QUESTIONS, [1, 4], 6, reference)
        assert [r["identical_to_sequential"] for r in rows] == [3, 12] and not any(r["errors"] for r in rows)
        soak = load_and_soak.soak(url, pid, QUESTIONS, 60, 6, tmp_path)
        assert soak["failed"] == 0 and len(soak["rss_samples"]) >= 30 and (tmp_path / "soak_rss.png").exists()


def test_every_damaged_file_is_refused_by_name(tiny_bundle):
    result = damage.damage(tiny_bundle)
    assert result["missed"] == [] and result["refused_naming_the_file"] == result["damaged_copies"] >= 14
    assert "version" in result["newer_version"]


def test_killed_exports_leave_no_half_bundle(tiny_models, tmp_path):
    encoder, generator, jsonl, _ = tiny_models
    result = kills.kill_export(str(encoder), str(generator), str(jsonl), kills=3, workdir=tmp_path,
                                     extra=("--quantize", "none", "--quantize-encoder", "none", "--parity-questions", "1"))
    assert result["half_bundles_at_out"] == 0 and result["rerun_ok"]
    assert result["work_folders_left_after_rerun"] == []


def test_killed_distill_resumes_in_every_training_stage(tmp_path):
    from conftest import DATA_DIR
    from edgerag.train.tiny import make_tiny_project

    project = make_tiny_project(tmp_path / "project", DATA_DIR)
    result = kills.kill_distill(str(project["recipe"]), tmp_path, timeout=900)
    assert result["resume_ok"], result["error"]
    assert result["killed_in"] == kills.training_stages(str(project["recipe"]))
    assert len(result["killed_in"]) == 4
    assert {"eval", "distill_generator", "teacher_finetune"} <= set(result["stages_done"])


def test_a_bundle_left_aside_by_a_killed_overwrite_goes_back(tiny_bundle, tmp_path):
    """Killed between moving the old bundle aside and moving the new one in: the next export puts it back."""
    import shutil

    from edgerag.export.bundle import _remove_abandoned_work

    out = tmp_path / "bundle"
    dead = 2 ** 22 + 12345   # above any pid this machine hands out
    shutil.copytree(tiny_bundle, tmp_path / f".bundle.old-{dead}")
    (tmp_path / f".bundle.tmp-{dead}-x").mkdir()
    _remove_abandoned_work(out)
    assert kills.looks_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
