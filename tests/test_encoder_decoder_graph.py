"""BART encoder/decoder graphs (export/bart_graph.py) and their greedy loop (runtime/encoder_decoder.py),
checked against Hugging Face on a tiny random BART."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgerag.export.bart_graph import export_encoder_decoder  # noqa: E402
from edgerag.runtime import EncoderDecoderGenerator  # noqa: E402

VOCAB, EOS, BOS, PAD = 300, 2, 0, 1


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def make_bart(tmp_path_factory, tied: bool):
    """(HF model, export folder, description, generator on the exported graphs)."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        scale_embedding=True,  # bart-large leaves it False; True checks that the scale is applied
        tie_word_embeddings=tied, init_std=0.1)
    model = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():  # wide embeddings and a bias: logits far apart, so greedy has no near-ties
        model.model.shared.weight.normal_(0, 1.0)
        model.final_logits_bias.normal_(0, 1.0)
        if not tied:  # a tied head mostly repeats the last token; an untied one makes varied answers
            model.lm_head.weight.normal_(0, 1.0)
    # HF forces EOS as the last token at max_length; the device loop stops there with "length" instead
    model.generation_config.forced_eos_token_id = None
    folder = tmp_path_factory.mktemp("tied-bart" if tied else "bart")
    info = export_encoder_decoder(model, folder)
    generator = EncoderDecoderGenerator(session(folder / "encoder.onnx"), session(folder / "decoder.onnx"), [EOS],
                                        info["decoder_start_token_id"])
    return model, folder, info, generator


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    return make_bart(tmp_path_factory, tied=False)


@pytest.fixture(scope="module")
def tied_bart(tmp_path_factory):
    """As BART checkpoints are: the LM head is the shared embedding."""
    return make_bart(tmp_path_factory, tied=True)


@pytest.fixture(scope="module")
def generator(bart):
    return bart[3]


def prompts(count, seed=1):
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(3, VOCAB, int(rng.integers(3, 20))).tolist(), EOS] for _ in range(count)]


def hf_logits(model, prompt, decoder_ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    decoder_input_ids=torch.tensor([decoder_ids]))
    return out.logits[0, -1].numpy()


