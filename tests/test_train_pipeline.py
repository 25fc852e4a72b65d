"""The whole `distill` pipeline on tiny random models: eval.json, resume, DDP, the CLI."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from train import loop  # noqa: E402
from train.pipeline import RunError, add_cli, distill  # noqa: E402
from train.tiny import make_tiny_project  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"em", "f1", "em_gold", "f1_gold", "recall@1", "recall@5", "recall@20",
               "generator_params", "encoder_params", "seconds_per_question"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    report = distill(tiny["recipe"], out)
    return out, report


def state(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_eval_json_schema(full_run):
    out, report = full_run
    saved = json.loads((out / "eval.json").read_text())
    assert saved == report
    assert set(saved) == {"dataset", "n_questions", "k", "teacher", "student"}
    assert saved["n_questions"] == 12 and saved["k"] == 2
    for side in ("teacher", "student"):
        assert set(saved[side]) == METRIC_KEYS
        for m in ("em", "f1", "em_gold", "f1_gold", "recall@1", "recall@5", "recall@20"):
            assert 0.0 <= saved[side][m] <= 100.0
        assert saved[side]["recall@1"] <= saved[side]["recall@5"] <= saved[side]["recall@20"]
    assert saved["student"]["generator_params"] < saved["teacher"]["generator_params"]
    assert saved["student"]["encoder_params"] < saved["teacher"]["encoder_params"]


def test_run_folder_layout(full_run):
    out, _ = full_run
    for side in ("teacher", "student"):
        assert (out / side / "generator" / "config.json").exists()
        assert (out / side / "generator" / "tokenizer.json").exists()
        enc = out / side / "query_encoder"
        assert (enc / "config.json").exists() and (enc / "1_Pooling" / "config.json").exists()
        assert (enc / "modules.json").exists()
    cfg = json.loads((out / "student" / "generator" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["intermediate_size"] == 64 and cfg["num_key_value_heads"] == 1
    for stage in ("data", "teacher", "index", "teacher_finetune", "student_init", "distill_encoder",
                  "distill_general", "teacher_logits", "distill_generator", "eval"):
        assert (out / "stages" / stage / "done").exists(), stage
    # every training stage logged its losses, and they went down
    for stage in ("teacher_finetune", "distill_encoder", "distill_generator"):
        log = [json.loads(l) for l in (out / "stages" / stage / "log.jsonl").read_text().splitlines()]
        assert log[-1]["loss"] < log[0]["loss"], stage


def test_general_distillation_brings_the_student_closer_on_corpus_text(full_run):
    """The plain-text pass lowers KL(teacher || student) on the corpus chunks it trained on."""
    from train.distill import kl_teacher_student
    from train.pipeline import Run, general_examples
    from train.recipe import load_recipe
    from train.sources import load_generator

    out, _ = full_run
    run = Run(out, load_recipe(out / "recipe.toml"))
    teacher, tok = load_generator(out / "teacher" / "generator")
    before, _ = load_generator(out / "stages" / "student_init" / "generator")
    after, _ = load_generator(out / "stages" / "distill_general" / "generator")
    examples = general_examples(run, tok, 12, 48)
    assert len(examples) == 12
    kl_before = kl_teacher_student(teacher, before, examples, tok.pad_token_id)
    kl_after = kl_teacher_student(teacher, after, examples, tok.pad_token_id)
    assert kl_after < kl_before


def test_existing_run_needs_resume(full_run, tiny):
    out, _ = full_run
    with pytest.raises(RunError, match="--resume"):
        distill(tiny["recipe"], out)
    # resuming a finished run redoes nothing and gives the same report
    assert distill(tiny["recipe"], out, resume=True) == json.loads((out / "eval.json").read_text())


def test_resume_refuses_changed_settings_but_not_changed_comments(full_run, tiny, tmp_path):
    out, report = full_run
    text = Path(tiny["recipe"]).read_text()
    commented = tmp_path / "commented.toml"
    commented.write_text("# a comment added after the run started\n" + text)
    assert distill(commented, out, resume=True) == report
    changed = tmp_path / "changed.toml"
    changed.write_text(text.replace("seed = 0", "seed = 1", 1))
    assert changed.read_text() != text
    with pytest.raises(RunError, match="other values"):
        distill(changed, out, resume=True)


def test_resume_after_interruption_matches(full_run, tiny, tmp_path, capsys):
    out_full, report_full = full_run
    out = tmp_path / "run"
    loop.INTERRUPT_AFTER_STEP = 2   # raises after the step-2 checkpoint of the first training stage
    try:
        with pytest.raises(loop.Interrupted):
            distill(tiny["recipe"], out)
    finally:
        loop.INTERRUPT_AFTER_STEP = None
    assert (out / "stages" / "teacher_finetune" / "checkpoint.pt").exists()
    assert not (out / "stages" / "teacher_finetune" / "done").exists()
    report = distill(tiny["recipe"], out, resume=True)
    assert "resumed from step 2" in capsys.readouterr().out
    for side in ("teacher", "student"):
        for key in ("em", "f1", "em_gold", "f1_gold", "recall@1", "recall@5", "recall@20", "generator_params"):
            assert report[side][key] == report_full[side][key], (side, key)
    assert not list((out / "stages").glob("*/checkpoint.pt"))  # finished stages drop their optimizer state
    for part in ("teacher/generator", "student/generator", "student/query_encoder"):
        a, b = state(out_full / part), state(out / part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), (part, k)


def test_eval_reuses_the_same_teachers_evaluation_and_only_that(full_run, tiny, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    saved = out / "stages" / "eval" / "teacher_result.json"
    record = json.loads(saved.read_text())
    assert record["result"] == full_run[1]["teacher"]

    def eval_again():
        (out / "stages" / "eval" / "done").unlink()
        return distill(tiny["recipe"], out, resume=True)

    # same teacher, questions and corpus: the saved evaluation is taken as it is (a marked copy shows it)
    saved.write_text(json.dumps({"key": record["key"], "result": {**record["result"], "f1": -1.0}}))
    assert eval_again()["teacher"]["f1"] == -1.0
    assert "reusing its evaluation" in capsys.readouterr().out
    # a teacher file changed: the key no longer matches and the teacher is evaluated again
    with open(out / "teacher" / "generator" / "config.json", "a") as f:
        f.write("\n")
    assert eval_again()["teacher"]["f1"] == full_run[1]["teacher"]["f1"]
    assert json.loads(saved.read_text())["key"] != record["key"]


def test_cli_eval_on_a_model_folder(full_run, tiny, tmp_path):
    out, _ = full_run
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    target = tmp_path / "eval.json"
    args = parser.parse_args(["eval", str(out / "student"), "--questions", str(tiny["eval"]), "--n", "4", "--k", "2",
                              "--out", str(target)])
    assert args.func(args) == 0
    result = json.loads(target.read_text())
    assert result["n_questions"] == 4 and result["k"] == 2
    assert METRIC_KEYS <= set(result)


def test_cli_distill_reports_recipe_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[student]\nlayerz = 3\n")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill", str(bad), "--out", str(tmp_path / "run")])
    assert args.func(args) == 2
    assert "student.layerz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_ddp_two_processes_on_gloo(tiny, tmp_path):
    """torchrun with 2 CPU processes: DDP training stages, rank 0 writes, and the run finishes."""
    recipe = tmp_path / "ddp.toml"
    text = tiny["recipe"].read_text().replace("[teacher_finetune]\n", "[teacher_finetune]\nenabled = false\n")
    text = text.replace("seq_kd = true", "seq_kd = false")
    recipe.write_text(text)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "train.pipeline", "distill",
                           str(recipe), "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert set(report["student"]) == METRIC_KEYS
    log = [json.loads(l) for l in (out / "stages" / "distill_generator" / "log.jsonl").read_text().splitlines()]
    # 16 examples, batch 4 split over 2 ranks: 4 optimizer steps in all
    assert len(log) == 4
    assert not list(out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def trimmed_run(tiny, tmp_path_factory):
    """A student with a trimmed vocabulary whose queries fit the teacher's passage vectors."""
    folder = tmp_path_factory.mktemp("trimmed")
    recipe = folder / "recipe.toml"
    text = tiny["recipe"].read_text().replace("[teacher_finetune]\n", "[teacher_finetune]\nenabled = false\n")
    text = text.replace("encoder_layers = 1\n", 'encoder_layers = 1\nvocabulary = "corpus"\npassage_encoder = "teacher"\n')
    recipe.write_text(text)
    out = folder / "run"
    return out, distill(recipe, out)


