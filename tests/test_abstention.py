"""Abstention: a generator that learned to answer NO_ANSWER where its passages cannot answer, the
confidence the device reads off its first step, the threshold fitted at export, and the figures of
`edgerag eval --unanswerable`."""

import json
import random

import numpy as np
import pytest

from edgerag.data import Passage, Question, holds_answer, unanswerable_passages
from edgerag.metrics import abstention_figures, fit_threshold
from edgerag.runtime import BundleError, Pipeline
from edgerag.runtime.generation import Abstention, Generation
from edgerag.runtime.prompt import NO_ANSWER

from conftest import streamed


# ---------------------------------------------------------------- the first step's decision

def generation(abstention, stop=(0,)):
    return Generation(lambda result: iter(()), set(stop), abstention=abstention)


def test_confidence_is_one_minus_the_no_answer_probability():
    logits = np.log(np.array([0.1, 0.2, 0.7], np.float32))
    assert Abstention([2], 0.5).confidence(logits) == pytest.approx(0.3, abs=1e-6)
    assert Abstention([1], 0.5).confidence(logits) == pytest.approx(0.8, abs=1e-6)
    assert Abstention([1, 2], 0.5).confidence(logits) == pytest.approx(0.1, abs=1e-6)  # every way to begin it


def test_below_the_threshold_the_generation_abstains_at_its_first_step():
    logits = np.log(np.array([0.05, 0.15, 0.8], np.float32))  # NO_ANSWER (2) is the likeliest
    g = generation(Abstention([2], 0.5))
    assert g.choose(logits) == 0  # a stop token: nothing is written
    assert g.abstained and g.confidence == pytest.approx(0.2, abs=1e-6)


def test_above_it_no_answer_is_ruled_out_and_the_best_other_token_chosen():
    logits = np.log(np.array([0.05, 0.15, 0.8], np.float32))
    g = generation(Abstention([2], 0.1))  # confidence 0.2 >= 0.1: answer
    assert g.choose(logits) == 1 and not g.abstained
    g.tokens.append(1)
    assert g.choose(logits) == 2  # only the first step is screened
    never = generation(Abstention([2], 0.0))  # 0: never abstain, the confidence is still taken
    assert never.choose(logits) == 1 and never.confidence == pytest.approx(0.2, abs=1e-6)


def test_drafted_steps_screen_the_first_position_alike():
    logits = np.log(np.array([[0.05, 0.15, 0.8], [0.1, 0.1, 0.8]], np.float32))
    g = generation(Abstention([2], 0.5))
    assert g.choose_checking(logits, np.array([1])).tolist() == [0] and g.abstained
    g = generation(Abstention([2], 0.1))
    assert g.choose_checking(logits, np.array([1])).tolist() == [1, 2] and not g.abstained


def test_a_confidence_that_reads_the_answer_settles_once_it_is_written():
    first = np.log(np.array([0.1, 0.3, 0.6], np.float32))  # 1 - P(NO_ANSWER) = 0.4; then token 1 at 0.3 / 0.4
    then = np.log(np.array([0.5, 0.25, 0.25], np.float32))  # the stop token at 0.5
    for threshold, abstains in ((0.3, True), (0.2, False)):
        g = generation(Abstention([2], threshold, reads_answer=True))
        assert g.choose(first) == 1 and not g.abstained and g.confidence == pytest.approx(0.4, abs=1e-6)
        g.tokens.append(1)
        assert g.choose(then) == 0
        g.settle()
        assert g.confidence == pytest.approx(0.4 * (0.75 * 0.5) ** 0.5, abs=1e-5)
        assert g.abstained == abstains and (g.stop_reason == "abstained") == abstains
    alone = generation(Abstention([2], 0.3))  # the first step's confidence alone: settling changes nothing
    alone.choose(first)
    alone.tokens.append(1)
    alone.choose(then)
    alone.settle()
    assert alone.confidence == pytest.approx(0.4, abs=1e-6) and not alone.abstained


