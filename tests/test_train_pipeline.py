"""The whole `distill` pipeline on tiny random models: eval.json, resume, seeding, DDP, the CLI."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edgerag.train import decoder_only_stages, driver, loop  # noqa: E402
from edgerag.train import run as run_module  # noqa: E402
from edgerag.train.decoder_only_stages import STAGES  # noqa: E402
from edgerag.train.driver import distill, plan  # noqa: E402
from edgerag.train.run import RunError, Stage  # noqa: E402
from edgerag.train.tiny import make_tiny_project  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE_NAMES = ["data", "teacher", "index", "teacher_finetune", "eval_teacher", "student_init", "distill_encoder",
               "student_folder", "general_cache", "distill_general", "teacher_logits", "distill_generator", "eval"]
METRIC_KEYS = {"em", "f1", "em_gold", "f1_gold", "recall@1", "recall@5", "recall@20", "prompt_tokens",
               "answer_in_context", "generator_params", "encoder_params", "seconds_per_question"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    report = distill(tiny["recipe"], out)
    return out, report


def variant(tiny, folder, edit) -> Path:
    """The tiny recipe with `edit(text)` applied, written into `folder`."""
    text = tiny["recipe"].read_text()
    changed = edit(text)
    assert changed != text
    recipe = Path(folder) / "recipe.toml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(changed)
    return recipe


def stage_events(output: str) -> tuple[set, set]:
    """(seeded, run) stage names, from distill's output."""
    return (set(re.findall(r"^\[(\w+)\] seeded from ", output, re.M)),
            set(re.findall(r"^\[(\w+)\] finished in ", output, re.M)))


def same_file(a, b) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino


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
    assert sorted(p.name for p in (out / "stages").iterdir()) == sorted(STAGE_NAMES)
    for stage in STAGE_NAMES:
        assert (out / "stages" / stage / "done").exists(), stage
        assert len(json.loads((out / "stages" / stage / "info.json").read_text())["fingerprint"]) == 64, stage
    # every training stage logged its losses; the two that train long enough here went down (the tiny
    # task distillation's 4 steps barely move it: test_train_losses shows that loss falling)
    for stage in ("teacher_finetune", "distill_encoder", "distill_generator"):
        log = [json.loads(l) for l in (out / "stages" / stage / "log.jsonl").read_text().splitlines()]
        assert log and all(e["loss"] == e["loss"] for e in log), stage
        if stage != "distill_generator":
            assert log[-1]["loss"] < log[0]["loss"], stage


def test_training_stages_report_precision_and_throughput(full_run):
    out, _ = full_run
    here = loop.resolve_precision("auto")  # the tiny recipe leaves run.precision at "auto"
    for stage in ("teacher_finetune", "distill_encoder", "distill_general", "distill_generator"):
        info = json.loads((out / "stages" / stage / "info.json").read_text())
        training = info["training"]
        assert info["precision"] == training["precision"] == here, stage
        assert training["batching"] == "length" and training["examples_per_hour"] > 0, stage
        assert 0 <= training["padding_share"] <= training["padding_share_random_batches"], stage
        assert training["tokens"] <= training["tokens_computed"], stage
    for stage in ("general_cache", "teacher_logits"):
        assert json.loads((out / "stages" / stage / "info.json").read_text())["precision"] == here, stage


def test_general_distillation_brings_the_student_closer_on_corpus_text(full_run):
    """The plain-text pass lowers KL(teacher || student) on the corpus chunks it trained on."""
    from edgerag.train.distill import kl_teacher_student
    from edgerag.train.decoder_only_stages import general_examples
    from edgerag.train.run import Run
    from edgerag.train.recipe import load_recipe
    from edgerag.models import load_generator

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


def test_stages_are_declared_once(full_run, tiny):
    """STAGES is the only stage table: the driver runs what it lists, in its order."""
    from edgerag.train.recipe import load_recipe

    assert [s.name for s in STAGES] == STAGE_NAMES
    assert len({s.function for s in STAGES}) == len(STAGES)
    assert all(s.function.__name__ == f"stage_{s.name}" for s in STAGES)
    assert {s.name for s in STAGES if s.parallel} == {"teacher_finetune", "distill_encoder", "distill_general",
                                                      "distill_generator"}
    for old in ("STAGE_FUNCTIONS", "PARALLEL", "add_cli", "teacher_eval_key"):
        for module in (decoder_only_stages, driver, run_module):
            assert not hasattr(module, old), (module.__name__, old)
    recipe = load_recipe(tiny["recipe"])
    assert plan(recipe) == STAGES
    assert [s.name for s in plan(recipe, stop_after="student_folder")] == STAGE_NAMES[:STAGE_NAMES.index("student_folder") + 1]
    recipe.teacher_finetune.enabled = False
    recipe.distill_general.passages = 0
    assert [s.name for s in plan(recipe)] == [n for n in STAGE_NAMES if n not in
                                              ("teacher_finetune", "general_cache", "distill_general")]
    # the full run finished its stages in STAGES order
    out, _ = full_run
    assert sorted(STAGE_NAMES, key=lambda n: (out / "stages" / n / "done").stat().st_mtime_ns) == STAGE_NAMES


