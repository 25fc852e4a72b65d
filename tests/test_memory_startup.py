"""Memory and start-up settings: the graphs' weights outside the graphs (memory-mapped), and the
honest decode floor. Each setting must leave the runtime's output tokens unchanged."""

import json
import shutil
from pathlib import Path

import onnx
import pytest

from edgerag.benchmarks.machine import onnx_weight_bytes
from edgerag.runtime import Pipeline
from edgerag.runtime import DecoderOnlyGenerator
from edgerag.runtime.manifest import MANIFEST, BundleError, dump_manifest, file_record

QUESTIONS = ["Which team won Super Bowl 50?", "What is the capital of Poland?", "Where is Normandy?"]


def _weights_inside(bundle, target):
    """A copy of `bundle` whose graphs hold their weights inside (as bundles did before)."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / MANIFEST).read_text())
    for key in ("query_encoder", "generator"):
        spec = manifest[key]
        graph = onnx.load(str(target / spec["onnx"]))  # reads the external weights
        (target / spec["weights"]).unlink()
        onnx.save_model(graph, str(target / spec["onnx"]), save_as_external_data=False)
        del manifest["files"][spec["weights"]]
        manifest["files"][spec["onnx"]] = vars(file_record(target / spec["onnx"]))
        del spec["weights"]  # as in a manifest written before the key existed
    (target / MANIFEST).write_bytes(dump_manifest(manifest))
    return target


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_int8sq"])
def test_weights_outside_the_graph_give_the_same_tokens(bundle_fixture, request, tmp_path):
    bundle = request.getfixturevalue(bundle_fixture)
    manifest = json.loads((bundle / MANIFEST).read_text())
    for key in ("query_encoder", "generator"):
        weights = manifest[key]["weights"]
        assert weights in manifest["files"] and (bundle / weights).stat().st_size > (bundle / manifest[key]["onnx"]).stat().st_size
    inside = _weights_inside(bundle, tmp_path / "inside")
    outside, before = Pipeline.load(bundle), Pipeline.load(inside)
    for question in QUESTIONS:
        a, b = outside.ask(question, max_new_tokens=8), before.ask(question, max_new_tokens=8)
        assert a.answer == b.answer and a.new_tokens == b.new_tokens
        assert [p["id"] for p in a.passages] == [p["id"] for p in b.passages]


def test_missing_or_changed_weights_file_is_named(tiny_bundle, tmp_path):
    weights = json.loads((tiny_bundle / MANIFEST).read_text())["generator"]["weights"]
    missing = tmp_path / "missing"
    shutil.copytree(tiny_bundle, missing)
    (missing / weights).unlink()
    with pytest.raises(BundleError, match=f"missing file {weights}"):
        Pipeline.load(missing)
    with pytest.raises(BundleError, match=weights):
        Pipeline.load(missing, check=False)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_bundle, changed)
    with open(changed / weights, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=f"checksum mismatch for {weights}"):
        Pipeline.load(changed)


def test_decode_floor_leaves_out_gathered_tables(tiny_bundle, tiny_bundle_int8wo):
    """The input embedding is read one row per token: a table only gathered from (8-bit blocks and
    their scales in a quantized bundle) is not part of the bytes a decode step reads; a table the LM
    head also reads (tied, fp32) is."""
    def sizes(bundle):
        manifest = json.loads((bundle / MANIFEST).read_text())
        path = bundle / manifest["generator"]["onnx"]
        total = sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)
        return onnx_weight_bytes(path), total, manifest["generator"]["vocab_size"] * manifest["generator"]["hidden_size"]

    read, total, table = sizes(tiny_bundle)
    assert read == total  # tied: the LM head reads the whole table every step
    read, total, table = sizes(tiny_bundle_int8wo)
    assert total - table - table // 4 <= read <= total - table  # the 8-bit table (1 byte a value) and its scales left out


def test_encoder_spinning_setting_gives_the_same_answers(tiny_bundle_int8sq, monkeypatch):
    """The query encoder's threads do not spin between questions (start-up and latency setting); the
    answers are the ones a spinning encoder gives."""
    import edgerag.runtime.loading as loading_module

    quiet = Pipeline.load(tiny_bundle_int8sq)
    made = loading_module.make_session
    monkeypatch.setattr(loading_module, "make_session",
                        lambda path, threads, provider="CPUExecutionProvider", spinning=True: made(path, threads, provider, True))
    spinning = Pipeline.load(tiny_bundle_int8sq)
    for question in QUESTIONS:
        a, b = quiet.ask(question, max_new_tokens=8), spinning.ask(question, max_new_tokens=8)
        assert (a.answer, a.new_tokens, [p["id"] for p in a.passages]) == (b.answer, b.new_tokens, [p["id"] for p in b.passages])


def test_decode_steps_count_every_forward_pass_after_the_prefill(tiny_bundle):
    """decode_ms is the time of every step after the prefill, the one that yields a stop token too: the
    per-token figures divide by that count, not by the tokens kept. (One token a step here; with
    prompt lookup's drafts, see tests/test_prompt_lookup.py.)"""
    pipeline = Pipeline.load(tiny_bundle, prompt_lookup=0)
    prompt = pipeline.prompt_ids("Which team won Super Bowl 50?", [("Super Bowl", "Denver won.")])
    free = pipeline.generator.greedy(prompt, 6)
    assert free.stop_reason == "length" or free.decode_steps == len(free.tokens)
    first = free.tokens[0]
    stopping = type(pipeline.generator)(pipeline.generator.session, [free.tokens[2]] if len(free.tokens) > 2 else [first],
                                        reuse_prefix="none")
    stopped = stopping.greedy(prompt, 6)
    assert stopped.stop_reason == "stop"
    assert stopped.decode_steps == len(stopped.tokens)  # the stop token's step counted, the token not kept
    for generation in (free, stopped):  # each step's time, in order, adds up to decode_ms
        assert len(generation.step_ms) == generation.decode_steps and all(ms > 0 for ms in generation.step_ms)
        assert generation.decode_tokens == generation.decode_steps
        assert sum(generation.step_ms) == pytest.approx(generation.decode_ms)
    if free.stop_reason == "length":
        assert free.decode_steps == len(free.tokens) - 1
    answer = pipeline.ask("Which team won Super Bowl 50?", max_new_tokens=6)
    assert answer.timings["decode_steps"] >= max(answer.new_tokens - 1, 0)


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "tiny_bundle_int8sq"])
@pytest.mark.parametrize("reuse", ["none", "template", "previous"])
def test_kv_cache_in_place_gives_the_tokens_of_the_copying_loop(bundle_fixture, reuse, request):
    """A fused Llama bundle decodes with each layer's past and present in one buffer that the attention
    appends to; the tokens are the ones of the loop that copies the cache into a new present each step,
    with every prefix-reuse mode (whose cached KV then comes from the shared buffers)."""
    bundle = request.getfixturevalue(bundle_fixture)
    pipeline = Pipeline.load(bundle, reuse_prefix=reuse, prompt_lookup=0)  # drafts: tests/test_prompt_lookup.py
    in_place = pipeline.generator
    assert in_place.kv_in_place
    copying = DecoderOnlyGenerator(in_place.session, in_place.stop, reuse, in_place.cached_prompt_ids,
                                   kv_in_place=False)
    passages = [("Super Bowl 50", "The Denver Broncos defeated the Carolina Panthers."),
                ("Warsaw", "Warsaw is the capital and largest city of Poland.")]
    for question in QUESTIONS + QUESTIONS[:1]:
        prompt = pipeline.prompt_ids(question, passages)
        a, b = in_place.greedy(prompt, 10), copying.greedy(prompt, 10)
        assert (a.tokens, a.reused_prompt_tokens, a.stop_reason) == (b.tokens, b.reused_prompt_tokens, b.stop_reason)
        assert a.tokens
    if reuse == "previous":
        assert a.reused_prompt_tokens > 0


