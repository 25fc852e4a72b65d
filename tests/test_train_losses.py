"""Every loss of the pipeline goes down on tiny random models, and the student surgery is sound."""

import random

import pytest

torch = pytest.importorskip("torch")

from edgerag.train import loop  # noqa: E402
from edgerag.data import read_squad  # noqa: E402
from edgerag.train.distill import disable_dropout, KDExample, QueryExample, encoder_loss_fn, generator_loss_fn, kl_teacher_student, teacher_cache  # noqa: E402
from edgerag.train.retrieval import embed, passage_text  # noqa: E402
from edgerag.models import load_encoder, load_generator  # noqa: E402
from edgerag.train.student import calibration_batches, count_params, shrink_encoder, shrink_generator  # noqa: E402
from edgerag.train.teacher import Prompter, answer_loss, generate, make_examples  # noqa: E402


@pytest.fixture(scope="module")
def gold_examples(tiny):
    _, tok = load_generator(tiny["generator"])
    prompter = Prompter(tok, 256, 8)
    questions = read_squad(tiny["train"])[1][:12]
    return prompter, make_examples(prompter, questions, [[(q.title, q.context)] for q in questions])


def cfg(**kw):
    base = dict(epochs=3, batch_size=4, lr=2e-3, warmup_steps=1, checkpoint_every=1000, seed=0)
    base.update(kw)
    return loop.TrainConfig(**base)


def test_prompt_is_the_shared_chatml_template(gold_examples):
    prompter, examples = gold_examples
    text = prompter.tokenizer.decode(examples[0].prompt)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert prompter.tokenizer.decode(examples[0].target).endswith("<|im_end|>")
    assert prompter.stop_ids[0] == prompter.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_teacher_finetune_loss_decreases(tiny, gold_examples, tmp_path):
    model, tok = load_generator(tiny["generator"])
    _, examples = gold_examples
    with torch.no_grad():
        before = float(answer_loss(model, examples, tok.pad_token_id))
    log = loop.train(model, examples, lambda m, b: (answer_loss(m, b, tok.pad_token_id), {}), cfg(), tmp_path)
    with torch.no_grad():
        after = float(answer_loss(model, examples, tok.pad_token_id))
    assert len(log) == 9
    assert after < 0.9 * before


def test_student_surgery_roundtrip(tiny, gold_examples, tmp_path):
    model, tok = load_generator(tiny["generator"])
    prompter, examples = gold_examples
    batches = calibration_batches([e.prompt + e.target for e in examples[:4]], tok.pad_token_id)
    teacher_params = count_params(model)
    info = shrink_generator(model, "auto:2", intermediate_size=64, kv_heads=1, batches=batches)
    # auto:2 drops the 2-layer block with the smallest angular distance; the last layer is kept.
    d = info["angular_distances"]
    start = min(range(len(d)), key=d.__getitem__)
    assert info["layers"] == [i for i in range(4) if not start <= i < start + 2]
    assert 3 in info["layers"] and info["params"] < teacher_params
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_generator(tmp_path)
    assert again.config.num_hidden_layers == 2 and again.config.intermediate_size == 64
    assert again.config.num_key_value_heads == 1 and again.config.num_attention_heads == 2
    ids = torch.tensor([examples[0].prompt])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)
    # generation with a KV cache works on the cut model (layer indices were renumbered)
    assert isinstance(generate(again, prompter, [examples[0].prompt], max_new_tokens=4)[0], str)


def test_mlp_pruning_keeps_the_most_active_neurons(tiny, gold_examples):
    model, tok = load_generator(tiny["generator"])
    _, examples = gold_examples
    batches = calibration_batches([e.prompt + e.target for e in examples[:4]], tok.pad_token_id)
    ids, mask = batches[0]
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    pruned, _ = load_generator(tiny["generator"])
    shrink_generator(pruned, "all", intermediate_size=96, kv_heads=0, batches=batches)
    rand, _ = load_generator(tiny["generator"])
    # the same width, chosen at random instead of by importance
    g = torch.Generator().manual_seed(0)
    for layer in rand.model.layers:
        keep = torch.sort(torch.randperm(128, generator=g)[:96]).values
        from edgerag.train.student import _slice_linear
        layer.mlp.gate_proj = _slice_linear(layer.mlp.gate_proj, rows=keep)
        layer.mlp.up_proj = _slice_linear(layer.mlp.up_proj, rows=keep)
        layer.mlp.down_proj = _slice_linear(layer.mlp.down_proj, cols=keep)
    with torch.no_grad():
        err_imp = (pruned(input_ids=ids, attention_mask=mask).logits - full).abs().mean()
        err_rand = (rand(input_ids=ids, attention_mask=mask).logits - full).abs().mean()
    assert err_imp < err_rand


