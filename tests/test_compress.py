"""The compressed context: splitting, selection, the bundle's piece vectors, and a student distilled
across contexts (tiny random models; the selection code is the one the device runs)."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgerag.runtime.compress import (Compression, PieceVectors, Selector, compress_context, piece_scores,
                                      select_pieces, split_pieces)
from edgerag.runtime.manifest import BundleError, read_manifest


# ---------------------------------------------------------------- splitting and selection (no models)

def test_split_keeps_every_word_and_cuts_sentence_less_text_into_windows():
    text = "The U.S. Army won in 1990. \"It was great,\" he said! Then (1991) came?  Next one"
    pieces = split_pieces(text)
    assert pieces == ["The U.S. Army won in 1990.", "\"It was great,\" he said!", "Then (1991) came?", "Next one"]
    table = " | ".join(f"row {i} cell {i * 7}" for i in range(40))  # a table row: no sentence boundary at all
    windows = split_pieces(table, max_words=10)
    assert len(windows) == -(-len(table.split()) // 10)
    assert all(len(w.split()) <= 10 for w in windows)
    assert " ".join(windows) == " ".join(table.split())  # nothing dropped
    assert split_pieces("   ") == []


def test_selection_is_deterministic_ordered_within_budget_and_keeps_the_best():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 30))
        scores = rng.normal(size=n).round(1)  # rounded: ties happen
        tokens = [int(t) for t in rng.integers(1, 40, size=n)]
        budget = int(rng.integers(1, 120))
        chosen = select_pieces(scores, tokens, budget)
        assert chosen == select_pieces(scores, tokens, budget)
        assert chosen == sorted(set(chosen))                      # document order, each piece once
        best = min(range(n), key=lambda i: (-scores[i], i))
        assert best in chosen                                     # even when it alone is over the budget
        assert sum(tokens[i] for i in chosen) <= max(budget, tokens[best])
        used = sum(tokens[i] for i in chosen)
        assert all(used + tokens[i] > budget for i in set(range(n)) - set(chosen))  # nothing left out would fit


def test_scores_weigh_dense_and_lexical_features():
    pieces = ["Denver won the Super Bowl.", "The weather was fine."]
    vectors = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    query = np.array([1.0, 0.0], np.float32)  # the dense feature prefers the second piece
    dense_only = piece_scores(query, vectors, "Who won the Super Bowl?", pieces, Selector(1.0, 0.0))
    assert dense_only.argmax() == 1
    with_words = piece_scores(query, vectors, "Who won the Super Bowl?", pieces, Selector(1.0, 2.0))
    assert with_words.argmax() == 0  # won, super, bowl: 3 of 3 content words


def test_compressed_context_keeps_titles_rank_order_and_document_order():
    passages = [("First", "Alpha one. Beta two. Gamma three."), ("Second", "Delta four. Epsilon five.")]
    # piece vectors that make the query pick Gamma and Delta, then Alpha
    vectors = [np.array([[0.5], [0.0], [1.0]], np.float32), np.array([[0.9], [0.1]], np.float32)]
    compression = Compression(passages=2, budget=7, selector=Selector(1.0, 0.0))  # 3 pieces of 2 words
    encode = lambda text: text.split()  # noqa: E731 (a word per token)
    context = compress_context(compression, "q?", np.array([1.0], np.float32), passages, vectors, encode)
    assert context == [("First", "Alpha one. Gamma three."), ("Second", "Delta four.")]
    with pytest.raises(ValueError, match="piece vectors"):
        compress_context(compression, "q?", np.array([1.0], np.float32), passages, vectors[:1], encode)


def test_piece_vectors_roundtrip_through_int8(tmp_path):
    rng = np.random.default_rng(1)
    per_passage = [rng.normal(size=(n, 16)).astype(np.float32) for n in (3, 0, 5)]
    packed = PieceVectors.pack(per_passage)
    packed.save(tmp_path / "pieces.bin")
    loaded = PieceVectors.load(tmp_path / "pieces.bin", passages=3, pieces=8, dim=16)
    with pytest.raises(ValueError, match="bytes"):
        PieceVectors.load(tmp_path / "pieces.bin", passages=3, pieces=9, dim=16)
    assert loaded.passages == 3 and loaded.of(1).shape == (0, 16)
    for original, back in zip(per_passage, loaded.all()):
        assert original.shape == back.shape
        if len(original):
            assert np.abs(original - back).max() <= np.abs(original).max() / 127 + 1e-6
    with pytest.raises(ValueError):
        PieceVectors(loaded.vectors, loaded.scales, loaded.offsets[:-1])


# ---------------------------------------------------------------- a compressed student, distilled and exported

@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    pytest.importorskip("torch")
    from edgerag.train.driver import distill
    from edgerag.train.tiny import make_tiny_project

    root = tmp_path_factory.mktemp("compressed")
    tiny = make_tiny_project(root / "tiny")
    recipe = root / "recipe.toml"
    recipe.write_text(tiny["recipe"].read_text()
                      + "\n[compress]\nenabled = true\npassages = 4\nbudget = 40\nfit_questions = 20\n")
    out = root / "run"
    report = distill(recipe, out)
    import torch

    torch.set_flush_denormal(False)  # evaluation turns it on for speed; later tests' float strategies need subnormals
    return tiny, out, report


@pytest.fixture(scope="module")
def compressed_bundle(compressed_run):
    from edgerag.cli import main

    tiny, out, _ = compressed_run
    bundle = out.parent / "bundle"
    assert main(["export", str(out / "student"), "--passages", str(out / "data" / "corpus.jsonl"), "--out", str(bundle),
                 "--quantize", "none"]) == 0
    return bundle


def test_student_reads_a_quarter_of_the_teachers_tokens(compressed_run):
    _, out, report = compressed_run
    info = json.loads((out / "student" / "edgerag.json").read_text())
    assert info["template"] == "compact" and info["k"] == 4
    assert Compression.from_dict(info["compression"]).budget == 40
    kd = json.loads((out / "stages" / "teacher_logits" / "info.json").read_text())
    assert kd["student_prompt_tokens"] < kd["teacher_prompt_tokens"]
    assert report["student"]["prompt_tokens"] < report["teacher"]["prompt_tokens"]


def test_a_teacher_fine_tuned_on_compressed_contexts_reads_them_in_distillation_and_evaluation(compressed_run, tmp_path):
    """[teacher_finetune] context = "compressed": the teacher learns, gives its distributions and is
    evaluated over the pieces the student reads, not its whole passages."""
    from edgerag.train.driver import distill

    tiny, whole, whole_report = compressed_run
    recipe = tmp_path / "recipe.toml"
    recipe.write_text((whole.parent / "recipe.toml").read_text().replace("[teacher_finetune]", '[teacher_finetune]\ncontext = "compressed"'))
    out = tmp_path / "run"
    report = distill(recipe, out, seed_from=whole)
    import torch

    torch.set_flush_denormal(False)
    teacher = json.loads((out / "teacher" / "edgerag.json").read_text())
    assert teacher["template"] == "compact" and Compression.from_dict(teacher["compression"]).budget == 40
    finetune = json.loads((out / "stages" / "teacher_finetune" / "info.json").read_text())
    kd = json.loads((out / "stages" / "teacher_logits" / "info.json").read_text())
    whole_kd = json.loads((whole / "stages" / "teacher_logits" / "info.json").read_text())
    assert finetune["steps"] > 0 and 0.0 <= finetune["answer_in_context"] <= 100.0  # percent
    # the teacher now reads about what the student reads, far less than its whole passages
    assert kd["teacher_prompt_tokens"] < 0.75 * whole_kd["teacher_prompt_tokens"]
    assert abs(kd["teacher_prompt_tokens"] - kd["student_prompt_tokens"]) < 0.25 * kd["student_prompt_tokens"]
    assert report["teacher"]["prompt_tokens"] < 0.75 * whole_report["teacher"]["prompt_tokens"]
    # the whole-context run's teacher folder was seeded by hard links and must not have been rewritten
    assert "compression" not in json.loads((whole / "teacher" / "edgerag.json").read_text())


def test_a_compressed_teachers_fine_tuning_depends_on_what_it_reads(compressed_run):
    """Its stage settings (its fingerprint, which --seed-from matches) name the compression and the
    prompt; a whole-passage teacher's stay as they were before the key existed."""
    import dataclasses

    from edgerag.train.decoder_only_stages import STAGES
    from edgerag.train.recipe import load_recipe

    _, whole, _ = compressed_run
    stage = next(s for s in STAGES if s.name == "teacher_finetune")
    recipe = load_recipe(whole.parent / "recipe.toml")
    assert "context" not in stage.settings(recipe)["teacher_finetune"] and "compress" not in stage.settings(recipe)
    compressed = dataclasses.replace(recipe, teacher_finetune=dataclasses.replace(recipe.teacher_finetune, context="compressed"))
    tighter = dataclasses.replace(compressed, compress=dataclasses.replace(compressed.compress, budget=20))
    assert stage.settings(compressed) != stage.settings(tighter)
    assert stage.settings(compressed)["prompt"]["max_prompt_tokens"] == recipe.prompt.max_prompt_tokens


