import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_DIR = Path(os.environ.get("EDGERAG_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(encoder folder, generator folder, passages.jsonl, squad.json) built once per test session."""
    from edgerag.train.tiny import make_tiny_encoder, make_tiny_generator, tiny_corpus_texts, write_tiny_corpus

    root = tmp_path_factory.mktemp("tiny")
    jsonl, squad = write_tiny_corpus(root / "data")
    texts = tiny_corpus_texts()
    encoder = make_tiny_encoder(root / "encoder", texts, heads=4, max_length=64, initializer_range=0.02)
    generator = make_tiny_generator(root / "generator", texts * 3, layers=2, embedding_std=1.0)
    return encoder, generator, jsonl, squad


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny training project (models, data, recipe: edgerag.train.tiny), one per test module, with
    torch on one thread: tiny models gain nothing from threads, and spinning OpenMP threads on a busy
    2-core machine cost a lot. A module may define its own `tiny` instead."""
    torch = pytest.importorskip("torch")
    from edgerag.train.tiny import make_tiny_project

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield make_tiny_project(tmp_path_factory.mktemp("tiny"))
    torch.set_num_threads(threads)


def _export(tiny_models, tmp_path_factory, quantize, graph="auto"):
    from edgerag.export import ExportOptions
    from edgerag.export.bundle import export_bundle

    encoder, generator, jsonl, squad = tiny_models
    out = tmp_path_factory.mktemp("bundles") / f"tiny-{quantize}-{graph}"
    # the fp32 bundle is fp32 throughout; the others ship the default (quantized) query encoder
    encoder_quantize = "none" if quantize == "none" else ExportOptions.quantize_encoder
    options = ExportOptions(quantize=quantize, quantize_encoder=encoder_quantize, block_size=32, max_new_tokens=12, max_context=256,
                            parity_questions=4, k=2, graph=graph)
    return export_bundle(str(encoder), str(generator), squad, out, options=options)


@pytest.fixture(scope="session")
def tiny_bundle_varied(tiny_models, tmp_path_factory):
    """fp32, from a tiny generator whose greedy tokens vary (the other one repeats its last token)."""
    from edgerag.train.tiny import make_tiny_generator, tiny_corpus_texts

    generator = make_tiny_generator(tmp_path_factory.mktemp("tiny-varied") / "generator", tiny_corpus_texts() * 3,
                                    layers=2, embedding_std=1.0, layer_scale=10.0)
    return _export((tiny_models[0], generator, *tiny_models[2:]), tmp_path_factory, "none")


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


@pytest.fixture(scope="session")
def tiny_bundle_int8swo(tiny_models, tmp_path_factory):
    return _export(tiny_models, tmp_path_factory, "int8swo")


@pytest.fixture(scope="session")
def tiny_bundle_compressed(tiny_models, tmp_path_factory):
    """fp32, reading a compressed context (runtime.compress): every passage's piece vectors in the bundle."""
    from edgerag.export import ExportOptions
    from edgerag.export.bundle import export_bundle

    encoder, generator, _, squad = tiny_models
    options = ExportOptions(quantize="none", quantize_encoder="none", max_new_tokens=8, max_context=256,
                            parity_questions=2, k=2)
    compression = {"passages": 4, "budget": 40, "selector": {"dense": 1.0, "lexical": 0.5}, "max_piece_words": 12}
    return export_bundle(str(encoder), str(generator), squad, tmp_path_factory.mktemp("compressed") / "bundle",
                         options=options, compression=compression)


@pytest.fixture
def live_server(tiny_bundle):
    """`live_server(*serve_args, bundle=tiny_bundle, python=...)`: `edgerag serve` in its own process on a
    free loopback port, as a context manager yielding (url, pid). The reliability suite drives the same one."""
    from edgerag.benchmarks.reliability.server import server

    def start(*args, bundle=tiny_bundle, python=sys.executable):
        return server(bundle, *args, python=python)
    return start


def streamed(stream) -> tuple[list[str], object]:
    """A Pipeline.stream's chunks and the Answer it returns."""
    chunks = []
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as done:
            return chunks, done.value