def test_drafted_steps_score_only_the_tokens_they_keep():
    logits = np.log(np.array([[0.1, 0.3, 0.6], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]], np.float32))
    g = generation(Abstention([2], 0.0, reads_answer=True))
    # the first position picks 1 (NO_ANSWER ruled out), which rejects the draft [0, 2]: one token kept
    assert g.choose_checking(logits, np.array([0, 2])).tolist()[0] == 1
    g.tokens.append(1)
    g.settle()
    assert g.confidence == pytest.approx(0.4 * 0.75, abs=1e-5)


# ---------------------------------------------------------------- figures and the fitted threshold

def records(confidences_answerable, f1s, confidences_unanswerable):
    return ([{"answerable": True, "confidence": c, "f1": f, "em": float(f == 1.0)}
             for c, f in zip(confidences_answerable, f1s)]
            + [{"answerable": False, "confidence": c, "f1": 0.0, "em": 0.0} for c in confidences_unanswerable])


def test_squad2_figures_score_an_abstention_by_whether_the_question_had_an_answer():
    r = records([0.9, 0.2], [1.0, 0.5], [0.1, 0.8])
    figures = abstention_figures(r, 0.5)
    assert figures["has_answer_f1"] == 50.0  # the second answerable one abstained: 0
    assert figures["has_answer_f1_without_abstention"] == 75.0
    assert figures["no_answer_accuracy"] == 50.0
    assert figures["f1_overall"] == pytest.approx(100 * (1.0 + 0 + 1 + 0) / 4, abs=0.01)
    assert figures["f1_overall_without_abstention"] == pytest.approx(100 * 1.5 / 4, abs=0.01)
    assert abstention_figures(r, 0.0)["no_answer_accuracy"] == 0.0  # 0 never abstains


def test_the_fitted_threshold_separates_confidences_where_that_pays():
    r = records([0.9, 0.8, 0.7], [1.0, 1.0, 1.0], [0.1, 0.2, 0.75])
    t = fit_threshold(r)
    # abstains on the two low ones and keeps every right answer; above 0.75 it would trade one for one
    # (a tie, which goes to the lower threshold)
    assert 0.2 < t < 0.7
    assert abstention_figures(r, t)["f1_overall"] == pytest.approx(100 * 5 / 6, abs=0.01)
    wrong = records([0.9, 0.8, 0.7], [1.0, 1.0, 0.0], [0.1, 0.2, 0.75])
    assert 0.75 < fit_threshold(wrong) < 0.8  # a wrong answer costs nothing to abstain on
    assert 0.0 <= fit_threshold(records([0.5], [1.0], [])) <= 1.0


def test_the_fit_keeps_within_what_abstention_may_cost_the_answerable_questions():
    # abstaining below 0.7 would gain two more unanswerable ones and lose a right answer (1/3 of the F1)
    r = records([0.9, 0.8, 0.6], [1.0, 1.0, 1.0], [0.3, 0.5, 0.62, 0.63])
    free = fit_threshold(r, max_answer_cost=100.0)
    assert free > 0.62 and abstention_figures(r, free)["has_answer_abstained"] > 0
    bounded = fit_threshold(r, max_answer_cost=2.0)
    assert 0.3 < bounded < 0.6  # the two below the right answer, no more
    assert abstention_figures(r, bounded)["has_answer_f1"] == abstention_figures(r, bounded)["has_answer_f1_without_abstention"]


# ---------------------------------------------------------------- unanswerable passages