def test_a_compressed_teacher_needs_the_compress_section(tmp_path):
    from edgerag.train.recipe import RecipeError, load_recipe
    from edgerag.train.tiny import make_tiny_project

    tiny = make_tiny_project(tmp_path / "tiny")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tiny["recipe"].read_text().replace("[teacher_finetune]", '[teacher_finetune]\ncontext = "compressed"'))
    with pytest.raises(RecipeError, match="compress.enabled"):
        load_recipe(recipe)
    recipe.write_text(tiny["recipe"].read_text().replace("[teacher_finetune]", '[teacher_finetune]\ncontext = "gist"'))
    with pytest.raises(RecipeError, match="'whole' or 'compressed'"):
        load_recipe(recipe)


def test_kl_across_contexts_decreases(compressed_run):
    """The student reading compressed contexts gets closer to the teacher's distribution over the answer
    (which the teacher produced reading full passages)."""
    import torch

    from edgerag.models import load_generator
    from edgerag.train.distill import KDExample, generator_loss_fn
    from edgerag.train.run import Run
    from edgerag.train.recipe import load_recipe
    from edgerag.train.teacher import Example

    _, out, _ = compressed_run
    run = Run(out, load_recipe(out / "recipe.toml"))
    saved = torch.load(run.kd_cache, weights_only=False)
    examples = [KDExample(Example(**e), c) for e, c in zip(saved["examples"], saved["cache"])]
    kl_only = generator_loss_fn(pad_id=0, temperature=run.recipe.distill_generator.temperature, alpha=0.0)

    student, _ = load_generator(run.student_generator_start)
    torch.manual_seed(0)

    def kl() -> float:
        student.eval()
        with torch.no_grad():
            return float(kl_only(student, examples)[1]["kl"])

    before = kl()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    student.train()
    for step in range(12):
        loss, _ = kl_only(student, examples[step % 4 * 4:step % 4 * 4 + 4])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert kl() < 0.8 * before


