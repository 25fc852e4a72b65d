"""The real packaged models: all-MiniLM-L6-v2 (safetensors) and SmolLM2-135M-Instruct (Q4_1 GGUF)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR, ROOT
from edgerag.model_files import DEFAULT_GENERATOR, DEFAULT_QUERY_ENCODER
from edgerag.models import resolve

XQUAD = DATA_DIR / "xquad-en.json.gz"
needs_data = pytest.mark.skipif(not XQUAD.exists(), reason=f"{XQUAD} not found (set EDGERAG_DATA)")


def test_packaged_hub_ids_resolve_offline():
    encoder = resolve(DEFAULT_QUERY_ENCODER)
    assert (Path(encoder.path) / "model.safetensors").exists() and encoder.gguf_file is None
    generator = resolve(DEFAULT_GENERATOR)
    assert (Path(generator.path) / generator.gguf_file).exists()
    assert resolve(Path(generator.path) / generator.gguf_file) == generator  # a .gguf path works too


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        resolve(str(tmp_path / "nothing" / "here"))


def test_real_minilm_onnx_matches_pytorch(tmp_path):
    from edgerag.export.bundle import embed_passages
    from edgerag.export.onnx_export import export_query_encoder, materialize, save
    from edgerag.runtime import QueryEncoder, make_session
    from tokenizers import Tokenizer
    from edgerag.models import load_encoder

    folder = materialize(DEFAULT_QUERY_ENCODER, tmp_path / "work")
    model, tokenizer, pooling, max_length = load_encoder(str(folder))
    assert (pooling, max_length) == ("mean", 256)
    save(export_query_encoder(folder, pooling), tmp_path / "q.onnx")
    texts = ["Which NFL team represented the AFC at Super Bowl 50?", "capital of Poland", "x " * 400]
    encoder = QueryEncoder(make_session(tmp_path / "q.onnx", 2), Tokenizer.from_file(str(folder / "tokenizer.json")),
                           max_length)
    got = encoder.encode(texts)
    np.testing.assert_allclose(got, embed_passages(model, tokenizer, pooling, max_length, texts, 8), atol=1e-5)
    # the real model puts a question next to its answer passage, not next to an unrelated one
    q, super_bowl, poland = encoder.encode([texts[0], "Super Bowl 50: The Denver Broncos of the AFC played "
                                            "the Carolina Panthers.", "Warsaw is the capital of Poland."])
    assert q @ super_bowl > q @ poland + 0.2


@pytest.mark.slow
@needs_data
def test_real_bundle_answers_super_bowl_question(tmp_path):
    """The issue's acceptance run: export the packaged models over XQuAD, ask through the CLI."""
    out = tmp_path / "bundle"
    export = subprocess.run([sys.executable, "-m", "edgerag.cli", "export", "--query-encoder", DEFAULT_QUERY_ENCODER,
                             "--generator", DEFAULT_GENERATOR, "--passages", str(XQUAD), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert export.returncode == 0, export.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["generator"]["fp32"]["greedy_exact_match"] == 1.0
    ask = subprocess.run([sys.executable, "-m", "edgerag.cli", "ask", str(out),
                          "Which NFL team represented the AFC at Super Bowl 50?", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ask.returncode == 0, ask.stderr
    record = json.loads(ask.stdout)
    assert record["passages"][0]["title"] == "Super Bowl 50"
    assert record["answer"].strip()
