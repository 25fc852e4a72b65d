"""`edgerag bench` end to end on tiny models: every system that can run here, tiny n and index sizes.

Checks the outputs' shape (schema keys, finite numbers, PNG plots), never timings.
"""

import json
import math

import pytest

from edgerag.benchmarks import machine
from edgerag.benchmarks.bench import DEFAULT_SYSTEMS

SYSTEM_KEYS = ("name", "threads", "p50_ms", "p95_ms", "ttft_ms", "prefill_ms", "decode_ms_per_token",
               "decode_floor_ms_per_token", "peak_rss_mb", "cold_start_s", "size_mb", "em", "f1", "recall@5")
INDEX_KEYS = ("n", "ef", "recall@10", "p50_query_ms", "p99_query_ms", "build_s", "memory_mb")
PNG = b"\x89PNG\r\n\x1a\n"
# every system of the bench, peers included, twice: about 80 s for bench_out, so its tests run in
# `make test-all`; the default suite runs the bench end to end in test_compress.py and test_rag.py
whole_bench = pytest.mark.slow


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def run_folder(tiny_models, tmp_path_factory):
    """A run-like folder (query_encoder/ + generator/) over the tiny models, used as teacher and student."""
    encoder, generator, _, _ = tiny_models
    folder = tmp_path_factory.mktemp("run") / "teacher"
    folder.mkdir()
    (folder / "query_encoder").symlink_to(encoder)
    (folder / "generator").symlink_to(generator)
    return folder


@pytest.fixture(scope="module")
def bench_out(tiny_bundle, tiny_bundle_int4, tiny_models, run_folder, tmp_path_factory):
    from edgerag.cli import main

    out = tmp_path_factory.mktemp("bench")
    squad = tiny_models[3]
    code = main(["bench", "--bundle", str(tiny_bundle), "--bundle", str(tiny_bundle_int4),
                 "--teacher", str(run_folder), "--student", str(run_folder), "--questions", str(squad),
                 "--n", "3", "--threads", "1", "--systems", "teacher-torch,student-torch,bundle,optimum-ort",
                 "--index-sizes", "300,600", "--index-corpus", str(squad), "--index-queries", str(squad),
                 "--quick-machine", "--max-new-tokens", "6", "--rounds", "2",
                 "--cache", str(out / "cache"), "--out", str(out)])
    assert code == 0
    return out


@whole_bench
def test_results_follow_the_schema(bench_out):
    results = json.loads((bench_out / "results.json").read_text())
    assert set(results) >= {"machine", "systems", "index"}
    for key in ("cpu", "cores", "bandwidth_gb_s", "matmul_gflops"):
        assert key in results["machine"]
    assert all(_finite(results["machine"][k]) and results["machine"][k] > 0 for k in ("bandwidth_gb_s", "matmul_gflops"))
    names = {s["name"] for s in results["systems"]}
    assert names == {"teacher-torch", "student-torch", "bundle-fp32", "bundle-int4", "optimum-ort"}, results.get("skipped")
    for row in results["systems"]:
        for key in SYSTEM_KEYS:
            assert key in row, key
            if key not in ("name",):
                assert _finite(row[key]) or (key == "decode_ms_per_token" and row[key] is None), (row["name"], key, row[key])
        assert row["threads"] == 1 and row["peak_rss_mb"] > 0 and row["size_mb"] > 0
        assert 0 <= row["f1"] <= 100 and 0 <= row["recall@5"] <= 100
        stages, phases = row["rss_by_stage_mb"], row["cold_start_phases_s"]
        assert list(stages)[-3:] == ["load", "first answer", "after 4 answers"] and all(v > 0 for v in stages.values())
        assert max(stages.values()) <= row["peak_rss_mb"] + 1
        assert "first answer" in phases and sum(phases.values()) <= row["cold_start_s"] + 0.01
        if row["name"].startswith("bundle"):
            assert list(stages)[0] == "import" and list(phases) == ["process start", "import", "load", "first answer"]
        assert row["huge_pages_mb"] is None or 0 <= row["huge_pages_mb"] <= row["peak_rss_mb"]
    assert [(r["vectors"], r["n"]) for r in results["index"]] == [("squad.json", 16), ("random", 300), ("random", 600)]
    real = results["index"][0]   # 12 passages and 4 questions, embedded with the bundle's encoder
    assert real["recall@10"] == 1.0 and real["reached_target"] and real["queries"] == 4
    for row in results["index"]:
        for key in INDEX_KEYS:
            assert _finite(row[key]), key
        assert 0 <= row["recall@10"] <= 1


