"""The Hugging Face RAG family on tiny random checkpoints built by edgerag.train.tiny and loaded with
from_pretrained: the RAG-token marginal against RagTokenForGeneration's own, gradient matching,
distillation, and `edgerag distill recipes/rag-token-tiny.toml` -> export -> ask, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
BASE_VENV = ROOT / ".venv-base"
QUESTION = "Which NFL team represented the AFC at Super Bowl 50?"


def edgerag(*args, python=sys.executable, env=None):
    return subprocess.run([str(python), "-m", "edgerag.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture(scope="session")
def tiny_rag(tmp_path_factory):
    from edgerag.train.tiny import make_tiny_rag

    folder = tmp_path_factory.mktemp("tiny-rag")
    return {**make_tiny_rag(folder), "sequence": make_tiny_rag(folder / "seq", kind="sequence")["rag"]}


@pytest.fixture(scope="session")
def rag_run(tmp_path_factory):
    """The tiny recipe through the CLI, its student exported fp32 (exact parity) and int8wo (the default)."""
    folder = tmp_path_factory.mktemp("rag-run")
    env = {"EDGERAG_CACHE": str(folder / "cache")}  # the tiny checkpoint is built here, on first use
    run = folder / "run"
    result = edgerag("distill", ROOT / "recipes" / "rag-token-tiny.toml", "--out", run, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    bundles = {}
    for quantize in ("none", "auto"):
        bundles[quantize] = folder / f"bundle-{quantize}"
        result = edgerag("export", run / "student", "--passages", ROOT.parent / "shared" / "data" / "xquad-en.json.gz",
                         "--out", bundles[quantize], "--quantize", quantize, "--parity-questions", "4", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    return {"run": run, "bundle": bundles["auto"], "bundle_fp32": bundles["none"], "env": env}


def _contexts(tokenizer, n, seed=0):
    rng = np.random.default_rng(seed)
    words = "the Denver Broncos won Super Bowl 50 at Levi's Stadium in Santa Clara Warsaw is the capital".split()
    texts = [" ".join(rng.choice(words, size=12)) for _ in range(n)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_marginal_equals_rag_tokens_own(tiny_rag):
    from edgerag.train.rag_model import load_rag, rag_marginal

    model, tok = load_rag(tiny_rag["rag"])
    n, batch = 3, 2
    ids, mask = _contexts(tok.generator, n * batch)
    doc_scores = torch.randn(batch, n, generator=torch.Generator().manual_seed(1)) * 3
    labels = torch.tensor([[0, 30, 41, 57, 2], [0, 99, 2, 1, 1]])
    with torch.no_grad():
        out = model(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores, n_docs=n,
                    decoder_input_ids=labels)
        ours = rag_marginal(out.logits, out.doc_scores, n)
        theirs = model.marginalize(out.logits, out.doc_scores, n)
        assert torch.allclose(ours, theirs, atol=1e-5)
        # the loss RAG-token trains with is the marginal's NLL of the next token (pads excluded)
        target = torch.cat([labels[:, 1:], labels.new_full((batch, 1), 1)], 1)
        ll = ours.gather(-1, target[..., None])[..., 0].masked_fill(target.eq(1), 0).sum(1)
        assert torch.allclose(-ll, model.get_nll(out.logits, out.doc_scores, labels, n_docs=n), atol=1e-5)
        # and our own path (generator + doc scores, no RagModel) gives the same numbers
        gen_logits = model.generator(input_ids=ids, attention_mask=mask,
                                     decoder_input_ids=labels.repeat_interleave(n, 0)).logits
        assert torch.allclose(rag_marginal(gen_logits, doc_scores, n), theirs, atol=1e-5)


def test_same_marginal_serves_rag_sequence(tiny_rag):
    from edgerag.train.rag_model import load_rag, rag_marginal

    token, tok = load_rag(tiny_rag["rag"])
    sequence, _ = load_rag(tiny_rag["sequence"])
    assert type(sequence).__name__ == "RagSequenceForGeneration"
    ids, mask = _contexts(tok.generator, 2)
    dec = torch.tensor([[2, 0, 40]]).repeat(2, 1)
    scores = torch.tensor([[1.0, -0.5]])
    with torch.no_grad():
        a = rag_marginal(token.generator(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, scores, 2)
        b = rag_marginal(sequence.generator(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, scores, 2)
    assert torch.allclose(a, b, atol=1e-6)  # same weights (same seed): one marginal for both kinds


def test_marginal_greedy_agrees_with_rag_generate(tiny_rag):
    from edgerag.data import Passage, Question
    from edgerag.train.rag_model import load_rag, make_rag_examples, marginal_generate, rag_generate

    import random

    model, tok = load_rag(tiny_rag["rag"])
    with torch.no_grad():
        model.generator.get_input_embeddings().weight.normal_(0, 1.0)  # break the near-ties of random logits
    corpus = [Passage(f"p{i}", t, x) for i, (t, x) in enumerate([
        ("Super Bowl 50", "The Denver Broncos defeated the Carolina Panthers."), ("Warsaw", "Warsaw is the capital of Poland."),
        ("Oxygen", "Oxygen has atomic number 8."), ("Tesla", "Tesla worked on alternating current.")])]
    questions = [Question(f"q{i}", q, ("x",), "p0", "", "") for i, q in enumerate(["Who won?", "What is the capital?"])]
    examples = make_rag_examples(questions, [[0, 1, 2], [1, 3, 0]], corpus, tok.generator, model.generator, 3,
                                 128, 8, 0.0, random.Random(0), {})
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    ours = marginal_generate(model.generator, examples, scores, 1, 6)
    theirs = rag_generate(model, examples, scores, 1, 6)
    assert ours == theirs and any(ours)


def _tiny_bart(seed=0, layers=2):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                        init_std=0.3, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return BartForConditionalGeneration(config).eval()


def _answer_ll(model, ids, dec, labels):
    def forward(embeds):
        logits = model(inputs_embeds=embeds, decoder_input_ids=dec).logits
        return torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0].sum(-1)
    return forward


def test_input_gradient_matches_finite_differences():
    from edgerag.train.gradient import input_gradient

    model = _tiny_bart().double()
    ids, dec, labels = torch.tensor([[0, 5, 9, 13, 2]]), torch.tensor([[2, 7, 11]]), torch.tensor([[7, 11, 2]])
    forward = _answer_ll(model, ids, dec, labels)
    _, grad = input_gradient(model, forward, ids, create_graph=False)
    embeds = model.get_input_embeddings()(ids).detach()
    direction = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        numeric = (forward(embeds + eps * direction) - forward(embeds - eps * direction)) / (2 * eps)
    assert torch.allclose((grad * direction).sum(), numeric.sum(), rtol=1e-6, atol=1e-8)


def test_gradient_matching_loss_passes_gradcheck():
    """The term's own gradient (a second backward pass) against finite differences, in float64."""
    from edgerag.train.gradient import input_gradient, matching_loss, project, projection, token_space_map

    student, teacher = _tiny_bart(0, layers=1).double(), _tiny_bart(1).double()
    for m in (student, teacher):
        m.config._attn_implementation = "eager"
    ids, dec, labels = torch.tensor([[0, 5, 9, 2]]), torch.tensor([[2, 7]]), torch.tensor([[7, 2]])
    mask = torch.ones_like(ids)
    P = projection(64, 4).double()
    _, t_grad = input_gradient(teacher, _answer_ll(teacher, ids, dec, labels), ids, create_graph=False)
    target = project(t_grad, mask, token_space_map(teacher, P).detach()).detach()
    fc2 = student.model.decoder.layers[0].fc2
    start = fc2.weight.detach().clone()
    del fc2.weight  # the weight becomes the checked function's input

    def loss_of(w):
        fc2.weight = w
        _, s_grad = input_gradient(student, _answer_ll(student, ids, dec, labels), ids, create_graph=True)
        return matching_loss([project(s_grad, mask, token_space_map(student, P).double())], [target])

    w = start.requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (w,), eps=1e-6, atol=1e-5)