def test_a_stage_added_to_the_table_runs(full_run, tiny, tmp_path, monkeypatch, capsys):
    """One declaration is all a new stage needs: the driver runs it, fingerprints it, marks it done."""
    count = Stage("count", lambda run: {"passages": len(run.corpus())}, inputs=lambda run: [run.corpus_file],
                  outputs=lambda run: [], settings=lambda recipe: {})
    monkeypatch.setattr(decoder_only_stages, "STAGES", STAGES[:1] + [count])
    out = tmp_path / "run"
    assert distill(tiny["recipe"], out, seed_from=full_run[0]) is None
    assert stage_events(capsys.readouterr().out) == ({"data"}, {"count"})
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["count", "data"]
    info = json.loads((out / "stages" / "count" / "info.json").read_text())
    assert info["passages"] == len((out / "data" / "corpus.jsonl").read_text().splitlines())
    assert len(info["fingerprint"]) == 64


@pytest.fixture(scope="module")
def student_variant(full_run, tiny, tmp_path_factory):
    """A second run seeded from the first, whose recipe differs only in the student's MLP width."""
    folder = tmp_path_factory.mktemp("variant")
    recipe = variant(tiny, folder, lambda t: t.replace("intermediate_size = 64", "intermediate_size = 32"))
    out = folder / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):   # capsys is per test; this fixture is per module
        report = distill(recipe, out, seed_from=full_run[0])
    return out, report, buffer.getvalue()


def test_seed_from_reuses_the_teacher_side(full_run, student_variant):
    first, first_report = full_run
    out, report, output = student_variant
    seeded, ran = stage_events(output)
    assert seeded == {"data", "teacher", "index", "teacher_finetune", "distill_encoder", "general_cache",
                      "teacher_logits", "eval_teacher"}
    assert ran == {"student_init", "student_folder", "distill_general", "distill_generator", "eval"}
    # seeded files are the first run's, hard-linked
    for part in ("data/corpus.jsonl", "teacher/generator/model.safetensors", "teacher/query_encoder/model.safetensors",
                 "index/embeddings.npy", "student/query_encoder/model.safetensors",
                 "stages/teacher/generator/model.safetensors", "stages/general_cache/cache.pt",
                 "stages/teacher_logits/cache.pt", "stages/eval_teacher/result.json", "stages/distill_encoder/log.jsonl"):
        assert same_file(first / part, out / part), part
    for part in ("stages/student_init/generator/model.safetensors", "student/generator/model.safetensors"):
        assert not same_file(first / part, out / part), part
    assert not list((out / "stages").glob("*/checkpoint.pt"))
    assert json.loads((out / "student" / "generator" / "config.json").read_text())["intermediate_size"] == 32
    # the teacher's figures are the first run's; the student's are its own
    assert report == json.loads((out / "eval.json").read_text())
    assert set(report) == set(first_report)
    assert report["teacher"] == first_report["teacher"]
    assert report["student"]["generator_params"] < first_report["student"]["generator_params"]


def test_seed_from_runs_what_a_teacher_setting_changes(full_run, tiny, tmp_path, capsys):
    """teacher_finetune.lr changed: the fine-tuning and everything that reads the fine-tuned teacher run
    again; the encoder distillation, which never reads the generator, is still reused."""
    first, first_report = full_run

    def edit(text):
        head, tail = text.split("[student]", 1)
        return head.replace("lr = 1e-3", "lr = 2e-3") + "[student]" + tail

    recipe = variant(tiny, tmp_path, edit)
    out = tmp_path / "run"
    report = distill(recipe, out, seed_from=first)
    seeded, ran = stage_events(capsys.readouterr().out)
    assert seeded == {"data", "teacher", "index", "distill_encoder"}
    assert ran == {"teacher_finetune", "student_init", "student_folder", "general_cache", "distill_general",
                   "teacher_logits", "distill_generator", "eval_teacher", "eval"}
    assert not same_file(first / "teacher/generator/model.safetensors", out / "teacher/generator/model.safetensors")
    assert state(first / "teacher/generator").keys() == state(out / "teacher/generator").keys()
    assert json.loads((out / "stages/eval_teacher/result.json").read_text()) == report["teacher"]
    assert report["teacher"]["generator_params"] == first_report["teacher"]["generator_params"]