@whole_bench
def test_report_and_plots(bench_out):
    report = (bench_out / "report.md").read_text()
    assert "| teacher-torch | 1 |" in report and "(1.00×)" in report  # ratios to the teacher
    assert "bundle-int4" in report
    assert "## Memory and start-up" in report and "| bundle-int4 | 1 |" in report.split("## Memory and start-up")[1]
    for name in ("latency_by_stage.png", "quality_vs_latency.png", "peak_memory.png"):
        assert (bench_out / name).read_bytes()[:8] == PNG


def test_bench_module_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, benchmarks.bench; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_floors():
    assert machine.decode_floor_ms(10e9, 10.0) == pytest.approx(1000.0)
    assert machine.prefill_floor_ms(machine.prefill_flops(1_000_000, 2, 64, 100), 1.0) == pytest.approx(
        (2e6 * 100 + 2 * 2 * 64 * 100 ** 2) / 1e9 * 1000)
    assert "ortgenai-int4" in DEFAULT_SYSTEMS


@whole_bench
def test_each_question_is_measured_against_the_bandwidth_after_it(bench_out):
    results = json.loads((bench_out / "results.json").read_text())["systems"]
    for row in results:
        workers = [json.loads(p.read_text()) for p in (bench_out / "work").glob(f"{row['name']}-t{row['threads']}*.result.json")]
        probes = [q["bandwidth_gb_s"] for w in workers for q in w["per_question"]]
        assert probes and all(_finite(b) and b > 0 for b in probes), row["name"]
        floor, weight_bytes = row["decode_floor_ms_per_token"], workers[0]["weight_bytes"]
        bounds = [machine.decode_floor_ms(weight_bytes, b) for b in (max(probes), min(probes))]
        assert bounds[0] * (1 - 1e-9) <= floor <= bounds[1] * (1 + 1e-9), row["name"]


@whole_bench
def test_every_decoder_only_system_has_a_floor_with_its_kv_cache(bench_out):
    results = json.loads((bench_out / "results.json").read_text())["systems"]
    for row in results:
        assert row["decode_floor_with_kv_ms_per_token"] > row["decode_floor_ms_per_token"], row["name"]
    assert "decode / floor w+KV" in (bench_out / "report.md").read_text()


@whole_bench
def test_rounds_pool_every_rounds_questions(bench_out):
    results = json.loads((bench_out / "results.json").read_text())
    assert results["setup"]["rounds"] == 2 and "2 rounds" in (bench_out / "report.md").read_text()
    for row in results["systems"]:
        workers = [json.loads(p.read_text()) for p in (bench_out / "work").glob(f"{row['name']}-t{row['threads']}*.result.json")]
        assert len(workers) == 2 and row["rounds"] == 2 and row["n"] == 2 * results["setup"]["n"]
        assert row["peak_rss_mb"] == max(w["peak_rss_mb"] for w in workers)
        assert row["cold_start_s"] in {w["cold_start_s"] for w in workers}


def test_decode_floor_weights_each_question_by_its_steps():
    from edgerag.benchmarks.summary import system_row

    question = {"total_ms": 10.0, "ttft_ms": 5.0, "prefill_ms": 4.0, "encode_ms": 0.5, "search_ms": 0.5,
                "prompt_tokens": 20, "new_tokens": 4, "em": 1.0, "f1": 1.0, "recall@5": 1.0}
    raw = {"name": "b", "threads": 1, "kind": "bundle", "quant": "fp32", "weight_bytes": 1e9, "matmul_params": 1e6,
           "layers": 2, "hidden": 64, "peak_rss_mb": 1.0, "cold_start_s": 1.0, "size_mb": 1.0, "load_s": 1.0,
           "per_question": [{**question, "decode_ms": 30.0, "decode_steps": 3, "bandwidth_gb_s": 10.0},
                            {**question, "decode_ms": 10.0, "decode_steps": 1, "bandwidth_gb_s": 20.0}]}
    limits = {"bandwidth_gb_s": 1.0, "ort_matmul_gflops": {"1": {"fp32": 1.0, "int8": 1.0}}}
    row = system_row(raw, limits)
    assert row["decode_floor_ms_per_token"] == pytest.approx((3 * 100.0 + 1 * 50.0) / 4)  # not the limits' 1000 ms
    assert row["decode_x_floor"] == pytest.approx(10.0 / 87.5)
    assert row["bandwidth_gb_s"] == pytest.approx(15.0)