def test_teacher_positives_are_the_pieces_the_teacher_scores_highest(compressed_run):
    """RECOMP's positives: batched scores equal one-at-a-time scores (padding changes nothing), and
    each question's positive is its own piece with the highest score."""
    from edgerag.models import load_generator
    from edgerag.train.compression_fit import answer_logprobs, positive_share, teacher_positives
    from edgerag.train.run import Run
    from edgerag.train.recipe import load_recipe
    from edgerag.train.teacher import Prompter

    tiny, out, _ = compressed_run
    run = Run(out, load_recipe(out / "recipe.toml"))
    teacher, tokenizer = load_generator(run.teacher_generator)
    prompter = Prompter(tokenizer, 128, 8)
    questions = run.questions("train")[:3]
    contexts = [[(q.title, q.context), ("Other", "Short one. And a second sentence here.")] for q in questions]
    items = [(q.question, [(title, piece)], q.answers[0]) for q, ctx in zip(questions, contexts)
             for title, text in ctx for piece in split_pieces(text)]
    batched, single = answer_logprobs(teacher, prompter, items, batch_size=8), answer_logprobs(teacher, prompter, items, 1)
    np.testing.assert_allclose(batched, single, atol=1e-4)
    positives = teacher_positives(teacher, prompter, questions, contexts, max_piece_words=48)
    start = 0
    for q, ctx, positive in zip(questions, contexts, positives):
        pieces = [(title, piece) for title, text in ctx for piece in split_pieces(text)]
        scores = single[start:start + len(pieces)]
        start += len(pieces)
        assert positive == pieces[int(np.argmax(scores))]
    assert positive_share(positives, contexts) == 100.0
    assert positive_share(positives, [[("Other", "nothing kept")]] * 3) == 0.0


