import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_DIR = Path(os.environ.get("EDGERAG_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(encoder folder, generator folder, passages.jsonl, squad.json) built once per test session."""
    import tiny

    root = tmp_path_factory.mktemp("tiny")
    jsonl, squad = tiny.write_corpus(root / "data")
    return (tiny.build_encoder(root / "encoder"), tiny.build_generator(root / "generator"), jsonl, squad)


def _export(tiny_models, tmp_path_factory, quantize, graph="auto"):
    from export.bundle import ExportOptions, export_bundle

    encoder, generator, jsonl, squad = tiny_models
    out = tmp_path_factory.mktemp("bundles") / f"tiny-{quantize}-{graph}"
    # the fp32 bundle is fp32 throughout; the others ship the default (quantized) query encoder
    encoder_quantize = "none" if quantize == "none" else ExportOptions.quantize_encoder
    options = ExportOptions(quantize=quantize, quantize_encoder=encoder_quantize, block_size=32, max_new_tokens=12, max_context=256,
                            parity_questions=4, k=2, graph=graph)
    return export_bundle(str(encoder), str(generator), squad, out, options=options)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_models, tmp_path_factory):
    return _export(tiny_models, tmp_path_factory, "none")


@pytest.fixture(scope="session")
def tiny_bundle_int4(tiny_models, tmp_path_factory):
    return _export(tiny_models, tmp_path_factory, "int4")


@pytest.fixture(scope="session")
def tiny_bundle_int8(tiny_models, tmp_path_factory):
    return _export(tiny_models, tmp_path_factory, "int8")


@pytest.fixture(scope="session")
def tiny_bundle_int8wo(tiny_models, tmp_path_factory):
    return _export(tiny_models, tmp_path_factory, "int8wo")


@pytest.fixture(scope="session")
def tiny_bundle_optimum(tiny_models, tmp_path_factory):
    """The same tiny models through Optimum's traced graph instead of the fused Llama graph."""
    return _export(tiny_models, tmp_path_factory, "auto", graph="optimum")  # auto: int8wo for a traced graph


@pytest.fixture(scope="session")
def tiny_bundle_int8sq(tiny_models, tmp_path_factory):
    return _export(tiny_models, tmp_path_factory, "int8sq")