def test_decode_floor_with_kv_adds_each_steps_cache():
    """The w+KV floor reads, at the j-th decode step, the weights and the KV of the prompt's positions
    and of j generated ones; with no cache it is the weights-only floor."""
    from edgerag.benchmarks.summary import system_row

    question = {"total_ms": 10.0, "ttft_ms": 5.0, "prefill_ms": 4.0, "encode_ms": 0.5, "search_ms": 0.5,
                "prompt_tokens": 20, "new_tokens": 4, "em": 1.0, "f1": 1.0, "recall@5": 1.0}
    raw = {"name": "b", "threads": 1, "kind": "bundle", "quant": "fp32", "weight_bytes": 1e9, "matmul_params": 1e6,
           "layers": 2, "hidden": 64, "peak_rss_mb": 1.0, "cold_start_s": 1.0, "size_mb": 1.0, "load_s": 1.0,
           "kv_bytes_prompt_position": 1e6, "kv_bytes_new_position": 2e6,
           "per_question": [{**question, "decode_ms": 30.0, "decode_steps": 3, "bandwidth_gb_s": 10.0}]}
    limits = {"bandwidth_gb_s": 1.0, "ort_matmul_gflops": {"1": {"fp32": 1.0, "int8": 1.0}}}
    row = system_row(raw, limits)
    read = 3 * (1e9 + 20 * 1e6) + 2e6 * (1 + 2 + 3)  # bytes over the three steps
    assert row["decode_floor_with_kv_ms_per_token"] == pytest.approx(read / 10e9 * 1000 / 3)
    assert row["decode_x_floor_with_kv"] == pytest.approx(10.0 / row["decode_floor_with_kv_ms_per_token"])
    assert row["decode_x_floor_with_kv"] < row["decode_x_floor"]
    no_cache = system_row({**raw, "kv_bytes_prompt_position": 0, "kv_bytes_new_position": 0}, limits)
    assert no_cache["decode_floor_with_kv_ms_per_token"] == pytest.approx(no_cache["decode_floor_ms_per_token"])
    assert system_row({k: v for k, v in raw.items() if not k.startswith("kv_")}, limits)["decode_x_floor_with_kv"] is None


def test_kv_bytes_per_position_of_a_bundle_and_its_torch_model(tiny_models, tiny_bundle):
    """The bundle's generator graph and the model it was exported from agree on the KV a position
    costs: every layer's K and V over its KV heads, fp32."""
    import json

    from transformers import AutoModelForCausalLM

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    graph = machine.onnx_kv_bytes_per_position(tiny_bundle / manifest["generator"]["onnx"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models[1]))
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    expected = c.num_hidden_layers * 2 * kv_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert graph == machine.torch_kv_bytes_per_position(model) == {
        "kv_bytes_prompt_position": expected, "kv_bytes_new_position": expected}


