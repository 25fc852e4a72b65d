"""A shipped bundle's documents changed on the device (runtime.corpus): add, remove, sync, their
crash safety, readers during a change, and the commands."""

import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgerag.cli import main
from edgerag.runtime import Pipeline
from edgerag.runtime.compress import split_pieces
from edgerag.runtime.corpus import ChangeOptions, add_documents, remove_documents, stored_documents, sync_documents
from edgerag.runtime.manifest import MANIFEST, read_manifest, verify

ROOT = Path(__file__).resolve().parents[1]

SENTENCES = ["The lighthouse at Cape Morrow was built in 1874 from granite blocks.",
             "Its lamp burned whale oil until the harbour board bought a kerosene burner.",
             "Keepers logged every ship that passed, and the logs survive in the town museum.",
             "A storm in 1903 broke the lantern glass, which was replaced within a week.",
             "Since 1962 the light has run without a keeper."]


def write_documents(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lighthouse.md").write_text("# Cape Morrow lighthouse\n\n" + " ".join(SENTENCES) + "\n")
    (folder / "notes.txt").write_text("Orchards on the north slope grow three kinds of apple. "
                                      "The pickers start in September and finish before the first frost.\n")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "page.html").write_text("<html><head><title>Ferry</title><style>p{}</style></head><body>"
                                              "<h1>The island ferry</h1><p>The ferry leaves at seven &amp; returns "
                                              "at noon.</p><p>Bicycles travel free.</p></body></html>")
    return folder


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def store_rows(bundle: Path) -> list[tuple]:
    manifest = read_manifest(bundle)
    with sqlite3.connect(bundle / manifest.passages.file) as db:
        return db.execute("SELECT row, id, source FROM passages ORDER BY row").fetchall()


def check_consistent(bundle: Path) -> Pipeline:
    """The bundle verifies, its counts agree, no passage is stored twice, and it loads."""
    manifest = verify(bundle)
    rows = store_rows(bundle)
    ids = [pid for _, pid, _ in rows]
    assert len(ids) == len(set(ids)) == manifest.passages.count == manifest.index.count
    listed = set(manifest.files) | {MANIFEST, ".edgerag-corpus.lock"}
    assert {p.name for p in bundle.iterdir()} - listed == set(), "files a change left behind"
    return Pipeline.load(bundle, retrieval_only=True)


def top_id_for_text(pipeline: Pipeline, title: str, text: str) -> str:
    """The top passage for the passage's own embedding text (the tiny encoder is random, so a question
    would rank nothing; its own text ranks itself first)."""
    query = pipeline.manifest.index.passage_format.format(title=title, text=text)
    return pipeline.retrieve(query, k=1)[0]["id"]


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_compressed"])
def test_sync_adds_replaces_and_removes(bundle_fixture, request, tmp_path):
    bundle = copy_bundle(request.getfixturevalue(bundle_fixture), tmp_path)
    exported = len(store_rows(bundle))
    folder = write_documents(tmp_path / "docs")

    change = sync_documents(bundle, folder)
    assert change.added == ["lighthouse.md", "notes.txt", "sub/page.html"] and not change.removed
    pipeline = check_consistent(bundle)
    assert pipeline.size == exported + change.passages_added
    assert set(stored_documents(bundle)) == {"lighthouse.md", "notes.txt", "sub/page.html"}
    found = {source: pid for _, pid, source in store_rows(bundle) if source}
    for pid, title, text in (p for p in pipeline.passages() if p[0].startswith("lighthouse.md#")):
        assert top_id_for_text(pipeline, title, text) == pid
    assert found["sub/page.html"].startswith("sub/page.html#")
    if pipeline.compression is not None:
        rows = [row for row, pid, source in store_rows(bundle) if source]
        for row, (_, _, text) in zip(rows, pipeline.store.get(rows)):
            assert len(pipeline.piece_vectors([row])[0]) == len(split_pieces(text, pipeline.compression.max_piece_words))

    assert sync_documents(bundle, folder).changed is False  # nothing changed: nothing written
    (folder / "notes.txt").write_text("Pears replaced the apples on the north slope in 1990.\n")
    (folder / "sub" / "page.html").unlink()
    change = sync_documents(bundle, folder)
    assert (change.added, change.replaced, change.removed) == ([], ["notes.txt"], ["sub/page.html"])
    pipeline = check_consistent(bundle)
    texts = {text for _, _, text in pipeline.passages()}
    assert any("Pears" in t for t in texts) and not any("Orchards" in t for t in texts)
    assert not any("Bicycles travel free" in t for t in texts)

    change = remove_documents(bundle, ["lighthouse.md"])
    assert change.removed == ["lighthouse.md"]
    pipeline = check_consistent(bundle)
    assert not any("lighthouse" in pid for pid, _, _ in pipeline.passages())
    assert sum(1 for _, _, source in store_rows(bundle) if source is None) == exported  # the exported corpus stays