def test_kv_cache_in_place_only_for_graphs_that_append_in_place(tiny_bundle_optimum):
    """The traced (Optimum) graph concatenates past and new positions into a new present: it keeps the
    copying loop."""
    assert not Pipeline.load(tiny_bundle_optimum).generator.kv_in_place


@pytest.mark.parametrize("method", ["none", "int8wo"])
def test_lm_head_in_slices_gives_the_same_logits(tiny_models, tmp_path, method):
    """The LM head computed in vocabulary slices (bounding the load-time copy of its prepacked weight)
    gives the whole head's logits: bit for bit in fp32, and within a rounding step once each slice is
    quantized on its own."""
    import numpy as np

    from edgerag.export import onnx_export
    from edgerag.export.quantize import quantize
    from edgerag.runtime import make_session

    graph, _ = onnx_export.export_generator(tiny_models[1])
    whole = onnx_export.untie_lm_head(graph)
    hidden, vocab = next(i.dims for i in whole.graph.initializer if i.name == "lm_head.weight")
    sliced = onnx_export.split_lm_head(onnx.ModelProto.FromString(whole.SerializeToString()), max_params=hidden * vocab // 3)
    assert sum(n.name.startswith("lm_head.") and n.op_type == "MatMul" for n in sliced.graph.node) >= 3
    unsplit = onnx_export.split_lm_head(onnx.ModelProto.FromString(whole.SerializeToString()))  # small enough already
    assert not any(n.name == "lm_head.concat" for n in unsplit.graph.node)
    if method != "none":  # quantize() slices the head itself at its default size: compare at equal slicing
        whole, _ = quantize(whole, method)
        sliced, _ = quantize(sliced, method)
    for model, name in ((whole, "whole"), (sliced, "sliced")):
        onnx_export.save(model, tmp_path / f"{name}.onnx")
    prompt = [5, 17, 3, 42, 8, 11]
    logits = {}
    for name in ("whole", "sliced"):
        generator = DecoderOnlyGenerator(make_session(tmp_path / f"{name}.onnx", 1), [], reuse_prefix="none", kv_in_place=True)
        logits[name] = generator.last_logits(prompt)
        assert logits[name].shape == (vocab,)
    if method == "none":
        assert np.array_equal(logits["whole"], logits["sliced"])
    else:
        assert np.argmax(logits["whole"]) == np.argmax(logits["sliced"])
        assert np.abs(logits["whole"] - logits["sliced"]).max() < 0.05 * np.abs(logits["whole"]).max()


def _weight_mappings(path):
    """VmFlags of this process's mappings of `path` (Linux)."""
    flags, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:
                current = len(fields) == 6 and fields[5].strip() == str(path.resolve())
            elif line.startswith("VmFlags:") and current:
                flags.append(line.split()[1:])
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_mapped_weights_are_read_on_demand(tiny_bundle_int8sq, monkeypatch):
    """After a load, the generator's memory-mapped weights are marked random-access (a fault maps the
    page it needs, not its neighbours), and the answers are the ones of a load that leaves them as
    onnxruntime mapped them."""
    import edgerag.runtime.pipeline as pipeline_module

    pipeline = Pipeline.load(tiny_bundle_int8sq)
    weights = tiny_bundle_int8sq / pipeline.manifest.generator.weights
    mappings = _weight_mappings(weights)
    if not mappings:
        pytest.skip("this onnxruntime reads the external weights instead of mapping them")
    assert all("rr" in flags for flags in mappings)
    monkeypatch.setattr(pipeline_module, "read_weights_on_demand", lambda paths: None)
    plain = Pipeline.load(tiny_bundle_int8sq)
    for question in QUESTIONS:
        a, b = pipeline.ask(question, max_new_tokens=8), plain.ask(question, max_new_tokens=8)
        assert (a.answer, a.new_tokens) == (b.answer, b.new_tokens)


def test_huge_pages_wait_for_answers_and_keep_them(tiny_bundle_int8sq, monkeypatch):
    """After a load, the memory it allocated is moved to huge pages in a background thread, which
    waits for the first answer to end and never works while an answer is being generated; the
    answers are the ones of a load that moves nothing."""
    import threading

    import edgerag.runtime.memory as memory_module

    if not memory_module.huge_pages_allowed():
        pytest.skip("transparent huge pages are off or absent here")
    collapsed, made = [], memory_module.collapse_into_huge_pages

    def spy(regions):
        if threading.current_thread() is pipeline.huge_pages:  # other tests' pipelines may be collapsing too
            collapsed.append(pipeline.answers_in_flight.idle.is_set() and pipeline.answers_in_flight.answered.is_set())
        return made(regions)

    monkeypatch.setattr(memory_module, "collapse_into_huge_pages", spy)
    monkeypatch.setattr(Pipeline, "HUGE_PAGES_WITHOUT_QUESTION_S", 60.0)
    pipeline = Pipeline.load(tiny_bundle_int8sq)
    assert pipeline.huge_pages is not None
    assert not collapsed  # nothing before the first answer
    first = pipeline.ask(QUESTIONS[0], max_new_tokens=8)
    pipeline.huge_pages.join(timeout=60)
    assert not pipeline.huge_pages.is_alive()
    if not collapsed:
        pytest.skip("the load allocated no fully resident mapping of 2 MB or more")
    assert all(collapsed)
    monkeypatch.setattr(memory_module, "collapse_into_huge_pages", lambda regions: 0)
    plain = Pipeline.load(tiny_bundle_int8sq)
    for question in QUESTIONS:
        a, b = pipeline.ask(question, max_new_tokens=8), plain.ask(question, max_new_tokens=8)
        assert (a.answer, a.new_tokens) == (b.answer, b.new_tokens)
    assert first.answer == pipeline.ask(QUESTIONS[0], max_new_tokens=8).answer


def test_collapse_moves_a_resident_mapping_to_huge_pages():
    """collapse_into_huge_pages backs a fully resident anonymous mapping with 2 MB pages, where the
    kernel can (Linux 6.1+ with transparent huge pages on), and leaves its contents as they were."""
    import ctypes
    import mmap

    import numpy as np

    from edgerag.runtime.memory import HUGE_PAGE, collapse_into_huge_pages

    size = 5 * HUGE_PAGE
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared memory is not collapsed
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)  # written on 4 KB pages, as a busy machine would give them
    values = np.frombuffer(memory, dtype=np.float64)
    values[:] = np.arange(values.size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)  # lift the refusal; the pages stay small until collapsed
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    collapsed = collapse_into_huge_pages([(address, address + size)])
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if collapsed == 0:
        pytest.skip(f"the kernel collapsed nothing (transparent huge pages: {thp.read_text().strip() if thp.exists() else 'absent'})")
    assert collapsed >= 4 * HUGE_PAGE
    assert np.array_equal(values, np.arange(values.size, dtype=np.float64))
    del values


