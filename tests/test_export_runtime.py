"""Export tiny models to bundles and check the runtime against PyTorch, numpy and itself."""

import json
import shutil

import numpy as np
import pytest

from edgerag.runtime import BundleError, Pipeline, PromptError
from edgerag.runtime.manifest import MANIFEST, read_manifest, verify


def _torch_greedy(generator_dir, prompt, max_new_tokens, stop):
    from edgerag.export.bundle import greedy_torch
    from edgerag.models import load_generator

    model, _ = load_generator(str(generator_dir))
    return greedy_torch(model, prompt, max_new_tokens, stop)


def _prompt(pipeline, question, passages):
    return pipeline.prompt_ids(question, passages, 12)


PROMPTS = [("Which team won Super Bowl 50?", [("Super Bowl 50", "The Denver Broncos defeated the Carolina Panthers.")]),
           ("What is the capital of Poland?", [("Warsaw", "Warsaw is the capital and largest city of Poland.")]),
           ("Where is Victoria?", [("Victoria", "Victoria is a state in the south east of Australia.")])]


def test_fp32_onnx_greedy_equals_pytorch_token_for_token(tiny_models, tiny_bundle):
    from edgerag.models import load_generator
    from edgerag.export.bundle import greedy_torch

    model, _ = load_generator(str(tiny_models[1]))
    pipeline = Pipeline.load(tiny_bundle)
    stop = pipeline.manifest.prompt.stop_token_ids
    for question, passages in PROMPTS:
        prompt = _prompt(pipeline, question, passages)
        onnx_tokens = pipeline.generator.greedy(prompt, 12).tokens
        assert onnx_tokens == greedy_torch(model, prompt, 12, stop)
        assert len(onnx_tokens) > 0


def _full_recompute_tokens(generator, prompt, n):
    ids = list(prompt)
    out = []
    for _ in range(n):
        token = int(generator.last_logits(ids).argmax())
        if token in generator.stop:
            break
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_int8", "tiny_bundle_int4", "tiny_bundle_int8wo",
                                            "tiny_bundle_optimum", "tiny_bundle_int8sq", "tiny_bundle_int8swo"])
def test_kv_cache_decoding_equals_full_recomputation(bundle_fixture, request):
    pipeline = Pipeline.load(request.getfixturevalue(bundle_fixture))
    for question, passages in PROMPTS:
        prompt = _prompt(pipeline, question, passages)
        cached = pipeline.generator.greedy(prompt, 12).tokens
        assert cached == _full_recompute_tokens(pipeline.generator, prompt, 12)


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_int8wo", "tiny_bundle_optimum"])
def test_previous_prompt_reuse_gives_the_tokens_of_a_fresh_start(bundle_fixture, request):
    bundle = request.getfixturevalue(bundle_fixture)
    reusing = Pipeline.load(bundle, reuse_prefix="previous")
    fresh = Pipeline.load(bundle, reuse_prefix=False)
    passages = PROMPTS[0][1] + PROMPTS[1][1]
    # same passages, other questions: everything before the question is shared
    questions = ["Which team won Super Bowl 50?", "Which team lost Super Bowl 50?", "What is the capital of Poland?"]
    reused = []
    for question in questions + questions[-1:]:
        prompt = _prompt(reusing, question, passages)
        generation = reusing.generator.greedy(prompt, 12)
        assert generation.tokens == fresh.generator.greedy(prompt, 12).tokens
        reused.append(generation.reused_prompt_tokens)
    prompts = [_prompt(reusing, q, passages) for q in questions + questions[-1:]]

    def common_prefix(a, b):
        n = 0
        while n < min(len(a), len(b) - 1) and a[n] == b[n]:
            n += 1
        return n

    assert reused[0] == 0
    assert reused[1:] == [common_prefix(a, b) for a, b in zip(prompts, prompts[1:])]
    assert reused[3] == len(prompts[3]) - 1  # a repeated prompt feeds only its last token
    assert min(reused[1:]) > len(reusing.tokenizer.encode(reusing.template.prefix, add_special_tokens=False).ids)  # the passages are reused too


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle_int8", "tiny_bundle_int4", "tiny_bundle_int8wo", "tiny_bundle_int8sq",
                                            "tiny_bundle_int8swo"])