def test_removed_slots_are_reused_then_compacted(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(6):
        (folder / f"d{i}.txt").write_text(f"Document {i} tells of the {i}th harbour and its {i * 7} boats.\n")
    add_documents(bundle, [folder])
    capacity = read_manifest(bundle).index.count
    remove_documents(bundle, ["d0.txt", "d1.txt"], ChangeOptions(compact_share=0.9))
    manifest = read_manifest(bundle)
    assert manifest.index.deleted == 2 and manifest.index.count == capacity - 2
    (folder / "new.txt").write_text("A new pier was built of oak.\n")
    add_documents(bundle, [folder / "new.txt"], ChangeOptions(compact_share=0.9))
    manifest = read_manifest(bundle)
    assert manifest.index.deleted == 1  # the new passage took a deleted slot
    pipeline = check_consistent(bundle)
    assert pipeline.index.get_current_count() == capacity
    change = remove_documents(bundle, [f"d{i}.txt" for i in range(2, 6)], ChangeOptions(compact_share=0.01))
    assert change.compacted > 0 and read_manifest(bundle).index.deleted == 0
    pipeline = check_consistent(bundle)
    assert pipeline.index.get_current_count() == pipeline.size
    assert top_id_for_text(pipeline, "new", "A new pier was built of oak.") == "new.txt#0"


def test_bad_files_are_named_and_skipped(tiny_bundle, tmp_path, capsys):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    before = (bundle / MANIFEST).read_bytes()
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a PDF")
    outside = tmp_path / "secret.txt"
    outside.write_text("Outside the folder.")
    (folder / "link.txt").symlink_to(outside)
    assert main(["add", str(bundle), str(folder)]) == 1  # nothing could be added
    out = capsys.readouterr().out
    for name in ("empty.txt", "binary.txt", "broken.pdf", "link.txt"):
        assert f"skipped   {name}" in out or name in out
    assert (bundle / MANIFEST).read_bytes() == before
    verify(bundle)

    (folder / "good.txt").write_text("The mill grinds rye on Tuesdays.")
    (folder / "copy.txt").write_text("The mill grinds rye on Tuesdays.")
    assert main(["add", str(bundle), str(folder)]) == 0  # some files added: the others are named, not fatal
    out = capsys.readouterr().out
    assert "added     copy.txt" in out and "same content as copy.txt" in out
    assert main(["add", str(bundle), str(folder / "good.txt")]) == 0  # same content, another source: skipped
    assert "same content as" in capsys.readouterr().out
    assert main(["remove", str(bundle), "nothing.txt"]) == 1
    check_consistent(bundle)


def test_a_sync_killed_anywhere_leaves_a_whole_bundle(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"d{i:02d}.md").write_text(f"# Note {i}\n\n" + " ".join(SENTENCES[:1 + i % 5]) + f" Note {i} ends.\n")
    rng = random.Random(0)
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "edgerag.cli", "sync", str(bundle), str(folder)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check_consistent(bundle)
        documents = stored_documents(bundle)
        for _, pid, source in store_rows(bundle):  # a document is there whole or not at all
            assert source is None or source in documents
        if attempt % 2:  # the next change starts from whatever the killed one left
            (folder / f"d{attempt:02d}.md").unlink()
    change = sync_documents(bundle, folder)
    check_consistent(bundle)
    assert set(stored_documents(bundle)) == {p.name for p in folder.iterdir()}
    assert change.passages == read_manifest(bundle).passages.count


def test_answers_during_a_sync_come_from_one_corpus_or_the_other(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    folder = write_documents(tmp_path / "docs")
    pipeline = Pipeline.load(bundle)
    before = {pid for pid, _, _ in pipeline.passages()}
    errors, answers = [], []

    def ask():
        try:
            for _ in range(6):
                answers.append({p["id"] for p in pipeline.ask("Where is the lighthouse?", k=3, max_new_tokens=3).passages})
        except Exception as e:  # noqa: BLE001 - any error fails the test below
            errors.append(e)
    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    pipeline.sync_documents(folder)
    for t in threads:
        t.join()
    after = {pid for pid, _, _ in pipeline.passages()}
    assert not errors and after > before
    assert all(ids <= before or ids <= after for ids in answers)
    assert top_id_for_text(pipeline, "Cape Morrow lighthouse", next(
        t for pid, _, t in pipeline.passages() if pid == "lighthouse.md#0")) == "lighthouse.md#0"


def test_a_pipeline_reloads_what_another_process_synced(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    pipeline = Pipeline.load(bundle, retrieval_only=True)
    assert pipeline.reload_corpus() is False
    folder = write_documents(tmp_path / "docs")
    assert main(["sync", str(bundle), str(folder)]) == 0
    size = pipeline.size
    assert pipeline.reload_corpus() is True and pipeline.size > size
    assert any(pid == "notes.txt#0" for pid, _, _ in pipeline.passages())


def test_serve_reload_endpoint(tiny_bundle, tmp_path):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from edgerag.runtime.serve import ServeOptions, build_app

    bundle = copy_bundle(tiny_bundle, tmp_path)
    client = TestClient(build_app(Pipeline.load(bundle), ServeOptions(api_key="k")))
    before = client.get("/v1/info", headers={"authorization": "Bearer k"}).json()["passages"]
    sync_documents(bundle, write_documents(tmp_path / "docs"))
    assert client.post("/v1/reload").status_code == 401
    reply = client.post("/v1/reload", headers={"authorization": "Bearer k"}).json()
    assert reply["reloaded"] is True and reply["passages"] > before
    assert client.get("/v1/info", headers={"authorization": "Bearer k"}).json()["passages"] == reply["passages"]


def test_real_encoder_finds_an_added_file_first(tiny_models, tmp_path, capsys):
    """A bundle exported from the project's own docs (markdown) with the packaged MiniLM; then a text
    file and a PDF added on the device: a question about each ranks its passage first."""
    pytest.importorskip("torch")
    from edgerag.export import ExportOptions
    from edgerag.export.bundle import export_bundle
    from edgerag.model_files import DEFAULT_QUERY_ENCODER
    from edgerag.benchmarks.documents import write_pdf

    _, generator, _, _ = tiny_models
    docs = tmp_path / "project-docs"
    docs.mkdir()
    for page in (ROOT / "README.md", ROOT / "docs" / "documents.md", ROOT / "docs" / "serving.md"):
        shutil.copy(page, docs / page.name)
    bundle = export_bundle(DEFAULT_QUERY_ENCODER, str(generator), [docs], tmp_path / "bundle",
                           options=ExportOptions(quantize="none", quantize_encoder="none", max_new_tokens=4,
                                                 max_context=256, parity_questions=2))
    assert set(stored_documents(bundle)) >= {"README.md"}
    new = tmp_path / "new"
    new.mkdir()
    (new / "lighthouse.txt").write_text(" ".join(SENTENCES) + "\n")
    write_pdf(new / "ferry.pdf", ["The island ferry leaves the harbour at seven and returns at noon."])
    assert main(["add", str(bundle), str(new)]) == 0
    capsys.readouterr()
    pipeline = check_consistent(bundle)
    assert pipeline.retrieve("When was the Cape Morrow lighthouse built?", k=1)[0]["id"].startswith("lighthouse.txt#")
    assert pipeline.retrieve("When does the island ferry leave?", k=1)[0]["id"].startswith("ferry.pdf#")
    assert main(["ask", str(bundle), "When was the Cape Morrow lighthouse built?", "--max-new-tokens", "2"]) == 0
    assert "[1] lighthouse" in capsys.readouterr().out


def test_a_passage_encoder_is_shipped_and_embeds_what_is_added(tiny_models, tmp_path):
    """Where passages are embedded by another encoder than questions, the bundle carries it, and a
    passage added on the device gets the vector that encoder gives, not the query encoder's."""
    pytest.importorskip("torch")
    from tokenizers import Tokenizer

    from edgerag.export import ExportOptions
    from edgerag.export.bundle import export_bundle
    from edgerag.runtime import QueryEncoder, make_session
    from edgerag.train.tiny import make_tiny_encoder, tiny_corpus_texts

    encoder, generator, _, squad = tiny_models
    other = make_tiny_encoder(tmp_path / "passage-encoder", tiny_corpus_texts(), heads=4, max_length=64,
                              initializer_range=0.02, seed=1)
    bundle = export_bundle(str(encoder), str(generator), squad, tmp_path / "bundle", passage_encoder=str(other),
                           options=ExportOptions(quantize="none", quantize_encoder="none", max_new_tokens=4,
                                                 max_context=256, parity_questions=2))
    manifest = verify(bundle)
    assert manifest.passage_encoder is not None and manifest.passage_encoder.onnx in manifest.files
    folder = write_documents(tmp_path / "docs")
    sync_documents(bundle, folder)
    pipeline = check_consistent(bundle)
    row, pid, _ = next(r for r in store_rows(bundle) if r[2] == "notes.txt")
    _, title, text = pipeline.store.get([row])[0]
    stored = np.asarray(pipeline.index.get_items([row]))[0]
    formatted = [manifest.index.passage_format.format(title=title, text=text)]

    def embedding(spec):
        return QueryEncoder(make_session(bundle / spec.onnx, 1), Tokenizer.from_file(str(bundle / spec.tokenizer)),
                            spec.max_length).encode(formatted)[0]
    np.testing.assert_allclose(stored, embedding(manifest.passage_encoder), atol=1e-5)
    assert np.abs(stored - embedding(manifest.query_encoder)).max() > 1e-2
    # a passage added in memory (edgerag eval --corpus) is embedded the same way
    assert pipeline.add_passages([("added-in-memory", title, text)]) == 1
    added = np.asarray(pipeline.index.get_items([pipeline._next_label - 1]))[0]
    np.testing.assert_allclose(added, embedding(manifest.passage_encoder), atol=1e-5)


def test_pieces_read_from_given_passages_are_embedded_by_the_passage_encoder(tiny_models, tmp_path):
    """A compressed bundle with its own passage encoder: the pieces of a passage given to the pipeline
    (answer_with_passages, an added passage) get the vectors export stored for the same passage, not
    the query encoder's, so it reads the same context from either."""
    pytest.importorskip("torch")
    from edgerag.export import ExportOptions
    from edgerag.export.bundle import export_bundle
    from edgerag.train.tiny import make_tiny_encoder, tiny_corpus_texts

    encoder, generator, _, squad = tiny_models
    other = make_tiny_encoder(tmp_path / "passage-encoder", tiny_corpus_texts(), heads=4, max_length=64,
                              initializer_range=0.02, seed=1)
    compression = {"passages": 4, "budget": 40, "selector": {"dense": 1.0, "lexical": 0.5}, "max_piece_words": 12}
    bundle = export_bundle(str(encoder), str(generator), squad, tmp_path / "bundle", passage_encoder=str(other),
                           options=ExportOptions(quantize="none", quantize_encoder="none", max_new_tokens=4,
                                                 max_context=256, parity_questions=2), compression=compression)
    pipeline = Pipeline.load(bundle)
    row = next(r for r in range(pipeline.size) if len(pipeline.pieces.of(r)) > 1)
    _, title, text = pipeline.store.get([row])[0]
    stored = pipeline.pieces.of(row)  # int8 with a scale per vector: within half a step of the float ones
    given = pipeline._embed_pieces([(title, text)])[0]
    assert given.shape == stored.shape
    assert np.abs(given - stored).max() <= np.abs(stored).max() / 127 + 1e-5
    fmt = pipeline.manifest.index.passage_format
    by_query_encoder = pipeline.encoder.encode([fmt.format(title=title, text=p)
                                                for p in split_pieces(text, compression["max_piece_words"])])
    assert np.abs(by_query_encoder - stored).max() > 1e-2


@pytest.mark.skipif(not (ROOT / ".venv-base" / ".installed").exists(), reason="make install-base builds the base venv")
def test_documents_change_on_the_base_install(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    folder = write_documents(tmp_path / "docs")
    python = ROOT / ".venv-base" / "bin" / "python"
    code = ("import sys; from edgerag.cli import main; status = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]; "
            "print('heavy', heavy); sys.exit(status)")
    for args in (["sync", str(bundle), str(folder)], ["remove", str(bundle), "notes.txt"]):
        result = subprocess.run([python, "-c", code, *args], capture_output=True, text=True)
        assert result.returncode == 0 and "heavy []" in result.stdout, result.stdout + result.stderr
    assert set(stored_documents(bundle)) == {"lighthouse.md", "sub/page.html"}
    check_consistent(bundle)
