"""Training's cheaper steps: batches of similar lengths, bf16 autocast, and what each stage reports."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgerag.data import read_squad  # noqa: E402
from edgerag.models import load_generator  # noqa: E402
from edgerag.train import loop  # noqa: E402
from edgerag.train.distill import teacher_cache  # noqa: E402
from edgerag.train.recipe import RecipeError, load_recipe  # noqa: E402
from edgerag.train.teacher import Prompter, answer_loss, example_length, make_examples  # noqa: E402


@pytest.fixture(scope="module")
def examples(tiny):
    """Examples whose prompts differ in length: one, two or three passages each."""
    _, tok = load_generator(tiny["generator"])
    prompter = Prompter(tok, 512, 8)
    questions = read_squad(tiny["train"])[1][:16]
    contexts = [[(q.title, q.context)] * (1 + i % 3) for i, q in enumerate(questions)]
    return tok, make_examples(prompter, questions, contexts)


def test_random_batches_are_the_seeded_permutation_sliced():
    order = np.random.default_rng(7 + 2).permutation(10)
    batches = loop.epoch_batches(10, 4, seed=7, epoch=2)
    assert [list(b) for b in batches] == [list(order[0:4]), list(order[4:8]), list(order[8:10])]


def test_length_batches_hold_every_example_once_and_pad_less():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(10, 400, size=203))
    random_batches = loop.epoch_batches(203, 4, seed=0, epoch=0)
    batches = loop.epoch_batches(203, 4, seed=0, epoch=0, lengths=lengths)
    assert len(batches) == len(random_batches) == 51
    assert sorted(int(j) for b in batches for j in b) == list(range(203))
    real, padded = loop.padding(batches, lengths)
    real_random, padded_random = loop.padding(random_batches, lengths)
    assert real == real_random == sum(lengths)
    assert 1 - real / padded < 0.5 * (1 - real_random / padded_random)
    # the same epoch gives the same batches (a resumed run sees what the interrupted one would have)
    again = loop.epoch_batches(203, 4, seed=0, epoch=0, lengths=lengths)
    assert [list(b) for b in again] == [list(b) for b in batches]
    # and another epoch other ones
    assert [list(b) for b in loop.epoch_batches(203, 4, seed=0, epoch=1, lengths=lengths)] != [list(b) for b in batches]


def test_precision_resolution():
    assert loop.resolve_precision("fp32") == "fp32"
    assert loop.resolve_precision("bf16") == "bf16"
    expected = ("bf16" if torch.cuda.is_bf16_supported() else "fp32") if torch.cuda.is_available() else \
        ("bf16" if loop.cpu_has_bf16_units() else "fp32")
    assert loop.resolve_precision("auto") == expected
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        loop.resolve_precision("fp16")


def test_recipe_refuses_an_unknown_precision_or_batching(tmp_path):
    for line, message in [('precision = "fp8"', "run.precision"), ('batching = "sorted"', "run.batching"),
                          ("checkpoint_every = 0", "run.checkpoint_every")]:
        path = tmp_path / "r.toml"
        path.write_text(f"[run]\n{line}\n")
        with pytest.raises(RecipeError, match=message):
            load_recipe(path, check_models=False)


def _train(tiny, examples, tmp_path, **settings):
    tok, rows = examples
    model, _ = load_generator(tiny["generator"])
    cfg = loop.TrainConfig(epochs=4, batch_size=4, lr=2e-3, warmup_steps=1, checkpoint_every=1000, seed=0, **settings)
    with torch.no_grad():
        before = float(answer_loss(model, rows, tok.pad_token_id))
    loop.train(model, rows, lambda m, b: (answer_loss(m, b, tok.pad_token_id), {}), cfg, tmp_path, length=example_length)
    with torch.no_grad():
        after = float(answer_loss(model, rows, tok.pad_token_id))
    return model, before, after, json.loads((tmp_path / loop.TRAINING_FILE).read_text())


def test_bf16_training_learns_and_keeps_fp32_weights(tiny, examples, tmp_path):
    model, before, after, report = _train(tiny, examples, tmp_path, precision="bf16", batching="length")
    assert after < 0.8 * before
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert report["precision"] == "bf16" and report["batching"] == "length"
    assert report["examples"] == 4 * 16 and report["steps"] == 16
    assert report["examples_per_hour"] > 0 and report["tokens_per_second"] > 0


def test_the_stage_report_counts_tokens_and_padding(tiny, examples, tmp_path):
    _, rows = examples
    _, _, _, bucketed = _train(tiny, examples, tmp_path / "length", precision="fp32", batching="length")
    _, _, _, shuffled = _train(tiny, examples, tmp_path / "random", precision="fp32", batching="random")
    assert bucketed["tokens"] == shuffled["tokens"] == 4 * sum(example_length(e) for e in rows)
    assert bucketed["padding_share_random_batches"] == shuffled["padding_share_random_batches"] == shuffled["padding_share"]
    assert bucketed["padding_share"] < shuffled["padding_share"]
    assert bucketed["tokens_computed"] < shuffled["tokens_computed"]


def test_teacher_cache_keeps_the_examples_order(tiny, examples):
    tok, rows = examples
    model, _ = load_generator(tiny["generator"])
    one_by_one = teacher_cache(model, rows, tok.pad_token_id, 2.0, 8, batch_size=1)
    batched = teacher_cache(model, rows, tok.pad_token_id, 2.0, 8, batch_size=4)
    for a, b, e in zip(one_by_one, batched, rows):
        assert a["logp"].shape[0] == len(e.target)
        assert torch.allclose(a["logp"], b["logp"], atol=1e-4)
        assert torch.equal(a["ids"][:, 0], b["ids"][:, 0])
        # each entry owns its storage: a view would keep its whole batch's top k alive in the cache
        assert b["logp"].untyped_storage().nbytes() == b["logp"].numel() * b["logp"].element_size()


def test_a_killed_teacher_cache_resumes_from_its_checkpoint(tiny, examples, tmp_path, monkeypatch):
    """A teacher cache stopped after its third batch resumes from the batches it saved and gives the cache
    of an uninterrupted call; a checkpoint made for other examples is not trusted."""
    from edgerag.train import distill

    tok, rows = examples
    model, _ = load_generator(tiny["generator"])
    whole = teacher_cache(model, rows, tok.pad_token_id, 2.0, 8, batch_size=2)
    checkpoint = tmp_path / "checkpoint.pt"
    monkeypatch.setattr(distill, "INTERRUPT_AFTER_BATCH", 3)
    with pytest.raises(loop.Interrupted):
        teacher_cache(model, rows, tok.pad_token_id, 2.0, 8, batch_size=2, checkpoint=checkpoint, checkpoint_every=1)
    monkeypatch.setattr(distill, "INTERRUPT_AFTER_BATCH", None)
    saved = torch.load(checkpoint, weights_only=False)["cache"]
    assert sum(x is not None for x in saved) == 6  # three batches of two

    calls = []
    real = distill.target_logits
    monkeypatch.setattr(distill, "target_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = teacher_cache(model, rows, tok.pad_token_id, 2.0, 8, batch_size=2, checkpoint=checkpoint, checkpoint_every=1)
    assert len(calls) == len(rows) // 2 - 3  # only the batches not saved
    for a, b in zip(whole, resumed):
        assert torch.equal(a["ids"], b["ids"]) and torch.allclose(a["logp"], b["logp"])

    calls.clear()
    teacher_cache(model, rows[1:], tok.pad_token_id, 2.0, 8, batch_size=2, checkpoint=checkpoint)
    assert len(calls) == -(-(len(rows) - 1) // 2)  # other examples: every batch again

    checkpoint.unlink()
    monkeypatch.setattr(distill, "INTERRUPT_AFTER_BATCH", 3)
    with pytest.raises(loop.Interrupted):
        teacher_cache(model, rows, tok.pad_token_id, 2.0, 8, batch_size=2, checkpoint=checkpoint, checkpoint_every=1)
    monkeypatch.setattr(distill, "INTERRUPT_AFTER_BATCH", None)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # another teacher: what the first one cached is not trusted
    calls.clear()
    teacher_cache(model, rows, tok.pad_token_id, 2.0, 8, batch_size=2, checkpoint=checkpoint)
    assert len(calls) == len(rows) // 2

    checkpoint.write_bytes(b"half a file")  # one that does not read: set aside, every batch again
    calls.clear()
    teacher_cache(model, rows, tok.pad_token_id, 2.0, 8, batch_size=2, checkpoint=checkpoint)
    assert len(calls) == len(rows) // 2 and (tmp_path / "checkpoint.pt.unreadable").exists()


def test_bf16_where_the_hardware_lacks_it_is_refused_at_start(tiny, tmp_path, capsys):
    from edgerag.train.driver import distill
    from edgerag.train.run import RunError

    if loop.bf16_units():
        pytest.skip("this machine has bf16 units: nothing to refuse")
    recipe = tmp_path / "bf16.toml"
    recipe.write_text(tiny["recipe"].read_text().replace("[run]\n", '[run]\nprecision = "bf16"\n'))
    with pytest.raises(RunError, match='run.precision = "bf16": this machine has no bf16 matrix units'):
        distill(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "stages").exists()  # refused before any stage ran
    assert loop.check_precision("auto") == "fp32"
    assert capsys.readouterr().out.count("precision auto: fp32 (no bf16 matrix units here)") == 1


def test_a_loss_that_turns_nan_stops_the_stage_naming_step_and_batch(tiny, examples, tmp_path):
    tok, rows = examples
    model, _ = load_generator(tiny["generator"])
    cfg = loop.TrainConfig(epochs=1, batch_size=4, lr=2e-3, warmup_steps=1, checkpoint_every=2, seed=0)
    calls = []

    def loss_fn(m, batch):
        calls.append(batch)
        loss = answer_loss(m, batch, tok.pad_token_id)
        return (loss * float("nan") if len(calls) == 3 else loss), {}

    with pytest.raises(loop.NonFiniteLoss, match=r"step 3/4: the loss is nan \(fp32\) on the batch of examples \[") as raised:
        loop.train(model, rows, loss_fn, cfg, tmp_path, length=example_length)
    assert all(e.question_id in str(raised.value) for e in calls[2])
    assert "the last checkpoint" in str(raised.value)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
    # the cause gone, --resume goes on from step 2
    log = loop.train(model, rows, lambda m, b: (answer_loss(m, b, tok.pad_token_id), {}), cfg, tmp_path, length=example_length)
    assert [e["step"] for e in log] == [1, 2, 3, 4]


def test_bf16_and_fp32_agree_on_the_first_loss_within_bf16_precision(tiny, examples):
    tok, rows = examples
    model, _ = load_generator(tiny["generator"])
    with torch.no_grad():
        fp32 = float(answer_loss(model, rows[:4], tok.pad_token_id))
        with loop.autocast("bf16"):
            bf16 = float(answer_loss(model, rows[:4], tok.pad_token_id))
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != fp32  # the matmuls did run in bf16


def test_a_padded_batch_gives_the_loss_of_its_examples_one_by_one(tiny, examples):
    tok, rows = examples
    model, _ = load_generator(tiny["generator"])
    batch = rows[:6]
    assert len({example_length(e) for e in batch}) > 1  # rows of different lengths: padding at work
    with torch.no_grad():
        together = float(answer_loss(model, batch, tok.pad_token_id))
        alone = [float(answer_loss(model, [e], tok.pad_token_id)) for e in batch]
    weights = [len(e.target) for e in batch]
    assert together == pytest.approx(sum(a * w for a, w in zip(alone, weights)) / sum(weights), rel=1e-4)