def test_gradient_matching_decreases_in_training():
    from edgerag.train.gradient import input_gradient, matching_loss, project, projection, token_space_map

    student, teacher = _tiny_bart(0, layers=1), _tiny_bart(1)
    student.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (4, 10), generator=g)
    dec, labels = torch.randint(4, 64, (4, 3), generator=g), torch.randint(4, 64, (4, 3), generator=g)
    mask = torch.ones_like(ids)
    P = projection(64, 8)
    _, t_grad = input_gradient(teacher, _answer_ll(teacher, ids, dec, labels), ids, create_graph=False)
    targets = list(project(t_grad, mask, token_space_map(teacher, P)).detach())
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, s_grad = input_gradient(student, _answer_ll(student, ids, dec, labels), ids, create_graph=True)
        loss = matching_loss(list(project(s_grad, mask, token_space_map(student, P))), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_tiny_recipe_distills_toward_the_marginal(rag_run):
    """Distillation lowers the KL from the teacher's RAG-token marginal to the student, on its KD examples."""
    from transformers import BartForConditionalGeneration

    from edgerag.train.distill import kl_to_topk
    from edgerag.train.rag_model import RagExample, answer_logits

    run = rag_run["run"]
    saved = torch.load(run / "stages" / "teacher_logits" / "cache.pt", weights_only=False)
    examples = [RagExample(**e) for e in saved["examples"]]

    def kl(folder):
        model = BartForConditionalGeneration.from_pretrained(folder).eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for e, cache in zip(examples, saved["cache"]):
                logits = answer_logits(model, [e.concatenated], [e.decoder], model.config.pad_token_id)[0]
                total += float(kl_to_topk(torch.log_softmax(logits.float() / 2.0, -1), cache))
                n += len(e.target)
        return total / n

    before, after = kl(run / "stages" / "student_init" / "generator"), kl(run / "student" / "generator")
    assert after < before, (before, after)
    log = [json.loads(line) for line in (run / "stages" / "distill_generator" / "log.jsonl").read_text().splitlines()]
    assert "gradient" in log[0]  # the recipe switches gradient matching on
    report = json.loads((run / "eval.json").read_text())
    for side in ("teacher", "student"):
        assert {"em", "f1", "recall@5", "prompt_tokens", "answer_in_context"} <= set(report[side])
    assert report["student"]["prompt_tokens"] < report["teacher"]["prompt_tokens"]  # one context instead of k


def test_encoder_decoder_bundle_gives_pytorchs_greedy_tokens(rag_run):
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from edgerag.runtime import Pipeline
    from edgerag.train.rag_model import context_ids, encode_with

    run, bundle = rag_run["run"], rag_run["bundle_fp32"]
    pipeline = Pipeline.load(bundle)
    assert pipeline.manifest.generator.family == "encoder-decoder"
    assert pipeline.manifest.query_encoder.normalized is False
    model = BartForConditionalGeneration.from_pretrained(run / "student" / "generator").eval()
    tok = AutoTokenizer.from_pretrained(run / "student" / "generator")
    info = json.loads((run / "student" / "edgerag.json").read_text())
    questions = [QUESTION, "What is the capital of Poland?", "Who discovered oxygen?"]
    for question in questions:
        passages = [(p["title"], p["text"]) for p in pipeline.retrieve(question, 3)]
        prompt = pipeline.prompt_ids(question, passages)
        # the device's prompt is the one the student was trained on
        assert prompt == context_ids(encode_with(tok), question, passages, info["max_prompt_tokens"])
        ours = pipeline.generator.greedy(prompt, 8).tokens
        theirs = model.generate(input_ids=torch.tensor([prompt]), num_beams=1, do_sample=False, max_new_tokens=8,
                                forced_eos_token_id=None)[0].tolist()[1:]
        stop = model.config.eos_token_id
        assert ours == (theirs[:theirs.index(stop)] if stop in theirs else theirs)
    assert pipeline.manifest.parity["generator"]["fp32"]["greedy_exact_match"] == 1.0


def test_encoder_decoder_bundle_answers_and_streams(rag_run):
    from edgerag.runtime import Pipeline

    pipeline = Pipeline.load(rag_run["bundle"])
    answer = pipeline.ask(QUESTION, max_new_tokens=6)
    assert answer.stop_reason in ("stop", "length", "repetition") and len(answer.passages) == 3
    assert "".join(pipeline.stream(QUESTION, max_new_tokens=6)) == answer.answer
    assert [a.answer for a in pipeline.ask_batch([QUESTION], max_new_tokens=6)] == [answer.answer]
    long_question = "why " * 5000  # far over the encoder's context: cut, not a crash
    assert pipeline.ask(long_question, max_new_tokens=2).prompt_tokens <= pipeline.manifest.generator.max_context
    assert pipeline.manifest.generator.quantization["method"] == "int8wo"


@pytest.mark.skipif(not (BASE_VENV / "bin" / "python").exists(), reason="make install-base builds .venv-base")
def test_encoder_decoder_bundle_answers_on_base_install(rag_run):
    result = edgerag("ask", rag_run["bundle"], QUESTION, "--json", "--max-new-tokens", "4", python=BASE_VENV / "bin" / "python")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["passages"] and "answer" in record


def test_hf_rag_recipe_needs_its_checkpoints(tmp_path):
    from edgerag.train.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('[teacher]\nkind = "hf-rag"\nrag = "edgerag-tiny/rag-token"\n')
    with pytest.raises(RecipeError, match="context_encoder"):
        load_recipe(recipe)
    recipe.write_text('[teacher]\nkind = "rag"\n')
    with pytest.raises(RecipeError, match="teacher.kind"):
        load_recipe(recipe)


def test_bench_has_rows_for_the_encoder_decoder_family(rag_run, tmp_path):
    run = rag_run["run"]
    result = edgerag("bench", "--bundle", rag_run["bundle"], "--teacher", run / "teacher", "--student", run / "student",
                     "--systems", "teacher-torch,student-torch,bundle", "--questions",
                     ROOT.parent / "shared" / "data" / "xquad-en.json.gz", "--n", "4", "--threads", "1",
                     "--index-sizes", "", "--index-corpus", "", "--quick-machine", "--out", tmp_path / "bench")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    rows = {r["name"]: r for r in results["systems"]}
    assert {"teacher-torch", "student-torch", "bundle-int8wo"} <= set(rows), list(rows)
    # the teacher reads one context per passage, the student one context holding them all
    prompts = {name: rows[name]["mean_prompt_tokens"] for name in rows}
    assert prompts["student-torch"] == prompts["bundle-int8wo"] < prompts["teacher-torch"], prompts


def test_marginalized_student_reads_like_the_teacher(rag_run, tmp_path):
    """The other reading: one passage at a time, marginalized with the student's own doc scores.
    Seeded from the concatenated run, whose teacher, index and student encoder it shares."""
    recipe = tmp_path / "marginalized.toml"
    recipe.write_text((ROOT / "recipes" / "rag-token-tiny.toml").read_text()
                      .replace('reading = "concatenated"', 'reading = "marginalized"'))
    run = tmp_path / "run"
    result = edgerag("distill", recipe, "--out", run, "--seed-from", rag_run["run"], env=rag_run["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[teacher_finetune] seeded" in result.stdout and "[distill_encoder] seeded" in result.stdout
    report = json.loads((run / "eval.json").read_text())
    assert report["student"]["reading"] == "marginalized"
    # k contexts, one per passage, as the teacher reads them (its passages may differ: the student
    # retrieves with its own distilled encoder), not the concatenated student's single one
    concatenated = json.loads((rag_run["run"] / "eval.json").read_text())["student"]["prompt_tokens"]
    assert report["student"]["prompt_tokens"] > concatenated
    assert report["student"]["prompt_tokens"] == pytest.approx(report["teacher"]["prompt_tokens"], rel=0.05)
    passages = ROOT.parent / "shared" / "data" / "xquad-en.json.gz"
    refused = edgerag("export", run / "student", "--passages", passages, "--out", tmp_path / "b", env=rag_run["env"])
    assert refused.returncode == 1 and "--k 1" in refused.stderr and not (tmp_path / "b").exists()


def test_a_rag_student_can_keep_the_teachers_question_encoder(rag_run, tmp_path):
    """student.query_encoder = "teacher": the DPR question encoder is copied, not cut and distilled."""
    import torch
    from safetensors.torch import load_file

    from edgerag.models import load_encoder

    recipe = tmp_path / "teacher-encoder.toml"
    recipe.write_text((ROOT / "recipes" / "rag-token-tiny.toml").read_text()
                      .replace("encoder_layers = 1           # DPR question encoder layers kept", 'query_encoder = "teacher"'))
    run = tmp_path / "run"
    result = edgerag("distill", recipe, "--out", run, "--seed-from", rag_run["run"], "--stop-after", "distill_encoder",
                     env=rag_run["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the student keeps the teacher's query encoder" in result.stdout
    teacher, student = (load_file(run / side / "query_encoder" / "model.safetensors") for side in ("teacher", "student"))
    assert teacher.keys() == student.keys() and all(torch.equal(teacher[k], student[k]) for k in teacher)
    teacher = load_encoder(run / "teacher" / "query_encoder")[0]
    cut = load_encoder(rag_run["run"] / "student" / "query_encoder")[0]
    assert cut.config.num_hidden_layers < teacher.config.num_hidden_layers


def test_a_forced_bos_is_read_not_predicted(tiny_rag, tmp_path):
    """bart-large forces <s> after the start token: training, PyTorch's generate and the device must
    all read [start, <s>] and predict the answer from there (save_pretrained moves the setting into
    generation_config, where generate() reads it)."""
    import random

    from transformers import BartForConditionalGeneration

    from edgerag.data import Passage, Question
    from edgerag.train.rag_model import answer_logits, concatenated_generate, decoder_prefix, load_rag, make_rag_examples

    model, tok = load_rag(tiny_rag["rag"])
    generator = model.generator
    generator.config.forced_bos_token_id = 0
    generator.generation_config.forced_bos_token_id = 0
    generator.save_pretrained(tmp_path)
    loaded = BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert decoder_prefix(loaded) == [2, 0]
    question = Question("q", "Who won?", ("Denver Broncos",), "p0", "", "")
    e, = make_rag_examples([question], [[0]], [Passage("p0", "Super Bowl 50", "The Broncos won.")], tok.generator,
                           loaded, 1, 64, 8, 0.0, random.Random(0), {})
    assert e.decoder[:2] == [2, 0] and e.target[-1] == 2 and len(e.decoder) == len(e.target) + 1
    with torch.no_grad():
        logits = answer_logits(loaded, [e.concatenated], [e.decoder], 1)
        full = loaded(input_ids=torch.tensor([e.concatenated]), decoder_input_ids=torch.tensor([e.decoder])).logits
    assert logits.shape[1] == len(e.target) and torch.equal(logits, full[:, 1:])
    tokens, = concatenated_generate(loaded, [e.concatenated], 1, 5)
    assert len(tokens) <= 5 and tokens[:1] != [0]


def test_encoder_decoder_span_answers_cite_their_sentence(rag_run):
    from edgerag.runtime import Pipeline

    pipeline = Pipeline.load(rag_run["bundle"], answers="spans")
    for question in (QUESTION, "What is the capital of Poland?", "Who were the Normans?"):
        answer = pipeline.ask(question, max_new_tokens=6)
        if answer.answer:
            citation, = answer.citations
            stored = next(p["text"] for p in answer.passages if p["id"] == citation["passage_id"])
            assert stored[citation["sentence_start"]:citation["sentence_end"]] == citation["sentence"]
            assert " ".join(stored[citation["answer_start"]:citation["answer_end"]].split()).casefold() == \
                " ".join(answer.answer.split()).casefold()