def test_student_folder_is_finished_before_the_evaluation(full_run, tiny, tmp_path, capsys):
    """A run stopped before its evaluation already has the student's edgerag.json, naming the teacher's
    encoder for passages where the recipe says so."""
    from edgerag.models import passage_encoder_folder

    recipe = variant(tiny, tmp_path, lambda t: t.replace("[student]\n", '[student]\npassage_encoder = "teacher"\n'))
    out = tmp_path / "run"
    assert distill(recipe, out, stop_after="student_folder", seed_from=full_run[0]) is None
    seeded, ran = stage_events(capsys.readouterr().out)
    assert ran == {"student_folder"}   # student_init does not depend on the passage encoder: seeded with the rest
    assert seeded == set(STAGE_NAMES[:STAGE_NAMES.index("student_folder")])
    info = json.loads((out / "student" / "edgerag.json").read_text())
    assert info["passage_encoder"] == "passage_encoder"
    assert info["student"]["generator"]["intermediate_size"] == 64
    assert passage_encoder_folder(out / "student") == out / "student" / "passage_encoder"
    assert (out / "student" / "passage_encoder" / "model.safetensors").exists()
    assert not (out / "student" / "generator").exists() and not (out / "eval.json").exists()
    assert sorted(p.name for p in (out / "stages").iterdir()) == sorted(STAGE_NAMES[:STAGE_NAMES.index("student_folder") + 1])
    with pytest.raises(RunError, match="unknown stage"):
        distill(recipe, tmp_path / "other", stop_after="evaluate")


def test_seed_from_needs_a_run(tiny, tmp_path):
    with pytest.raises(RunError, match="no run there"):
        distill(tiny["recipe"], tmp_path / "run", seed_from=tmp_path / "nothing")


def test_cli_eval_on_a_model_folder(full_run, tiny, tmp_path):
    from edgerag.cli import main

    out, _ = full_run
    target = tmp_path / "eval.json"
    assert main(["eval", str(out / "student"), "--questions", str(tiny["eval"]), "--n", "4", "--k", "2",
                 "--out", str(target)]) == 0
    result = json.loads(target.read_text())
    assert result["n_questions"] == 4 and result["k"] == 2
    assert METRIC_KEYS <= set(result)


def test_cli_distill_reports_recipe_errors(tmp_path, capsys):
    from edgerag.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[student]\nlayerz = 3\n")
    assert main(["distill", str(bad), "--out", str(tmp_path / "run")]) != 0
    assert "student.layerz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_distill_seed_from(full_run, tiny, tmp_path, capsys):
    """`edgerag distill RECIPE --out RUN --seed-from OTHER_RUN`: the same recipe reuses every stage."""
    from edgerag.cli import main

    first, report = full_run
    out = tmp_path / "run"
    assert main(["distill", str(tiny["recipe"]), "--out", str(out), "--seed-from", str(first)]) == 0
    assert stage_events(capsys.readouterr().out) == (set(STAGE_NAMES), set())
    assert json.loads((out / "eval.json").read_text()) == report
    assert same_file(first / "student/generator/model.safetensors", out / "student/generator/model.safetensors")


def test_ddp_two_processes_on_gloo(full_run, tiny, tmp_path):
    """torchrun with 2 CPU processes: rank 0 seeds the teacher side from another run while the other
    waits, the DDP training stages run on both ranks, rank 0 writes, and the run finishes."""
    recipe = variant(tiny, tmp_path, lambda t: t.replace("seq_kd = true", "seq_kd = false")
                     .replace("intermediate_size = 64", "intermediate_size = 32").replace("encoder_layers = 1", "encoder_layers = 2"))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "edgerag.cli", "distill",
                           str(recipe), "--out", str(out), "--seed-from", str(full_run[0])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeded, ran = stage_events(proc.stdout)
    assert seeded == {"data", "teacher", "index", "teacher_finetune", "general_cache", "eval_teacher"}
    assert ran == {"student_init", "distill_encoder", "student_folder", "distill_general", "teacher_logits",
                   "distill_generator", "eval"}
    report = json.loads((out / "eval.json").read_text())
    assert set(report["student"]) == METRIC_KEYS
    assert report["teacher"] == full_run[1]["teacher"]
    log = [json.loads(l) for l in (out / "stages" / "distill_generator" / "log.jsonl").read_text().splitlines()]
    # 16 examples, batch 4 split over 2 ranks: 4 optimizer steps in all
    assert len(log) == 4
    assert not list(out.rglob("*.tmp"))