def test_selector_fitted_on_teacher_positives(compressed_run, monkeypatch):
    """fit_target = "teacher": the pipeline scores pieces with the teacher once, then fits the selector
    on keeping those pieces (the shares are the positives', not answer containment's)."""
    import dataclasses

    import edgerag.train.compression_fit as compress
    from edgerag.train.compressed_student import fitted_compression, student_piece_embedder, student_prompter, \
        student_query_vectors
    from edgerag.train.retrieval import retrieve_for
    from edgerag.train.run import Run
    from edgerag.train.recipe import load_recipe

    _, out, _ = compressed_run
    recipe = load_recipe(out / "recipe.toml")
    recipe = dataclasses.replace(recipe, compress=dataclasses.replace(recipe.compress, fit_target="teacher"))
    run = Run(out, recipe)
    real, calls = compress.teacher_positives, []

    def recorded(teacher, prompter, questions, contexts, max_piece_words, **kw):
        calls.append(len(questions))
        return real(teacher, prompter, questions, contexts, max_piece_words, **kw)

    monkeypatch.setattr(compress, "teacher_positives", recorded)
    compression, shares = fitted_compression(run)
    questions = run.questions("train")[:recipe.compress.fit_questions]
    assert calls == [len(questions)]
    contexts = [[(p.title, p.text) for p in ranked] for ranked in retrieve_for(run, questions, recipe.compress.passages)]
    vectors, embedder, encode = student_query_vectors(run, questions), student_piece_embedder(run), student_prompter(run).encode
    from edgerag.models import load_generator
    from edgerag.train.teacher import Prompter

    teacher, tokenizer = load_generator(run.teacher_generator)
    positives = real(teacher, Prompter(tokenizer, recipe.prompt.max_prompt_tokens, recipe.prompt.max_answer_tokens),
                     questions, contexts, compression.max_piece_words)
    selector, expected = compress.fit_selector(compression, questions, vectors, contexts, embedder, encode, positives)
    assert shares == expected and compression.selector == selector
    _, by_answer = compress.fit_selector(compression, questions, vectors, contexts, embedder, encode)
    assert all(0 <= v <= 100 for v in shares.values()) and by_answer != shares or positives == [None] * len(questions)


def test_bundle_prompt_equals_the_training_prompt(compressed_run, compressed_bundle):
    """For the same question and passages, the device's compressed prompt is token for token the one
    the student was trained on (training: torch encoder + transformers tokenizer; device: the bundle's
    stored piece vectors + tokenizers)."""
    from edgerag.data import read_passages, read_questions
    from edgerag.models import load_tokenizer
    from edgerag.runtime import Pipeline
    from edgerag.train.compression_fit import PieceEmbedder, compressed_contexts
    from edgerag.train.teacher import Prompter

    tiny, out, _ = compressed_run
    pipeline = Pipeline.load(compressed_bundle)
    info = json.loads((out / "student" / "edgerag.json").read_text())
    compression = Compression.from_dict(info["compression"])
    prompter = Prompter(load_tokenizer(out / "student" / "generator"), info["max_prompt_tokens"], compact=True)
    embedder = PieceEmbedder(out / "student" / "query_encoder", compression.max_piece_words)
    corpus = {p.id: (p.title, p.text) for p in read_passages(out / "data" / "corpus.jsonl")}
    questions = read_questions(tiny["eval"])[:12]
    checked = 0
    for q in questions:
        vector = pipeline.encoder.encode([q.question])[0]
        rows, _ = pipeline.search(vector[None], compression.passages)
        found = [(d["title"], d["text"]) for d in pipeline.passages_at(rows[0])]
        device = pipeline.prompt_ids(q.question, pipeline.context(q.question, vector, found,
                                                                  pipeline.piece_vectors(rows[0])))
        trained = prompter.prompt(q.question, compressed_contexts(compression, [q.question], [vector], [found],
                                                                  embedder, prompter.encode)[0])
        assert device == trained, q.question
        assert all((t, x) in corpus.values() for t, x in found)
        checked += 1
    assert checked == len(questions)


