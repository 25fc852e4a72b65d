"""The `edgerag` command as a user runs it: real subprocesses, real bundles."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE_VENV = ROOT / ".venv-base"


def edgerag(*args, python=sys.executable, stdin=None, env=None):
    return subprocess.run([python, "-m", "edgerag.cli", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_ask_json_record(tiny_bundle):
    result = edgerag("ask", tiny_bundle, "Which team won Super Bowl 50?", "--json", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert {"answer", "passages", "timings"} <= set(record)
    assert {"id", "title", "score", "text"} <= set(record["passages"][0])


def test_ask_reads_questions_from_stdin(tiny_bundle):
    result = edgerag("ask", tiny_bundle, "--json", "--max-new-tokens", "2",
                     stdin="What is the capital of Poland?\n\nWhere is Victoria?\n")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in records] == ["What is the capital of Poland?", "Where is Victoria?"]


def test_ask_plain_prints_sources(tiny_bundle):
    result = edgerag("ask", tiny_bundle, "Which team won Super Bowl 50?", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "[1] " in result.stdout and "tok/s" in result.stdout


def test_tampered_bundle_is_one_line_error(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "generator.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = edgerag("ask", copy, "Which team won?")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "generator.onnx" in result.stderr
    assert result.stdout == ""


def test_empty_question_is_an_error(tiny_bundle):
    result = edgerag("ask", tiny_bundle, "  ")
    assert result.returncode == 1 and "question is empty" in result.stderr


def test_malformed_passages_line_is_named_at_export(tiny_models, tmp_path):
    encoder, generator, _, _ = tiny_models
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "title": "a", "text": "ok"}\n{"id": "2", "title": "b", "text": "ok"}\nnot json\n')
    out = tmp_path / "bundle"
    result = edgerag("export", "--query-encoder", encoder, "--generator", generator, "--passages", bad, "--out", out)
    assert result.returncode == 1
    assert "bad.jsonl:3" in result.stderr
    assert not out.exists()


def test_failed_export_leaves_nothing_behind(tiny_models, tmp_path):
    encoder, _, jsonl, _ = tiny_models
    out = tmp_path / "bundle"
    result = edgerag("export", "--query-encoder", encoder, "--generator", tmp_path / "no-such-model",
                     "--passages", jsonl, "--out", out)
    assert result.returncode != 0
    assert list(tmp_path.iterdir()) == [], "a failed export must not leave a bundle or temporary files"


def test_export_refuses_to_overwrite_without_flag(tiny_bundle, tiny_models):
    encoder, generator, jsonl, _ = tiny_models
    result = edgerag("export", "--query-encoder", encoder, "--generator", generator, "--passages", jsonl,
                     "--out", tiny_bundle)
    assert result.returncode == 1 and "--overwrite" in result.stderr


def test_verify_command(tiny_bundle):
    result = edgerag("verify", tiny_bundle)
    assert result.returncode == 0 and "files verified" in result.stdout


def test_runtime_import_pulls_no_torch(tiny_bundle):
    code = ("import sys, edgerag; p = edgerag.load(sys.argv[1]); p.ask('Which team won?', max_new_tokens=2); "
            "heavy = [m for m in ('torch', 'transformers', 'optimum', 'onnx', 'edgerag.train', 'edgerag.export') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_bundle)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


needs_base_venv = pytest.mark.skipif(not (BASE_VENV / ".installed").exists(),
                                     reason="make install-base builds the base-install virtual environment")


@needs_base_venv
def test_base_install_has_no_torch_and_answers(tiny_bundle):
    python = BASE_VENV / "bin" / "python"
    probe = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', "
                            "'optimum') if u.find_spec(m)])"], capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    result = edgerag("ask", tiny_bundle, "Which team won Super Bowl 50?", "--json", "--max-new-tokens", "3",
                     python=python)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["passages"]


@needs_base_venv
def test_workstation_command_on_base_install_names_the_extra(tiny_models, tmp_path):
    encoder, generator, jsonl, _ = tiny_models
    for command in (["export", "--query-encoder", encoder, "--generator", generator, "--passages", jsonl,
                     "--out", tmp_path / "b"],
                    ["distill", ROOT / "recipes" / "demo.toml", "--out", tmp_path / "run"]):
        result = edgerag(*command, python=BASE_VENV / "bin" / "python")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and "edgerag[train]" in result.stderr
    assert list(tmp_path.iterdir()) == []


SUBCOMMANDS = ("ask", "serve", "verify", "add", "remove", "sync", "export", "distill", "eval", "bench")


def _listed(help_text: str) -> set[str]:
    """The subcommands argparse lists in `usage: edgerag [-h] {ask,verify,...}`."""
    import re

    return set(re.search(r"\{([\w,-]+)\}", help_text).group(1).split(","))


def test_user_modules_named_like_ours_change_nothing(tmp_path):
    """A user's own train.py, export.py, runtime.py or benchmarks/ in the working directory shadow nothing."""
    for name in ("train", "export", "runtime"):
        (tmp_path / f"{name}.py").write_text("raise ImportError('the user module was imported')\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("raise ImportError('the user package was imported')\n")
    script = Path(sys.executable).parent / "edgerag"
    for command in ([str(script), "--help"], [sys.executable, "-m", "edgerag.cli", "--help"]):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert _listed(result.stdout) == set(SUBCOMMANDS), result.stdout


@needs_base_venv
def test_base_install_lists_every_subcommand():
    python = BASE_VENV / "bin" / "python"
    result = edgerag("--help", python=python)
    assert result.returncode == 0, result.stderr
    assert _listed(result.stdout) == set(SUBCOMMANDS), result.stdout
    for command in ("export", "distill", "bench"):
        sub = edgerag(command, "--help", python=python)
        assert sub.returncode == 0 and "usage: edgerag " + command in sub.stdout, sub.stderr


def test_wheel_has_one_top_level_package(tmp_path):
    import zipfile

    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheel, = tmp_path.glob("edgerag-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"edgerag"}
    for package in ("runtime", "export", "train", "benchmarks"):
        assert f"edgerag/{package}/__init__.py" in names
    assert "edgerag/runtime/pipeline.py" in names and "edgerag/cli.py" in names
    assert {"edgerag/model_files.py", "edgerag/train/driver.py", "edgerag/train/run.py"} <= set(names)