def test_quantized_logits_within_recorded_tolerance(bundle_fixture, request, tiny_models):
    from edgerag.export.bundle import last_logits_torch
    from edgerag.models import load_generator

    pipeline = Pipeline.load(request.getfixturevalue(bundle_fixture))
    method = pipeline.manifest.generator.quantization_method
    figures = pipeline.manifest.parity["generator"]
    recorded = figures[method]["max_abs_logit_delta"]
    assert recorded > figures["fp32"]["max_abs_logit_delta"]  # quantization does change the numbers
    model, _ = load_generator(str(tiny_models[1]))
    for question, passages in PROMPTS:  # prompts the export never saw
        prompt = _prompt(pipeline, question, passages)
        delta = np.abs(pipeline.generator.last_logits(prompt) - last_logits_torch(model, prompt)).max()
        assert delta <= 2 * recorded + 1e-4


@pytest.mark.parametrize("bundle_fixture,builder", [("tiny_bundle", "fused-llama"), ("tiny_bundle_optimum", "optimum")])
def test_fp32_parity_figures_recorded(bundle_fixture, builder, request):
    manifest = read_manifest(request.getfixturevalue(bundle_fixture))
    assert manifest.generator.graph == builder
    parity = manifest.parity
    assert parity["max_abs_embedding_delta"]["fp32"] < 1e-4
    assert parity["generator"]["fp32"]["max_abs_logit_delta"] < 1e-3
    assert parity["generator"]["fp32"]["greedy_exact_match"] == 1.0


def test_fused_graph_uses_onnxruntime_attention(tiny_bundle, tiny_bundle_optimum):
    import onnx

    fused = {n.op_type for n in onnx.load(str(tiny_bundle / "generator.onnx")).graph.node}
    traced = {n.op_type for n in onnx.load(str(tiny_bundle_optimum / "generator.onnx")).graph.node}
    assert "GroupQueryAttention" in fused and "Softmax" not in fused
    assert "GroupQueryAttention" not in traced


def test_fused_graph_refuses_what_it_cannot_reproduce():
    from transformers import LlamaConfig, MistralConfig

    from edgerag.export.llama_graph import UnsupportedModel, check_supported

    check_supported(LlamaConfig())
    for config in (LlamaConfig(attention_bias=True), LlamaConfig(hidden_act="gelu"),
                   LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), MistralConfig()):
        with pytest.raises(UnsupportedModel):
            check_supported(config)