def test_one_process_embeds_a_passages_pieces_once_per_encoder(compressed_run, tmp_path):
    """The stages of a run share a piece embedder per encoder (what its folder's files hold): the same
    passages are not embedded again, a passage's vectors are the same whatever came with it, a copy of
    the folder shares the embedder, and a folder whose files change gets its own."""
    import shutil

    from edgerag.data import read_passages
    from edgerag.train.compression_fit import PieceEmbedder, shared_piece_embedder

    _, out, _ = compressed_run
    folder = tmp_path / "encoder"
    shutil.copytree(out / "student" / "query_encoder", folder)
    passages = [(p.title, p.text) for p in read_passages(out / "data" / "corpus.jsonl")][:6]
    shared = shared_piece_embedder(folder, 24)
    assert shared_piece_embedder(folder, 24) is shared
    assert shared_piece_embedder(folder, 12) is not shared
    together = shared(passages)
    alone = PieceEmbedder(folder, 24)
    for passage, vectors in zip(passages, together):
        assert np.array_equal(vectors, alone([passage])[0])  # the same bytes: resumed runs read the same
    assert shared([passages[0]])[0] is together[0]  # from the cache, not embedded again
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert shared_piece_embedder(copy, 24) is shared  # the same files elsewhere: a student keeping the teacher's encoder
    config = folder / "config.json"
    tmp = folder / "config.json.tmp"
    tmp.write_text(config.read_text())
    tmp.replace(config)  # how a stage rewrites a folder: a new file
    assert shared_piece_embedder(folder, 24) is shared  # rewritten with the same bytes
    tmp.write_text(config.read_text() + "\n")
    tmp.replace(config)
    assert shared_piece_embedder(folder, 24) is not shared  # new contents, a new embedder


def test_a_runs_stages_share_the_piece_vectors(compressed_run, monkeypatch):
    """The student's distillation examples, built twice in one process (as teacher_logits and a later
    stage would), embed the pieces the first time only."""
    from edgerag.models import load_tokenizer
    from edgerag.train import compression_fit, retrieval
    from edgerag.train.compressed_student import compressed_student_examples
    from edgerag.train.decoder_only_stages import rag_examples
    from edgerag.train.recipe import load_recipe
    from edgerag.train.retrieval import retrieve_for
    from edgerag.train.run import Run
    from edgerag.train.teacher import Prompter

    _, out, _ = compressed_run
    run = Run(out, load_recipe(out / "recipe.toml", check_models=False))
    questions = run.questions("train")[:6]
    ranked = retrieve_for(run, questions, run.recipe.compress.passages)
    prompter = Prompter(load_tokenizer(run.teacher_generator), 384, 8)
    examples, _ = rag_examples(run, questions, prompter, 1, 1.0, seed_offset=2, ranked=ranked)
    monkeypatch.setattr(compression_fit, "_EMBEDDERS", {})  # the fixture's run, in this process, embedded them already
    texts = []
    real = retrieval.embed
    monkeypatch.setattr(retrieval, "embed", lambda model, tok, batch, *a, **k: texts.extend(batch) or real(model, tok, batch, *a, **k))
    first, _ = compressed_student_examples(run, questions, examples, ranked)
    embedded = len(texts)
    again, _ = compressed_student_examples(run, questions, examples, ranked)
    assert embedded > 0 and len(texts) == embedded  # the second time: every piece from the cache
    assert [e.prompt for e in first] == [e.prompt for e in again]


def test_bundle_answers_from_the_compressed_context(compressed_bundle, compressed_run):
    from edgerag.runtime import Pipeline

    pipeline = Pipeline.load(compressed_bundle)
    assert pipeline.manifest.compression is not None and pipeline.manifest.generation.k == 4
    answer = pipeline.ask("What was the purpose of the Third Crusade?")
    assert answer.context and "compress_ms" in answer.timings
    full = sum(len(pipeline.token_ids(p["text"])) for p in answer.passages)
    kept = sum(len(pipeline.token_ids(c["text"])) for c in answer.context)
    assert kept < full
    for piece in answer.context:  # every kept piece comes from a retrieved passage of that title
        assert any(p["title"] == piece["title"] for p in answer.passages)
    # a question over the whole budget still gets an answer: the prompt's truncation cuts the context first
    long = pipeline.ask("What was the purpose of the Third Crusade? " * 300)
    assert long.prompt_tokens <= pipeline.prompt_budget(pipeline.manifest.generation.max_new_tokens)
    # added passages get piece vectors too, and can be selected
    added = pipeline.add_passages([("new-1", "Zebra facts", "Zebras have black and white stripes. They live in Africa.")])
    assert added == 1
    answer = pipeline.ask("Where do zebras live?", k=pipeline.size)
    assert any(c["title"] == "Zebra facts" for c in answer.context)