def test_trimmed_student_end_to_end(trimmed_run, tiny, tmp_path):
    from transformers import AutoTokenizer

    from train.evaluate import evaluate_model

    out, report = trimmed_run
    teacher_tok = AutoTokenizer.from_pretrained(out / "teacher" / "generator")
    student_tok = AutoTokenizer.from_pretrained(out / "student" / "generator")
    info = json.loads((out / "stages" / "student_init" / "info.json").read_text())["generator"]
    assert len(student_tok) == info["vocabulary"]["vocab_size"] < len(teacher_tok)
    assert json.loads((out / "student" / "generator" / "config.json").read_text())["vocab_size"] == len(student_tok)
    log = [json.loads(l) for l in (out / "stages" / "distill_generator" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["kl"] < log[0]["kl"]
    # the student ranks passages against the teacher's vectors, and its folder carries that encoder
    assert json.loads((out / "student" / "edgerag.json").read_text())["passage_encoder"] == "passage_encoder"
    assert (out / "student" / "passage_encoder" / "model.safetensors").exists()

    bundle = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "edgerag.cli", "export", str(out / "student"), "--passages",
                           str(tiny["eval"]), "--out", str(bundle), "--quantize", "none",
                           "--quantize-encoder", "none"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["sources"]["passage_encoder"].endswith("passage_encoder")
    # the device answers with the trimmed vocabulary exactly as the torch student does
    folder_result = evaluate_model(out / "student", tiny["eval"], n=None, k=2, batch_size=1,
                                   answers_out=tmp_path / "folder.jsonl")
    bundle_result = evaluate_model(bundle, tiny["eval"], n=None, k=2, answers_out=tmp_path / "bundle.jsonl")
    for key in ("f1", "f1_gold", "recall@1", "recall@5"):
        assert bundle_result[key] == pytest.approx(folder_result[key]), key
    rows = [(json.loads(a)["answer"], json.loads(b)["answer"]) for a, b in
            zip((tmp_path / "folder.jsonl").read_text().splitlines(), (tmp_path / "bundle.jsonl").read_text().splitlines())]
    assert all(a == b for a, b in rows)
    # a random tiny student may stop at once, so also compare the logits the export measured
    parity = manifest["parity"]["generator"]["fp32"]
    assert parity["max_abs_logit_delta"] < 1e-3 and parity["greedy_exact_match"] == 1.0


def test_progressive_compression_prunes_an_earlier_student(trimmed_run, tiny, tmp_path):
    """student.generator = an earlier run's (trimmed, healed) student, pruned further and healed again."""
    first, _ = trimmed_run
    recipe = tmp_path / "recipe.toml"
    text = (first / "recipe.toml").read_text()
    text = text.replace("[student]\n", f'[student]\ngenerator = "{(first / "student" / "generator").as_posix()}"\n')
    text = text.replace("intermediate_size = 64", "intermediate_size = 32").replace('vocabulary = "corpus"\n', "")
    text = text.replace("layers = [0, 3]", 'layers = "all"').replace("kv_heads = 1\n", "")
    recipe.write_text(text)
    out = tmp_path / "run"
    report = distill(recipe, out)
    info = json.loads((out / "stages" / "student_init" / "info.json").read_text())["generator"]
    earlier = json.loads((first / "stages" / "student_init" / "info.json").read_text())["generator"]
    assert info["intermediate_size"] == 32 and info["params"] < earlier["params"]
    assert info["teacher_params"] == earlier["teacher_params"] == report["teacher"]["generator_params"]
    assert report["student"]["generator_params"] == info["params"]
    saved = json.loads((out / "student" / "generator" / "config.json").read_text())
    assert saved["vocab_size"] == json.loads((first / "student" / "generator" / "config.json").read_text())["vocab_size"]


def test_curve_table_of_students(full_run, trimmed_run, tmp_path):
    from benchmarks.curve import main as curve

    assert curve([str(full_run[0]), str(trimmed_run[0]), "--out", str(tmp_path), "--rounds", "1"]) == 0
    rows = json.loads((tmp_path / "curve.json").read_text())
    assert [r["name"].split("/")[1] for r in rows] == ["teacher", "student", "student"]
    assert rows[0]["params_pct"] == 100
    for row, run in zip(rows[1:], (full_run[0], trimmed_run[0])):
        report = json.loads((run / "eval.json").read_text())
        assert row["f1_gold"] == report["student"]["f1_gold"]
        assert row["params_pct"] == pytest.approx(100 * report["student"]["generator_params"] / rows[0]["generator_params"])
    assert (tmp_path / "curve.png").stat().st_size > 0 and "| model |" in (tmp_path / "curve.md").read_text()