def test_kv_bytes_with_a_symbolic_head_size(tmp_path):
    """onnxruntime-genai's builder leaves the KV head size symbolic: the caller names it, or there is no KV floor."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", dtype, ["batch", 2, "past", "kv_cache_dim"])
              for i in range(3) for kv, dtype in (("key", TensorProto.FLOAT), ("value", TensorProto.FLOAT16))]
    graph = helper.make_graph([helper.make_node("Identity", [inputs[0].name], ["out"])], "g", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    assert machine.onnx_kv_bytes_per_position(tmp_path / "model.onnx") == {}
    per_position = 3 * 2 * 8 * (4 + 2)  # three layers, two heads of 8, an fp32 key and an fp16 value
    assert machine.onnx_kv_bytes_per_position(tmp_path / "model.onnx", head_dim=8) == {
        "kv_bytes_prompt_position": per_position, "kv_bytes_new_position": per_position}


def test_cli_registers_bench():
    from edgerag.cli import build_parser

    args = build_parser().parse_args(["bench", "--bundle", "b", "--questions", "q.json", "--out", "o"])
    assert args.n == 200 and args.threads == "1,2" and callable(args.func)


def test_unavailable_baseline_is_recorded_as_skipped(tiny_bundle, monkeypatch, tmp_path):
    """onnxruntime-genai that cannot be installed is reported with its reason, not faked or fatal."""
    import argparse

    from edgerag.benchmarks import baselines, bench
    from edgerag.runtime.manifest import read_manifest

    def no_venv(venv, log):
        raise baselines.Skip("pip install onnxruntime-genai failed: no network")

    monkeypatch.setattr(baselines, "genai_python", no_venv)
    args = argparse.Namespace(systems="bundle,ortgenai-int4,teacher-torch", student=None, teacher=None, prompt_lookup="")
    plan, skipped = bench.plan_systems(args, [tiny_bundle], [read_manifest(tiny_bundle)], tmp_path)
    assert [p["name"] for p in plan] == ["bundle-fp32"]
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert "no network" in reasons["ortgenai-int4"] and "teacher" in reasons["teacher-torch"]


def test_bundles_of_one_option_are_told_apart_by_block_size(tiny_bundle_int8wo, tmp_path):
    """A second export of the same --quantize gets its block size in its label (primes after that),
    so a report's rows name the bundle they measured."""
    import argparse
    import copy

    from edgerag.benchmarks import bench
    from edgerag.runtime.manifest import read_manifest

    manifest = read_manifest(tiny_bundle_int8wo)
    other_blocks = copy.deepcopy(manifest)
    other_blocks.generator.quantization["block_size"] = 2 * manifest.generator.quantization["block_size"]
    args = argparse.Namespace(systems="bundle", student=None, teacher=None, prompt_lookup="")
    plan, _ = bench.plan_systems(args, [tiny_bundle_int8wo] * 3, [manifest, other_blocks, manifest], tmp_path)
    block = manifest.generator.quantization["block_size"]
    assert [p["name"] for p in plan] == ["bundle-int8wo", f"bundle-int8wo-b{2 * block}", f"bundle-int8wo-b{block}"]
    assert [p["prompt_lookup"] for p in plan] == [None] * 3


def test_each_prompt_lookup_setting_is_a_row_of_its_own(tiny_bundle_int8wo, tmp_path):
    import argparse

    from edgerag.benchmarks import bench
    from edgerag.runtime.manifest import read_manifest

    args = argparse.Namespace(systems="bundle", student=None, teacher=None, prompt_lookup="4,0")
    plan, _ = bench.plan_systems(args, [tiny_bundle_int8wo], [read_manifest(tiny_bundle_int8wo)], tmp_path)
    assert [(p["name"], p["prompt_lookup"]) for p in plan] == [("bundle-int8wo-lookup4", 4), ("bundle-int8wo-lookup0", 0)]


def test_decode_per_token_and_per_step_differ_by_the_drafts_accepted():
    from edgerag.benchmarks.summary import system_row

    question = {"total_ms": 10.0, "ttft_ms": 5.0, "prefill_ms": 4.0, "encode_ms": 0.5, "search_ms": 0.5,
                "prompt_tokens": 20, "new_tokens": 6, "em": 1.0, "f1": 1.0, "recall@5": 1.0, "bandwidth_gb_s": 10.0}
    raw = {"name": "b", "threads": 1, "kind": "bundle", "quant": "fp32", "weight_bytes": 1e9, "matmul_params": 1e6,
           "layers": 2, "hidden": 64, "peak_rss_mb": 1.0, "cold_start_s": 1.0, "size_mb": 1.0, "load_s": 1.0,
           "per_question": [{**question, "decode_ms": 300.0, "decode_steps": 2, "decode_tokens": 6},
                            {**question, "decode_ms": 100.0, "decode_steps": 2, "decode_tokens": 2}]}
    row = system_row(raw, {"bandwidth_gb_s": 1.0, "ort_matmul_gflops": {"1": {"fp32": 1.0, "int8": 1.0}}})
    assert row["decode_ms_per_token"] == pytest.approx(400 / 8)
    assert row["decode_ms_per_step"] == pytest.approx(400 / 4)
    assert row["tokens_per_step"] == pytest.approx(2.0)
    # the floor reads the weights once per step: 100 ms at 10 GB/s
    assert row["decode_x_floor"] == pytest.approx(0.5) and row["decode_step_x_floor"] == pytest.approx(1.0)