def test_unanswerable_passages_never_hold_the_gold_passage_or_an_answer():
    q = Question("q", "Who won?", ("Denver Broncos",), "gold", "Super Bowl 50", "The Denver Broncos won.")
    ranked = [Passage("gold", "Super Bowl 50", "The Denver Broncos won."),
              Passage("a", "Super Bowl 50", "The denver broncos played in Santa Clara."),
              Passage("b", "Super Bowl 50", "The game was at Levi's Stadium."),
              Passage("c", "Warsaw", "Warsaw is the capital of Poland.")]
    pool = ranked + [Passage("d", "Oxygen", "Oxygen has atomic number 8."), Passage("e", "Oxygen", "It is a gas.")]
    rng = random.Random(0)
    for _ in range(40):
        found = unanswerable_passages(q, ranked, pool, 2, rng)
        assert found and all(p.id != "gold" and not holds_answer(p.text, q) for p in found)
    with pytest.raises(ValueError, match="another article"):
        unanswerable_passages(q, ranked[:1], ranked[:1], 1, random.Random(1))


def test_an_answer_is_held_as_words_of_its_own_and_a_common_one_rules_out_no_article():
    q = Question("q", "How many?", ("1",), "gold", "Counts", "It was 1.")
    assert not holds_answer("founded in 1990", q) and holds_answer("won 1 game", q)
    pool = [Passage("a", "Other", "Team A won 1 game."), Passage("b", "Other", "Team B won 1 game too.")]
    found = unanswerable_passages(q, [], pool, 1, random.Random(0))  # every other article holds "1": still paired
    assert found and found[0].title == "Other"


# ---------------------------------------------------------------- a tiny generator that learned it

@pytest.fixture(scope="module")
def abstaining_bundle(tiny_models, tmp_path_factory):
    """The tiny generator fine-tuned on a handful of questions: each over its own passage -> its answer,
    and over two unrelated passages -> NO_ANSWER; exported with its threshold fitted on them."""
    pytest.importorskip("torch")
    from edgerag.data import read_squad
    from edgerag.export import ExportOptions
    from edgerag.export.bundle import export_bundle
    from edgerag.models import load_generator
    from edgerag.train import loop
    from edgerag.train.teacher import Prompter, answer_loss, make_examples

    encoder, generator, jsonl, squad = tiny_models
    passages, questions, _ = read_squad(squad)
    unrelated = [p for p in passages if p.title in ("Geology", "Pharmacy")]
    model, tok = load_generator(generator)
    prompter = Prompter(tok, 200, 12)
    examples = make_examples(prompter, questions, [[(q.title, q.context)] for q in questions])
    for p in unrelated:
        examples += make_examples(prompter, questions, [[(p.title, p.text)]] * len(questions), [NO_ANSWER] * len(questions))
    root = tmp_path_factory.mktemp("abstaining")
    loop.train(model, examples, lambda m, b: (answer_loss(m, b, tok.pad_token_id), {}),
               loop.TrainConfig(epochs=60, batch_size=4, lr=3e-3, warmup_steps=5, checkpoint_every=10_000),
               root / "stage", desc="tiny abstention")
    loop.save_pretrained_atomic(model, tok, root / "generator")
    options = ExportOptions(quantize="none", quantize_encoder="none", max_new_tokens=12, max_context=256,
                            parity_questions=2, k=1)
    bundle = export_bundle(str(encoder), str(root / "generator"), jsonl, root / "bundle", options=options,
                           calibration=questions)
    return bundle, questions, unrelated


def test_a_question_over_an_unrelated_passage_abstains_and_over_its_own_answers(abstaining_bundle):
    bundle, questions, unrelated = abstaining_bundle
    pipeline = Pipeline.load(bundle, abstain_threshold=0.5, answers="free")
    for q in questions:
        refused = pipeline.answer_with_passages(q.question, [(unrelated[0].title, unrelated[0].text)])
        assert refused.abstained and refused.answer == "" and refused.stop_reason == "abstained"
        assert refused.confidence < 0.5 and refused.citations == []
        answered = pipeline.answer_with_passages(q.question, [(q.title, q.context)])
        assert not answered.abstained and answered.confidence >= 0.5
        assert answered.answer == q.answers[0]
        assert answered.supported  # the answer is cited in its passage