def test_a_bundles_budget_is_set_at_load(tiny_bundle_compressed):
    from edgerag.runtime import Pipeline
    from edgerag.runtime.prompt import PromptError

    own, larger = Pipeline.load(tiny_bundle_compressed), Pipeline.load(tiny_bundle_compressed, budget=200)
    assert own.compression.budget == own.manifest.compression.budget < 200 and larger.compression.budget == 200
    question = "What was the purpose of the Third Crusade?"
    read = [sum(len(p.token_ids(c["text"])) for c in p.ask(question).context) for p in (own, larger)]
    assert read[0] < read[1]
    for budget in (0, own.manifest.generator.max_context):  # none, or more than the prompt holds
        with pytest.raises(PromptError, match="budget"):
            Pipeline.load(tiny_bundle_compressed, budget=budget)


def test_piece_file_is_checked(compressed_bundle, tmp_path):
    import shutil

    from edgerag.runtime import Pipeline
    from edgerag.runtime.manifest import file_record

    copy = tmp_path / "bundle"
    shutil.copytree(compressed_bundle, copy)
    path = copy / "pieces.bin"
    path.write_bytes(path.read_bytes()[:-16])  # a piece vector cut short
    with pytest.raises(BundleError, match="pieces.bin"):
        Pipeline.load(copy)  # the checksum
    manifest = read_manifest(copy)
    manifest.files["pieces.bin"] = file_record(path)
    manifest.write(copy)
    with pytest.raises(BundleError, match="pieces.bin .* bytes"):
        Pipeline.load(copy)  # checksum fixed up: its size still disagrees with the manifest's counts


def test_a_bundle_without_compression_reads_full_passages_and_says_so_once(tiny_bundle):
    from edgerag.runtime import Pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline = Pipeline.load(tiny_bundle)
    said = [w for w in caught if "compressed-context" in str(w.message)]
    assert len(said) == 1
    answer = pipeline.ask("What is the capital of France?")
    assert [c["text"] for c in answer.context] == [p["text"] for p in answer.passages]


def test_bench_runs_each_system_on_its_own_path(compressed_run, compressed_bundle, tmp_path):
    """By default the teacher reads its top-k passages whole and the bundle its compressed context; each
    row says how many prompt tokens that was. --shared-passages gives every system the same passages."""
    from edgerag.cli import main

    tiny, out, _ = compressed_run
    rows = {}
    for mode in ("own", "shared"):
        result = tmp_path / mode
        argv = ["bench", "--bundle", str(compressed_bundle), "--teacher", str(out / "teacher"), "--student",
                str(out / "student"), "--questions", str(tiny["eval"]), "--n", "3", "--threads", "1",
                "--systems", "teacher-torch,student-torch,bundle" if mode == "own" else "teacher-torch,bundle",
                "--index-sizes", "", "--index-corpus", "",
                "--quick-machine", "--max-new-tokens", "4", "--cache", str(tmp_path / "cache"), "--out", str(result)]
        assert main(argv + (["--shared-passages"] if mode == "shared" else [])) == 0
        rows[mode] = {r["name"]: r for r in json.loads((result / "results.json").read_text())["systems"]}
    own = rows["own"]
    assert set(own) == {"teacher-torch", "student-torch", "bundle-fp32"}
    assert own["bundle-fp32"]["mean_prompt_tokens"] < own["teacher-torch"]["mean_prompt_tokens"]
    assert own["student-torch"]["mean_prompt_tokens"] < own["teacher-torch"]["mean_prompt_tokens"]
    shared = rows["shared"]  # the bundle's top 4 for everyone: the teacher reads one passage more than its own 3
    assert shared["teacher-torch"]["mean_prompt_tokens"] > own["teacher-torch"]["mean_prompt_tokens"]
    assert shared["bundle-fp32"]["mean_prompt_tokens"] < shared["teacher-torch"]["mean_prompt_tokens"]