def test_decode_profile_breaks_a_step_down(tiny_bundle, tiny_models, tmp_path, capsys):
    """The decode profiler runs onnxruntime's profiler on a real bundle and accounts for a step: its
    operators' times add up to the kernel time, which lies inside the run, which lies inside the loop."""
    from edgerag.benchmarks.probes import decode

    _, _, _, squad = tiny_models
    out = tmp_path / "profile.json"
    assert decode.profile_command([str(tiny_bundle), "--questions", str(squad), "--threads", "1", "--new-tokens", "6",
                                "--rounds", "2", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["steps"] == 5 and figures["ops_ms_per_step"]
    assert abs(sum(figures["ops_ms_per_step"].values()) - figures["kernel_ms_per_step"]) < 1e-6
    assert 0 < figures["kernel_ms_per_step"] <= figures["run_ms_per_step"]
    assert figures["loop_ms_per_token"] >= figures["ort_run_ms_per_token"] > 0
    assert "ms/token" in capsys.readouterr().out


def test_decode_parts_takes_the_fused_graph_apart(tiny_bundle_int8sq):
    """The matmuls-only graph holds every matmul of the step and their weights; the three graphs run."""
    import onnx

    from edgerag.benchmarks.probes import decode

    graph = tiny_bundle_int8sq / json.loads((tiny_bundle_int8sq / "manifest.json").read_text())["generator"]["onnx"]
    model = onnx.load(str(graph))
    result = decode.measure_parts(graph, threads=1, positions=(4, 12), rounds=1, repeats=3)
    assert result["matmuls"] == sum(n.op_type in decode.MATMULS for n in model.graph.node)
    assert result["matmul_weight_bytes"] > 0
    assert set(result["ms"]) == {"whole step, 4 cached positions", "whole step, 12 cached positions", "no attention", "matmuls only"}
    assert all(ms > 0 for ms in result["ms"].values())


def test_generator_speed_reports_each_decode_step_in_order(tiny_bundle_int8sq, capsys):
    """--per-step: a median per decode step after the prefill, as many as the steps taken."""
    from edgerag.benchmarks.probes import generator

    graph = tiny_bundle_int8sq / json.loads((tiny_bundle_int8sq / "manifest.json").read_text())["generator"]["onnx"]
    speed = generator.measure_speed([graph], prompt_tokens=12, new_tokens=5, threads=1, rounds=2)[graph]
    assert len(speed["step_ms"]) == 4 and all(ms > 0 for ms in speed["step_ms"])  # 5 new tokens: prefill + 4 steps
    assert generator.speed_command([str(graph), "--prompt-tokens", "12", "--new-tokens", "5", "--rounds", "1", "--per-step"]) == 0
    assert "ms per decode step" in capsys.readouterr().out


def test_matmul_kinds_compute_the_same_product():
    """The two kinds' chains hold the same weights and scales, so they compute the same product (to the
    activations' int8 rounding); both are timed at each number of rows."""
    import numpy as np
    import onnxruntime as ort

    from edgerag.benchmarks.probes import decode

    outputs = {}
    for kind in decode.MATMUL_KINDS:
        model, nbytes = decode.matmul_chain(kind, rows=3, hidden=128, widths=[64], layers=1)
        assert nbytes == 128 * 64
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)
        outputs[kind] = session.run(None, {"x": x})[0]
    a, b = outputs["DynamicQuantizeMatMul"], outputs["MatMulNBits"]
    assert a.shape == b.shape == (3, 64)
    assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(b)
    result = decode.measure_matmul_kinds(rows=(1, 4), hidden=128, widths=(64,), layers=2, threads=1, rounds=1, repeats=2)
    assert set(result) == {(k, m) for k in decode.MATMUL_KINDS for m in (1, 4)} and all(r["ms"] > 0 for r in result.values())