def test_the_bundle_carries_its_fitted_threshold_and_a_load_may_override_it(abstaining_bundle):
    bundle, questions, unrelated = abstaining_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["abstention"]
    assert spec["no_answer"] == NO_ANSWER and 0.0 <= spec["threshold"] <= 1.0
    assert spec["fitted"]["questions"] == len(questions)
    assert Pipeline.load(bundle).abstain_threshold == spec["threshold"]
    never = Pipeline.load(bundle, abstain_threshold=0.0, answers="free")
    forced = never.answer_with_passages(questions[0].question, [(unrelated[0].title, unrelated[0].text)])
    assert not forced.abstained and forced.answer and forced.answer != NO_ANSWER  # ruled out at the first step
    assert forced.confidence < 0.5


def test_an_answer_that_may_yet_abstain_is_streamed_whole_once_settled(abstaining_bundle):
    bundle, questions, _ = abstaining_bundle
    assert json.loads((bundle / "manifest.json").read_text())["abstention"]["confidence"] == "answer"
    # what a bundle that never holds an answer back streams: the first step's confidence alone
    unheld = Pipeline.load(bundle, abstain_threshold=0.0, answers="free")
    unheld.manifest.abstention.confidence = "no_answer"
    for threshold in (0.0, 0.5):
        pipeline = Pipeline.load(bundle, abstain_threshold=threshold, answers="free")
        for q in questions:
            pieces, answer = streamed(pipeline.stream(q.question))
            assert "".join(pieces).strip() == answer.answer
            if threshold > 0:  # held back until settled: one piece, or none for an abstention
                assert len(pieces) == (0 if answer.abstained else 1)
            else:  # never abstains: streamed as written, piece by piece as a bundle that never holds
                # (not one piece a token: a repeating tail is held until it breaks, then sent at once)
                assert not answer.abstained and pieces == streamed(unheld.stream(q.question))[0]