def test_encoder_distillation_moves_student_toward_teacher(tiny, tmp_path):
    teacher, tok, pooling, max_length = load_encoder(tiny["encoder"])
    student, _, _, _ = load_encoder(tiny["encoder"])
    shrink_encoder(student, [0])
    disable_dropout(student)
    passages, questions, _ = read_squad(tiny["train"])
    row_of = {p.id: i for i, p in enumerate(passages)}
    passage_emb = torch.from_numpy(embed(teacher, tok, [passage_text(p.title, p.text) for p in passages], pooling, max_length))
    texts = [q.question for q in questions]
    targets = torch.from_numpy(embed(teacher, tok, texts, pooling, max_length))
    examples = [QueryExample(t, targets[i], row_of[q.passage_id]) for i, (t, q) in enumerate(zip(texts, questions))]

    def distance():
        emb = torch.from_numpy(embed(student, tok, texts, pooling, max_length))
        return float(((emb - targets) ** 2).sum(-1).mean())

    loss_fn = encoder_loss_fn(tok, pooling, max_length, passage_emb, mse_weight=1.0, contrastive_weight=0.1)
    with torch.no_grad():
        _, parts_before = loss_fn(student.eval(), examples)
    before = distance()
    log = loop.train(student, examples, loss_fn, cfg(epochs=5, batch_size=8, lr=1e-3), tmp_path)
    after = distance()
    with torch.no_grad():
        _, parts_after = loss_fn(student.eval(), examples)
    assert after < 0.5 * before
    assert float(parts_after["mse"]) < float(parts_before["mse"])
    assert float(parts_after["contrastive"]) < float(parts_before["contrastive"])
    assert len(log) == 5 * 5  # 36 questions in batches of 8, 5 epochs


def test_generator_kd_lowers_kl_to_the_teacher(tiny, gold_examples, tmp_path):
    teacher, tok = load_generator(tiny["generator"])
    prompter, examples = gold_examples
    # give the random teacher something to teach: a few steps on the gold answers
    loop.train(teacher, examples, lambda m, b: (answer_loss(m, b, tok.pad_token_id), {}), cfg(epochs=8, lr=3e-3), tmp_path / "t")
    student, _ = load_generator(tiny["generator"])
    shrink_generator(student, [0, 3], intermediate_size=64, kv_heads=0,
                     batches=calibration_batches([e.prompt + e.target for e in examples[:4]], tok.pad_token_id))
    # The whole (small) vocabulary as "top k": the cached KL is then the exact one we measure below.
    V = len(tok)
    cache = teacher_cache(teacher, examples, tok.pad_token_id, temperature=2.0, top_k=V, hidden=True)
    assert cache[0]["logp"].shape == (len(examples[0].target), V)
    kd = [KDExample(e, c) for e, c in zip(examples, cache)]
    loss_fn = generator_loss_fn(tok.pad_token_id, temperature=2.0, alpha=0.0, hidden_weight=0.1)
    kl_before = kl_teacher_student(teacher, student, examples, tok.pad_token_id, temperature=2.0)
    kl1_before = kl_teacher_student(teacher, student, examples, tok.pad_token_id)
    with torch.no_grad():
        _, before = loss_fn(student, kd)
    loop.train(student, kd, loss_fn, cfg(epochs=6), tmp_path / "s")
    with torch.no_grad():
        _, after = loss_fn(student, kd)
    kl_after = kl_teacher_student(teacher, student, examples, tok.pad_token_id, temperature=2.0)
    kl1_after = kl_teacher_student(teacher, student, examples, tok.pad_token_id)
    print(kl_before, kl_after, kl1_before, kl1_after, before, after)
    assert kl_after < 0.7 * kl_before      # full-vocabulary KL at the distillation temperature
    assert kl1_after < kl1_before           # and at T = 1
    for part in ("kl", "hidden"):
        assert float(after[part]) < float(before[part]), part


def test_checkpoint_resume_is_exact(tiny, gold_examples, tmp_path):
    _, examples = gold_examples

    def run(folder, interrupt):
        torch.manual_seed(0)
        model, tok = load_generator(tiny["generator"])
        fn = lambda m, b: (answer_loss(m, b, tok.pad_token_id), {})  # noqa: E731
        c = cfg(epochs=2, checkpoint_every=2)
        if interrupt:
            loop.INTERRUPT_AFTER_STEP = 3
            try:
                with pytest.raises(loop.Interrupted):
                    loop.train(model, examples, fn, c, folder)
            finally:
                loop.INTERRUPT_AFTER_STEP = None
            model, tok = load_generator(tiny["generator"])   # a fresh process would start from the saved state
        log = loop.train(model, examples, fn, c, folder)
        return model, log

    a, log_a = run(tmp_path / "a", interrupt=False)
    b, log_b = run(tmp_path / "b", interrupt=True)
    assert [e["loss"] for e in log_a] == pytest.approx([e["loss"] for e in log_b], abs=1e-6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_gradient_matching_on_the_default_family(tiny, gold_examples, tmp_path):
    """Output-and-gradient KD on a causal LM: the cache holds the teacher's projected input gradient
    for every prompt + answer position, and training lowers the gradient-matching term."""
    from edgerag.train.gradient import projection

    teacher, tok = load_generator(tiny["generator"])
    student, _ = load_generator(tiny["generator"])
    with torch.no_grad():  # a different student of the same shape: there is a gap to close
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.config._attn_implementation = "eager"
    disable_dropout(student)
    _, examples = gold_examples
    P = projection(teacher.config.vocab_size, 8)
    cache = teacher_cache(teacher, examples, tok.pad_token_id, 2.0, 8, gradient_projection=P)
    assert [c["gradient"].shape for c in cache] == [(len(e.prompt) + len(e.target), 8) for e in examples]
    kd = [KDExample(e, c) for e, c in zip(examples, cache)]
    loss_fn = generator_loss_fn(tok.pad_token_id, 2.0, 0.5, gradient_weight=1.0, gradient_projection=P)
    log = loop.train(student, kd, loss_fn, cfg(epochs=4), tmp_path)
    first, last = log[0]["gradient"], sum(e["gradient"] for e in log[-3:]) / 3
    assert last < first, [e["gradient"] for e in log]