def test_a_student_that_keeps_the_teachers_query_encoder(full_run, tiny, tmp_path, capsys):
    """student.query_encoder = "teacher": no encoder distillation, and the bundle carries one encoder, the
    teacher's, for questions and passages alike."""
    import numpy as np
    from safetensors.numpy import load_file

    from edgerag.runtime.manifest import read_manifest

    recipe = variant(tiny, tmp_path, lambda t: t.replace("encoder_layers = 1\n", 'query_encoder = "teacher"\n'))
    out = tmp_path / "run"
    report = distill(recipe, out, seed_from=full_run[0])
    _, ran = stage_events(capsys.readouterr().out)
    assert "distill_encoder" in ran and "student_init" in ran
    assert json.loads((out / "stages" / "distill_encoder" / "info.json").read_text())["kept"] == "teacher"
    assert not list((out / "stages" / "distill_encoder").glob("log*"))  # nothing trained
    teacher = load_file(out / "teacher" / "query_encoder" / "model.safetensors")
    student = load_file(out / "student" / "query_encoder" / "model.safetensors")
    assert teacher.keys() == student.keys() and all(np.array_equal(teacher[k], student[k]) for k in teacher)
    assert json.loads((out / "student" / "edgerag.json").read_text())["passage_encoder"] == "query_encoder"
    assert not (out / "student" / "passage_encoder").exists()
    # ranked by the teacher's own index, as the teacher is
    for key in ("recall@1", "recall@5", "recall@20"):
        assert report["student"][key] == report["teacher"][key], key

    bundle = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "edgerag.cli", "export", str(out / "student"), "--passages",
                           str(tiny["eval"]), "--out", str(bundle), "--quantize", "none",
                           "--quantize-encoder", "none"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(bundle).passage_encoder is None


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

    from edgerag.evaluation import evaluate_model

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
    bundle_result = evaluate_model(bundle, tiny["eval"], n=None, k=2, answers_out=tmp_path / "bundle.jsonl",
                                   answers="free")  # the torch student's own tokens, not spans
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
    from edgerag.benchmarks.curve import main as curve

    assert curve([str(full_run[0]), str(trimmed_run[0]), "--out", str(tmp_path), "--rounds", "1"]) == 0
    rows = json.loads((tmp_path / "curve.json").read_text())
    assert [r["name"].split("/")[1] for r in rows] == ["teacher", "student", "student"]
    assert rows[0]["params_pct"] == 100
    for row, run in zip(rows[1:], (full_run[0], trimmed_run[0])):
        report = json.loads((run / "eval.json").read_text())
        assert row["f1_gold"] == report["student"]["f1_gold"]
        assert row["params_pct"] == pytest.approx(100 * report["student"]["generator_params"] / rows[0]["generator_params"])
    assert (tmp_path / "curve.png").stat().st_size > 0 and "| model |" in (tmp_path / "curve.md").read_text()


def test_training_benchmark_reads_every_training_stage(full_run, tmp_path, capsys):
    from edgerag.benchmarks import training

    out, _ = full_run
    assert training.main([str(out), "--threads", "1", "--out", str(tmp_path / "training.json")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "training.json").read_text())
    assert [r["stage"] for r in report["stages"]] == list(training.TRAINING_STAGES)
    for row in report["stages"]:
        assert row["examples_per_hour"] > 0 and row["model_gflops"] > 0, row
        assert f"| {out.name} | {row['stage']} | {row['precision']} | length |" in printed
    assert report["gemm_gflops"]["fp32"] > 0 and report["gemm_gflops"]["bf16"] > 0
    with pytest.raises(SystemExit):
        training.main([str(tmp_path)])  # not a run folder


def test_fresh_distillation_questions_are_not_the_teachers(full_run, tiny, tmp_path, capsys):
    """[distill_generator] questions = "fresh": the teacher's distributions are cached on the train
    questions after its fine-tuning ones (the default caches them on the same ones)."""
    from edgerag.train.recipe import load_recipe
    from edgerag.train.run import Run
    from edgerag.train.teacher import NEGATIVE_ID

    def asked(out):
        saved = torch.load(Path(out) / "stages" / "teacher_logits" / "cache.pt", weights_only=False)
        return {e["question_id"].removesuffix(NEGATIVE_ID) for e in saved["examples"]}

    first = full_run[0]
    train_questions = Run(first, load_recipe(tiny["recipe"])).questions("train")
    teachers = {q.id for q in train_questions[:16]}  # the tiny recipe fine-tunes on 16
    assert asked(first) <= teachers

    recipe = variant(tiny, tmp_path, lambda t: t.replace("[distill_generator]\n", '[distill_generator]\nquestions = "fresh"\n'))
    out = tmp_path / "run"
    distill(recipe, out, seed_from=first)
    seeded, ran = stage_events(capsys.readouterr().out)
    assert {"teacher_finetune", "distill_encoder", "general_cache", "distill_general"} <= seeded
    assert {"teacher_logits", "distill_generator", "eval"} <= ran
    fresh = asked(out)
    assert fresh and not fresh & teachers
    assert fresh <= {q.id for q in train_questions[16:32]}