def test_a_bundle_of_the_first_step_confidence_decides_there(abstaining_bundle, tmp_path):
    import shutil

    from edgerag.runtime import Manifest

    bundle, questions, unrelated = abstaining_bundle
    older = tmp_path / "older"
    shutil.copytree(bundle, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["abstention"]["confidence"]  # as bundles exported before the key was written
    Manifest.from_dict(manifest).write(older)
    q = questions[0]
    for passage in [(q.title, q.context), (unrelated[0].title, unrelated[0].text)]:
        first_step = Pipeline.load(older, abstain_threshold=0.0, answers="free").answer_with_passages(q.question, [passage])
        reading = Pipeline.load(bundle, abstain_threshold=0.0, answers="free").answer_with_passages(q.question, [passage])
        assert first_step.answer == reading.answer
        assert reading.confidence <= first_step.confidence  # times a mean probability, at most 1
    assert json.loads((older / "manifest.json").read_text())["abstention"]["confidence"] == "no_answer"
    manifest["abstention"]["confidence"] = "tokens"
    with pytest.raises(BundleError, match="abstention.confidence is 'tokens'; it must be one of no_answer, answer"):
        Manifest.from_dict(manifest)


def test_eval_unanswerable_reports_squad2_figures_and_citations(abstaining_bundle, tmp_path):
    from edgerag.evaluation import evaluate_model

    bundle, questions, _ = abstaining_bundle
    squad = tmp_path / "q.json"
    squad.write_text(json.dumps({"version": "1.1", "data": [
        {"title": q.title, "paragraphs": [{"context": q.context, "qas": [
            {"id": q.id, "question": q.question, "answers": [{"text": q.answers[0], "answer_start": 0}]}]}]}
        for q in questions]}))
    result = evaluate_model(bundle, squad, unanswerable=0.5, answers="free")
    a = result["abstention"]
    assert a["answerable"] == a["unanswerable"] == len(questions) // 2
    for key in ("f1_overall", "f1_overall_without_abstention", "has_answer_f1", "has_answer_f1_without_abstention",
                "no_answer_accuracy"):
        assert 0.0 <= a[key] <= 100.0
    assert a["has_answer_f1"] <= a["has_answer_f1_without_abstention"]
    assert set(result["citations"]) >= {"with_citation", "citation_holds_gold", "verbatim_cited"}


def test_serve_says_whether_it_abstained_in_both_apis(abstaining_bundle, live_server):
    openai = pytest.importorskip("openai")
    import urllib.request

    bundle, questions, _ = abstaining_bundle
    confidences = sorted(Pipeline.load(bundle, abstain_threshold=0.0, answers="free").ask(q.question).confidence
                         for q in questions)
    threshold = (confidences[0] + confidences[-1]) / 2  # between the least and the most confident: both kinds
    pipeline = Pipeline.load(bundle, abstain_threshold=threshold, answers="free")
    expected = [pipeline.ask(q.question) for q in questions]
    assert {a.abstained for a in expected} == {True, False}
    with live_server("--abstain-threshold", repr(threshold), "--answers", "free", bundle=bundle) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for q, want in zip(questions, expected):
            reply = client.chat.completions.create(model="edgerag", messages=[{"role": "user", "content": q.question}])
            assert reply.model_extra["abstained"] == want.abstained
            assert reply.model_extra["confidence"] == pytest.approx(want.confidence, abs=1e-4)
            assert reply.choices[0].message.content == want.answer
            last = list(client.chat.completions.create(model="edgerag", stream=True,
                                                       messages=[{"role": "user", "content": q.question}]))[-1]
            assert last.model_extra["abstained"] == want.abstained  # the stream's last chunk says it too
            request = urllib.request.Request(url + "/v1/ask", data=json.dumps({"question": q.question}).encode(),
                                             headers={"Content-Type": "application/json"})
            record = json.loads(urllib.request.urlopen(request).read())
            assert (record["abstained"], record["answer"]) == (want.abstained, want.answer)


# ---------------------------------------------------------------- a run that learns it, compressed

def test_a_compressed_run_with_negatives_learns_reports_and_exports_abstention(tmp_path):
    torch = pytest.importorskip("torch")
    from edgerag.cli import main
    from edgerag.train.driver import distill
    from edgerag.train.teacher import NEGATIVE_ID
    from edgerag.train.tiny import make_tiny_project

    tiny = make_tiny_project(tmp_path / "tiny")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tiny["recipe"].read_text().replace("[eval]", "[eval]\nunanswerable = 0.5")
                      + "\n[compress]\nenabled = true\npassages = 4\nbudget = 40\nfit_questions = 20\n"
                      + "\n[abstain]\nnegatives = 0.25\ncalibration_questions = 10\n")
    out = tmp_path / "run"
    report = distill(recipe, out)
    torch.set_flush_denormal(False)  # evaluation turns it on; later tests' float strategies need subnormals
    for side in ("teacher", "student"):  # both sides scored on the same mix
        figures = report[side]["abstention"]
        assert figures["answerable"] + figures["unanswerable"] == report["n_questions"]
        assert 0.0 <= figures["no_answer_accuracy"] <= 100.0
    finetune = json.loads((out / "stages" / "teacher_finetune" / "info.json").read_text())
    kd = json.loads((out / "stages" / "teacher_logits" / "info.json").read_text())
    assert finetune["negatives"] > 0 and kd["negatives"] > 0
    saved = torch.load(out / "stages" / "teacher_logits" / "cache.pt", weights_only=False)
    negatives = [e for e in saved["examples"] if e["question_id"].endswith(NEGATIVE_ID)]
    assert len(negatives) == kd["negatives"]  # each with the student's compressed prompt, matched by its own id
    assert len({tuple(e["prompt"]) for e in negatives}) == len(negatives)
    assert (out / "student" / "calibration.jsonl").read_text().count("\n") == 10
    bundle = tmp_path / "bundle"
    assert main(["export", str(out / "student"), "--passages", str(out / "data" / "corpus.jsonl"), "--out", str(bundle),
                 "--quantize", "none"]) == 0
    spec = json.loads((bundle / "manifest.json").read_text())["abstention"]
    assert spec["fitted"]["questions"] == 10 and 0.0 <= spec["threshold"] <= 1.0 and spec["token_ids"]
    answer = Pipeline.load(bundle).ask("What is the capital of Poland?")
    assert answer.confidence is not None and answer.abstained == (answer.confidence < spec["threshold"])
    # the run's teacher learned to abstain too: with the run's calibration file it exports as a bundle alike
    teacher_bundle = tmp_path / "teacher-bundle"
    assert main(["export", str(out / "teacher"), "--calibration", str(out / "student" / "calibration.jsonl"),
                 "--passages", str(out / "data" / "corpus.jsonl"), "--out", str(teacher_bundle), "--quantize", "none"]) == 0
    manifest = json.loads((teacher_bundle / "manifest.json").read_text())
    assert manifest["abstention"]["fitted"]["questions"] == 10 and manifest["abstention"]["token_ids"]
    teacher_info = json.loads((out / "teacher" / "edgerag.json").read_text())
    assert bool(manifest.get("compression")) == bool(teacher_info.get("compression"))  # it reads what it was fine-tuned on