def test_int8_weights_quantized_at_once_are_onnxruntimes_bytes(tiny_models, tmp_path):
    """export.quantize quantizes a weight's channels at once instead of onnxruntime's per-channel loop:
    the quantized graph must be byte for byte onnxruntime's, a channel of zeros (scale 1) included."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgerag.export import onnx_export
    from edgerag.export.quantize import _dynamic_int8

    graph, _ = onnx_export.export_generator(tiny_models[1])
    graph = onnx_export.split_lm_head(onnx_export.untie_lm_head(graph))
    matmul_weights = {n.input[1] for n in graph.graph.node if n.op_type == "MatMul"}
    weight = next(i for i in graph.graph.initializer if i.name in matmul_weights and len(i.dims) == 2)
    values = numpy_helper.to_array(weight).copy()
    values[:, 1] = 0.0
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    at_once = _dynamic_int8(onnx.ModelProto.FromString(graph.SerializeToString()))
    onnx.save_model(graph, str(tmp_path / "in.onnx"))
    quantize_dynamic(tmp_path / "in.onnx", tmp_path / "out.onnx", op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    looped = onnx.load(str(tmp_path / "out.onnx"))
    quantized = [i.name for i in looped.graph.initializer if i.name.endswith("_quantized")]
    assert weight.name + "_quantized" in quantized and len(quantized) == len(matmul_weights)
    assert numpy_helper.to_array(next(i for i in at_once.graph.initializer if i.name == weight.name + "_scale"))[1] == 1.0
    assert {i.name: i.SerializeToString() for i in at_once.graph.initializer} == \
        {i.name: i.SerializeToString() for i in looped.graph.initializer}
    assert [n.SerializeToString() for n in at_once.graph.node] == [n.SerializeToString() for n in looped.graph.node]


def test_query_embedding_matches_pytorch_and_is_normalized(tiny_models, tiny_bundle):
    from edgerag.export.bundle import embed_passages
    from edgerag.models import load_encoder

    model, tokenizer, pooling, max_length = load_encoder(str(tiny_models[0]))
    texts = ["What is the capital of Poland?", "A much longer question about steam engines and heat and work?"]
    reference = embed_passages(model, tokenizer, pooling, max_length, texts, 8)
    pipeline = Pipeline.load(tiny_bundle)
    got = pipeline.encoder.encode(texts)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_quantized_query_encoder_within_recorded_delta(tiny_models, tiny_bundle_int8wo):
    from edgerag.export.bundle import embed_passages
    from edgerag.models import load_encoder

    model, tokenizer, pooling, max_length = load_encoder(str(tiny_models[0]))
    texts = ["Which river flows through Warsaw?", "Who designed the first practical steam engine?"]
    pipeline = Pipeline.load(tiny_bundle_int8wo)
    assert pipeline.manifest.query_encoder.quantization["method"] == "int8wo"
    recorded = pipeline.manifest.parity["max_abs_embedding_delta"]["shipped"]
    assert recorded > 0  # the shipped encoder is not the fp32 one
    got = pipeline.encoder.encode(texts)
    assert np.abs(got - embed_passages(model, tokenizer, pooling, max_length, texts, 8)).max() <= 3 * recorded + 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_retrieval_equals_exact_numpy_search(tiny_bundle):
    import sqlite3

    pipeline = Pipeline.load(tiny_bundle)
    db = sqlite3.connect(tiny_bundle / "passages.sqlite")
    rows = db.execute("SELECT id, title, text FROM passages ORDER BY row").fetchall()
    fmt = pipeline.manifest.index.passage_format
    # the bundle's passages were embedded with the same (PyTorch) encoder the ONNX graph reproduces
    matrix = pipeline.encoder.encode([fmt.format(title=t, text=x) for _, t, x in rows])
    for question in ["Which team won Super Bowl 50?", "capital of Poland", "oxygen atomic number", "steam"]:
        scores = matrix @ pipeline.encoder.encode([question])[0]
        exact = [rows[i][0] for i in np.argsort(-scores)[:5]]
        got = pipeline.retrieve(question, k=5)
        assert [p["id"] for p in got] == exact
        np.testing.assert_allclose([p["score"] for p in got], np.sort(scores)[::-1][:5], atol=1e-4)


def test_index_of_the_same_vectors_is_the_same_bytes(tmp_path):
    from edgerag.export.bundle import build_index

    vectors = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    build_index(vectors, tmp_path / "a.bin", m=16, ef_construction=100)
    build_index(vectors, tmp_path / "b.bin", m=16, ef_construction=100)
    # two exports of one student must not differ in the index alone (threads racing to insert would)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_ask_stream_and_batch_agree(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle)
    question = "Which team won Super Bowl 50?"
    answer = pipeline.ask(question, max_new_tokens=8)
    assert set(answer.timings) >= {"encode_ms", "search_ms", "prefill_ms", "decode_ms", "total_ms"}
    assert len(answer.passages) == 2 and {"id", "title", "score", "text"} <= set(answer.passages[0])
    assert answer.new_tokens > 0  # a random model may emit only whitespace, so the text may be empty
    streamed = "".join(pipeline.stream(question, max_new_tokens=8))
    assert streamed.strip() == answer.answer
    batch = pipeline.ask_batch([question, "What is the capital of Poland?"], max_new_tokens=8)
    assert batch[0].answer == answer.answer and len(batch) == 2


def test_question_far_over_context_is_truncated_not_crashed(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle)
    answer = pipeline.ask("Which team won? " * 400, max_new_tokens=4)
    assert answer.prompt_tokens <= pipeline.manifest.generator.max_context - 4


def test_empty_question_is_refused(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle)
    for bad in ["", "   "]:
        with pytest.raises(PromptError, match="empty"):
            pipeline.ask(bad)


def test_added_passages_are_retrievable(tiny_bundle):
    pipeline = Pipeline.load(tiny_bundle)
    own = pipeline.retrieve("Warsaw", k=1)[0]
    extra = ("extra1", "Zanzibar", "Zanzibar is an archipelago off the coast of Tanzania.")
    assert pipeline.add_passages([extra, (own["id"], own["title"], own["text"])]) == 1  # known ids are skipped
    assert pipeline.add_passages([extra]) == 0
    found = pipeline.retrieve("Zanzibar is an archipelago off the coast of Tanzania.", k=pipeline.size)
    assert found[0]["id"] == "extra1"
    assert len({p["id"] for p in found}) == len(found) == pipeline.size


def _copy(bundle, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(bundle, target)
    return target


def test_every_byte_of_every_file_is_covered(tiny_bundle, tmp_path):
    rng = np.random.default_rng(0)
    names = sorted(p.name for p in tiny_bundle.iterdir())
    assert MANIFEST in names and len(names) >= 7
    for name in names:
        size = (tiny_bundle / name).stat().st_size
        for offset in {0, size - 1, int(rng.integers(size))}:
            copy = _copy(tiny_bundle, tmp_path / f"{name}-{offset}")
            data = bytearray((copy / name).read_bytes())
            data[offset] ^= 0x01
            (copy / name).write_bytes(bytes(data))
            with pytest.raises(BundleError) as error:
                Pipeline.load(copy)
            assert name in str(error.value) or (name == MANIFEST and "manifest" in str(error.value))


def test_missing_file_is_named(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    (copy / "index.hnsw").unlink()
    with pytest.raises(BundleError, match="missing file index.hnsw"):
        Pipeline.load(copy)


def test_unknown_format_version(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["format_version"] = 99
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown bundle format version 99"):
        Pipeline.load(copy)


def test_verify_passes_on_a_good_bundle(tiny_bundle):
    manifest = verify(tiny_bundle)
    assert set(manifest.files) == {p.name for p in tiny_bundle.iterdir()} - {MANIFEST}


def test_generator_logits_are_the_last_positions_asked_for(tiny_bundle):
    """The last position's logits unless a run asks for more with logits_to_keep; each kept row is the
    logits that position would have as the last one."""
    import onnx

    graph = onnx.load(str(tiny_bundle / "generator.onnx")).graph
    logits = next(o for o in graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_param == "logits_to_keep"
    pipeline = Pipeline.load(tiny_bundle)
    feed_len = 20
    ids = list(range(5, 5 + feed_len))
    feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, feed_len), dtype=np.int64),
            **pipeline.generator.empty_cache()}
    out = pipeline.generator.session.run(["logits"], feed)[0]
    assert out.shape[1] == 1
    np.testing.assert_allclose(out[0, -1], pipeline.generator.last_logits(ids))
    kept = pipeline.generator.session.run(["logits"], {**feed, "logits_to_keep": np.array([3])})[0]
    assert kept.shape[1] == 3
    for row, end in zip(kept[0], range(feed_len - 2, feed_len + 1)):
        np.testing.assert_allclose(row, pipeline.generator.last_logits(ids[:end]), rtol=1e-4, atol=1e-5)


def test_optimum_generator_logits_are_last_position_only(tiny_bundle_optimum):
    import onnx

    graph = onnx.load(str(tiny_bundle_optimum / "generator.onnx")).graph
    logits = next(o for o in graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1
    pipeline = Pipeline.load(tiny_bundle_optimum)
    feed_len = 20
    ids = list(range(5, 5 + feed_len))
    feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, feed_len), dtype=np.int64),
            **pipeline.generator.empty_cache()}
    if "position_ids" in pipeline.generator.input_names:
        feed["position_ids"] = np.arange(feed_len)[None]
    out = pipeline.generator.session.run(["logits"], feed)[0]
    assert out.shape[1] == 1
    np.testing.assert_allclose(out[0, -1], pipeline.generator.last_logits(ids))


def test_tied_embeddings_stored_once_in_fp32(tiny_bundle):
    import onnx

    graph = onnx.load(str(tiny_bundle / "generator.onnx")).graph
    vocab = read_manifest(tiny_bundle).generator.vocab_size
    embedding_sized = [i.name for i in graph.initializer if vocab in i.dims]
    assert len(embedding_sized) == 1, embedding_sized


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle_int8wo", "tiny_bundle_int4", "tiny_bundle_optimum",
                                            "tiny_bundle_int8sq"])
def test_quantized_bundles_keep_no_fp32_vocabulary_table(bundle_fixture, request):
    import onnx

    bundle = request.getfixturevalue(bundle_fixture)
    graph = onnx.load(str(bundle / "generator.onnx")).graph
    generator = read_manifest(bundle).generator
    shapes = ([generator.vocab_size, generator.hidden_size], [generator.hidden_size, generator.vocab_size])
    fp32_tables = [i.name for i in graph.initializer if list(i.dims) in shapes and i.data_type == onnx.TensorProto.FLOAT]
    assert fp32_tables == []
    assert "GatherBlockQuantized" in {n.op_type for n in graph.node}


def test_smoothing_is_exact_in_fp32_and_moves_the_ranges(tiny_models):
    import torch

    from edgerag.export.smoothquant import smooth_llama
    from edgerag.models import load_generator

    model, _ = load_generator(str(tiny_models[1]))
    prompt = list(range(5, 45))
    smoothed = smooth_llama(model, [prompt, list(range(50, 80))])
    with torch.no_grad():
        before = model(torch.tensor([prompt])).logits
        after = smoothed(torch.tensor([prompt])).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    norm, smoothed_norm = model.model.layers[0].input_layernorm.weight, smoothed.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, smoothed_norm)  # the copy changed, the original did not
    # the attention output's range moved into o_proj through V (4 query heads on 2 KV heads here)
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, smoothed.model.layers[0].self_attn.v_proj.weight)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)


def test_int8sq_makes_the_smoothed_projections_and_the_lm_head_dynamic_int8(tiny_bundle_int8sq):
    import onnx

    manifest = read_manifest(tiny_bundle_int8sq)
    quantization = manifest.generator.quantization
    assert quantization["method"] == "int8sq" and quantization["calibration_prompts"] > 0
    ops = [n.op_type for n in onnx.load(str(tiny_bundle_int8sq / "generator.onnx")).graph.node]
    layers = manifest.generator.num_layers
    dynamic = sum(op in ("DynamicQuantizeMatMul", "MatMulInteger") for op in ops)
    assert dynamic == 3 * layers + 1  # QKV, attention output and gate/up in every layer, the LM head
    assert ops.count("MatMulNBits") == layers  # the down projections


def test_int8swo_is_weight_only_on_the_smoothed_graph(tiny_bundle_int8swo, tiny_bundle_int8wo):
    """int8swo: every MatMul 8-bit weight-only, as int8wo, but of the SmoothQuant-smoothed graph (its
    norms carry the smoothing, so its weights differ from int8wo's)."""
    import onnx
    from onnx import numpy_helper

    manifest = read_manifest(tiny_bundle_int8swo)
    quantization = manifest.generator.quantization
    assert quantization["method"] == "int8swo" and quantization["calibration_prompts"] > 0
    graphs = {name: onnx.load(str(bundle / "generator.onnx")) for name, bundle in
              (("int8swo", tiny_bundle_int8swo), ("int8wo", tiny_bundle_int8wo))}
    ops = [n.op_type for n in graphs["int8swo"].graph.node]
    assert "DynamicQuantizeMatMul" not in ops and "MatMulInteger" not in ops
    assert ops.count("MatMulNBits") == [n.op_type for n in graphs["int8wo"].graph.node].count("MatMulNBits")
    norms = [{i.name: numpy_helper.to_array(i) for i in g.graph.initializer}["layers.0.input_norm"] for g in graphs.values()]
    assert not np.allclose(*norms)


def test_auto_quantization_follows_the_generator_graph(tiny_bundle_optimum):
    from edgerag.export import resolve_quantization

    assert read_manifest(tiny_bundle_optimum).generator.quantization_method == "int8wo"
    assert resolve_quantization("auto", "fused-llama") == "int8sq"
    assert resolve_quantization("int4", "fused-llama") == "int4"


def test_embedding_tables_take_the_largest_block_that_divides_their_width():
    """Blocks of 128 do not divide SmolLM2's 576-wide table; it takes 64 instead of staying fp32."""
    import onnx
    from onnx import helper, numpy_helper

    from edgerag.export.quantize import embedding_block_size, quantize_embeddings

    assert [embedding_block_size(576, b) for b in (16, 32, 64, 128, 256)] == [16, 32, 64, 64, 64]
    assert embedding_block_size(24, 32) is None  # no power of two of 16 or more divides 24
    table = np.random.default_rng(0).standard_normal((10, 576)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])], "lookup",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, [None, 576])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_embeddings(model, block_size=128) == {"table": 64}
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"ids": np.array([0, 3, 9])})[0]
    np.testing.assert_allclose(rows, table[[0, 3, 9]], atol=np.abs(table).max() / 127)