def hf_greedy(model, prompt, max_new_tokens, stop=EOS, forced_bos=None):
    """HF's new tokens, without the decoder start, the forced BOS or the stop token."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, num_beams=1, max_new_tokens=max_new_tokens + (forced_bos is not None),
                             eos_token_id=stop, forced_bos_token_id=forced_bos)[0].tolist()
    assert out[0] == model.config.decoder_start_token_id
    out = out[1:]
    if forced_bos is not None:
        assert out[0] == forced_bos
        out = out[1:]
    return out[:out.index(stop)] if stop in out else out


def run_decoder(sess, ids, enc_mask, past, cross):
    feed = {"input_ids": np.asarray(ids, dtype=np.int64), "encoder_attention_mask": enc_mask, **past, **cross}
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feed)))
    return out["logits"], {n.replace("present.", "past."): v for n, v in out.items() if n.startswith("present.")}


def test_graph_io_names(bart, generator):
    info = bart[2]
    n = info["num_layers"]
    kv = [f"{i}.{x}" for i in range(n) for x in ("key", "value")]
    assert [o.name for o in generator.encoder.get_outputs()] == [f"cross.{s}" for s in kv]
    assert [i.name for i in generator.decoder.get_inputs()] == (
        ["input_ids", "encoder_attention_mask"] + [f"past.{s}" for s in kv] + [f"cross.{s}" for s in kv])
    assert [o.name for o in generator.decoder.get_outputs()] == ["logits"] + [f"present.{s}" for s in kv]
    assert (info["heads"], info["head_dim"], info["vocab_size"]) == (4, 8, VOCAB)


@pytest.mark.parametrize("which", ["bart", "tied_bart"])
def test_logits_match_hf_with_and_without_past(request, which):
    model, _, _, generator = request.getfixturevalue(which)
    decoder_ids = [EOS, BOS, 17, 45, 99, 123]
    for prompt in prompts(3):
        enc = generator.encoder_feed(prompt)
        cross = dict(zip(generator.cross_outputs, generator.encoder.run(None, enc)))
        # first step, empty past (two tokens at once: the causal mask among new tokens matters)
        logits, past = run_decoder(generator.decoder, [decoder_ids[:2]], enc["attention_mask"],
                                   generator.empty_cache(), cross)
        assert np.abs(logits[0] - hf_logits(model, prompt, decoder_ids[:2])).max() < 1e-4
        # cached steps: one token, then three at once
        for lo, hi in ((2, 3), (3, 6)):
            logits, past = run_decoder(generator.decoder, [decoder_ids[lo:hi]], enc["attention_mask"], past, cross)
            assert past["past.0.key"].shape == (1, 4, hi, 8)
            assert np.abs(logits[0] - hf_logits(model, prompt, decoder_ids[:hi])).max() < 1e-4
        assert np.abs(generator.last_logits(prompt) - hf_logits(model, prompt, [EOS])).max() < 1e-4


@pytest.mark.parametrize("forced_bos", [None, BOS])
def test_greedy_matches_hf_generate(bart, forced_bos):
    model, folder, info, _ = bart
    gen = EncoderDecoderGenerator(session(folder / "encoder.onnx"), session(folder / "decoder.onnx"), [EOS],
                                  info["decoder_start_token_id"], forced_bos)
    for prompt in prompts(5, seed=2):
        ours = gen.greedy(prompt, 12)
        assert ours.tokens == hf_greedy(model, prompt, 12, forced_bos=forced_bos)
        assert ours.stop_reason == ("stop" if len(ours.tokens) < 12 else "length")
        assert ours.reused_prompt_tokens == 0 and ours.prefill_ms > 0


def test_stop_token_truncates(bart, generator):
    model, _, info, _ = bart
    prompt = prompts(1, seed=3)[0]
    endless = EncoderDecoderGenerator(generator.encoder, generator.decoder, [], info["decoder_start_token_id"])
    full = endless.greedy(prompt, 12)
    assert full.stop_reason == "length" and len(full.tokens) == 12
    # a token HF generates along the way, first seen at index `cut`
    cut = next(i for i in range(3, 12) if full.tokens[i] not in full.tokens[:i])
    stop = full.tokens[cut]
    gen = EncoderDecoderGenerator(generator.encoder, generator.decoder, [stop], info["decoder_start_token_id"])
    stopped = gen.generate(prompt, 12)
    assert list(stopped) == full.tokens[:cut] == hf_greedy(model, prompt, 12, stop=stop)
    assert stopped.stop_reason == "stop" and stopped.tokens == full.tokens[:cut]
    assert gen.greedy(prompt, cut).stop_reason == "length"
    assert gen.greedy(prompt, 0).tokens == []


def test_threads_share_a_generator(generator):
    from concurrent.futures import ThreadPoolExecutor

    batch = prompts(6, seed=6)
    alone = [generator.greedy(p, 10).tokens for p in batch]
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda p: generator.greedy(p, 10).tokens, batch)) == alone


def test_padded_batch_matches_each_alone(generator):
    a, b = prompts(2, seed=4)
    a, b = (a, b) if len(a) > len(b) else (b, a)
    ids = np.full((2, len(a)), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate((a, b)):
        ids[row, :len(p)], mask[row, :len(p)] = p, 1
    cross = dict(zip(generator.cross_outputs, generator.encoder.run(None, {"input_ids": ids, "attention_mask": mask})))
    empty = {n: np.concatenate([v, v]) for n, v in generator.empty_cache().items()}
    batch_first, past = run_decoder(generator.decoder, [[EOS], [EOS]], mask, empty, cross)
    batch_second, _ = run_decoder(generator.decoder, [[BOS], [BOS]], mask, past, cross)
    for row, p in enumerate((a, b)):
        enc = generator.encoder_feed(p)
        alone = dict(zip(generator.cross_outputs, generator.encoder.run(None, enc)))
        first, past = run_decoder(generator.decoder, [[EOS]], enc["attention_mask"], generator.empty_cache(), alone)
        second, _ = run_decoder(generator.decoder, [[BOS]], enc["attention_mask"], past, alone)
        assert np.abs(batch_first[row] - first[0]).max() < 1e-4
        assert np.abs(batch_second[row] - second[0]).max() < 1e-4


@pytest.mark.parametrize("which", ["bart", "tied_bart"])
def test_int8wo_weight_only_quantization(request, which, tmp_path):
    from edgerag.export.quantize import quantize

    _, folder, info, generator = request.getfixturevalue(which)
    for name, is_generator in (("encoder", False), ("decoder", True)):
        model, description = quantize(onnx.load(str(folder / f"{name}.onnx")), "int8wo", 32, 4,
                                      is_generator=is_generator)
        assert any(n.op_type == "MatMulNBits" for n in model.graph.node)
        onnx.save_model(model, str(tmp_path / f"{name}.onnx"))
    quantized = EncoderDecoderGenerator(session(tmp_path / "encoder.onnx"), session(tmp_path / "decoder.onnx"), [EOS],
                                        info["decoder_start_token_id"])
    deltas, scales, same = [], [], []
    for prompt in prompts(4, seed=5):
        reference = generator.last_logits(prompt)
        deltas.append(np.abs(quantized.last_logits(prompt) - reference).max())
        scales.append(np.abs(reference).max())
        same.append(quantized.greedy(prompt, 8).tokens == generator.greedy(prompt, 8).tokens)
    print(f"int8wo ({which}): max |delta logits| {max(deltas):.4f}, max |logit| {max(scales):.1f}, "
          f"greedy equal to fp32 on {sum(same)}/{len(same)} prompts")
    assert max(deltas) < 0.5


def test_decoder_kv_bytes_per_position(bart):
    """The bench's KV floor: the decoder reads the encoder's positions through the cross-attention
    cache and the generated ones through its self-attention cache, K and V of every layer's heads."""
    from edgerag.benchmarks.machine import onnx_kv_bytes_per_position

    model, folder, _, _ = bart
    c = model.config
    per_position = c.decoder_layers * 2 * c.d_model * 4  # fp32 K and V over all heads
    assert onnx_kv_bytes_per_position(folder / "decoder.onnx") == {
        "kv_bytes_prompt_position": per_position, "kv_bytes_new_position": per_position}
    assert onnx_kv_bytes_per_position(folder / "encoder.onnx") == {}  # no cache read: not a decoder step