# ---------------------------------------------------------------- bad input

def test_a_calibration_file_with_a_bad_line_is_refused_with_its_line_before_any_model_loads(tmp_path, capsys):
    from edgerag.cli import main

    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text('{"id": "q1", "question": "Q?", "answers": ["C"], "passage_id": "p1", "title": "T", "context": "C"}\n{not json\n')
    code = main(["export", str(tmp_path / "no-such-folder"), "--calibration", str(calibration),
                 "--passages", str(calibration), "--out", str(tmp_path / "bundle")])
    assert code != 0 and "calibration.jsonl, line 2" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", True, float("nan")])
def test_a_threshold_outside_0_1_or_not_a_number_is_refused_with_the_range(tiny_bundle, bad):
    with pytest.raises(ValueError, match="from 0 to 1"):
        Pipeline.load(tiny_bundle, abstain_threshold=bad)


def test_serve_options_refuse_a_bad_threshold():
    from edgerag.runtime.http_answers import ServeOptions

    with pytest.raises(ValueError, match="from 0 to 1"):
        ServeOptions(abstain_threshold=2).check()


def test_a_bundle_without_abstention_always_answers_and_has_no_confidence(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle, abstain_threshold=0.9)
    assert pipeline.abstain_threshold is None
    answer = pipeline.ask("What is the capital of Poland?", max_new_tokens=4)
    assert not answer.abstained and answer.confidence is None


def test_an_empty_corpus_abstains_instead_of_crashing(tiny_bundle, tmp_path):
    pipeline = Pipeline.load(tiny_bundle)
    pipeline.size = 0  # what a bundle whose documents were all removed retrieves from
    answer = pipeline.ask("What is the capital of Poland?")
    assert answer.abstained and answer.answer == "" and answer.passages == [] and answer.stop_reason == "abstained"


def test_a_manifest_threshold_outside_0_1_is_a_bundle_error(tiny_bundle):
    from edgerag.runtime import Manifest

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["abstention"] = {"no_answer": NO_ANSWER, "token_ids": [5], "threshold": 1.5}
    with pytest.raises(BundleError, match=r"abstention.threshold is 1.5; it must be in \[0, 1\]"):
        Manifest.from_dict(manifest)
    manifest["abstention"].update(threshold=0.5, token_ids=[5, 10**9])
    with pytest.raises(BundleError, match="abstention.token_ids"):
        Manifest.from_dict(manifest)
    manifest["abstention"]["token_ids"] = [5]
    assert Manifest.from_dict(manifest).abstention.threshold == 0.5