def test_collapse_waits_for_the_first_answer_and_between_answers(monkeypatch):
    """collapse_when_idle does nothing before the first answer ends, and nothing while an answer is
    being generated; then it moves the mappings made since it was given the list, 2 MB at a time."""
    import ctypes
    import mmap
    import threading
    import time

    import numpy as np

    import edgerag.runtime.memory as memory_module
    from edgerag.runtime.memory import FULLY_RESIDENT, HUGE_PAGE, AnswersInFlight, anonymous_regions, collapse_when_idle

    before = anonymous_regions()
    memory = mmap.mmap(-1, 5 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    np.frombuffer(memory, dtype=np.uint8)[:] = 1  # resident
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    holding = [(low, high, resident) for (low, high), resident in anonymous_regions(resident=True).items()
               if low <= address < high]
    if not holding or holding[0][2] < FULLY_RESIDENT * (holding[0][1] - holding[0][0]):
        pytest.skip("the kernel merged the mapping into a mostly empty neighbour")
    answers, calls = AnswersInFlight(), []
    mine = range(address, address + 5 * HUGE_PAGE)

    def spy(blocks):
        if threading.current_thread() is thread and blocks[0][0] in mine:  # other tests' pipelines collapse too
            calls.append((answers.idle.is_set(), blocks))
        return 0

    monkeypatch.setattr(memory_module, "collapse_into_huge_pages", spy)
    thread = threading.Thread(target=collapse_when_idle, args=(list(before), answers, 60.0))
    thread.start()
    time.sleep(0.2)
    assert not calls  # no answer yet
    with answers:       # the first answer runs...
        time.sleep(0.2)
        assert not calls
    thread.join(timeout=10)  # ...and ends: the work goes on
    assert not thread.is_alive()
    assert len(calls) >= 4 and all(idle for idle, _ in calls)
    assert all(len(blocks) == 1 and blocks[0][1] - blocks[0][0] == HUGE_PAGE and blocks[0][0] % HUGE_PAGE == 0
               for _, blocks in calls)
