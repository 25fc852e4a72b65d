"""Probes of the decode step, run by hand: what it costs taken apart without the profiler, where its
time goes under onnxruntime's profiler, and the two 8-bit matmul kinds side by side.

    python -m edgerag.benchmarks.probes.decode parts BUNDLE/generator.onnx [--threads 2] [--positions 20,100,300]
    python -m edgerag.benchmarks.probes.decode profile BUNDLE [--threads 2] [--new-tokens 32]
    python -m edgerag.benchmarks.probes.decode matmul-kinds [--layers 30] [--hidden 576] [--widths 960,2560] [--rows 1,86]

`python -m edgerag.benchmarks.probes.decode COMMAND --help` says what each one measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgerag.benchmarks.probes import run_command

PROG = "python -m edgerag.benchmarks.probes.decode"


# ---------------------------------------------------------------------------------------- parts

MATMULS = ("MatMulNBits", "DynamicQuantizeMatMul", "MatMul")


def _external(model, folder: Path, name: str) -> Path:
    import onnx

    path = folder / name
    onnx.save(model, str(path), save_as_external_data=True, location=f"{name}.data")
    return path


def matmuls_only(model, folder: Path) -> tuple[Path, int, int]:
    """(graph of the step's matmuls fed from graph inputs, their count, their weight bytes)."""
    import onnx
    from onnx import TensorProto, helper

    initializers = {i.name: i for i in model.graph.initializer}
    nodes, inputs, used = [], {}, set()
    for node in model.graph.node:
        if node.op_type not in MATMULS or node.input[1] not in initializers:
            continue
        weight = initializers[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        width = attrs["K"] if node.op_type == "MatMulNBits" else weight.dims[0]
        inputs[f"x{width}"] = width
        copy = helper.make_node(node.op_type, [f"x{width}", *node.input[1:]], [node.output[0]], name=node.name,
                                domain=node.domain, **attrs)
        nodes.append(copy)
        used.update(n for n in node.input[1:] if n in initializers)
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1, w]) for x, w in inputs.items()],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes],
                              [initializers[u] for u in sorted(used)])
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    weight_bytes = sum(onnx.numpy_helper.to_array(initializers[u]).nbytes for u in used)
    return _external(out, folder, "matmuls.onnx"), len(nodes), weight_bytes


def without_attention(model, folder: Path) -> Path:
    """The step with every GroupQueryAttention replaced by its input's query columns, and no KV cache."""
    import copy

    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    head_dim = next(i for i in model.graph.input if i.name.startswith("past_key_values.")).type.tensor_type.shape.dim[3].dim_value
    nodes = []
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        heads = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "num_heads")
        bounds = [numpy_helper.from_array(np.array([v], np.int64), f"{node.name}.{n}")
                  for n, v in (("start", 0), ("end", heads * head_dim), ("axis", -1))]
        model.graph.initializer.extend(bounds)
        nodes.append(helper.make_node("Slice", [node.input[0], *(b.name for b in bounds)], [node.output[0]], name=node.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept_inputs = [i for i in model.graph.input if not i.name.startswith("past_key_values.")]
    kept_outputs = [o for o in model.graph.output if not o.name.startswith("present.")]
    del model.graph.input[:], model.graph.output[:]
    model.graph.input.extend(kept_inputs)
    model.graph.output.extend(kept_outputs)
    return _external(model, folder, "no_attention.onnx")


def _median_ms(run, repeats: int) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def step_ms(session: ort.InferenceSession, positions: int | None, repeats: int) -> float:
    """One-token steps: with `positions` cached (in place, as the runtime binds them), or with no cache."""
    binding, keep = session.io_binding(), []

    def bind(name, array, output=None):
        value = ort.OrtValue.ortvalue_from_numpy(array)
        keep.append((array, value))
        binding.bind_ortvalue_input(name, value)
        if output:
            binding.bind_ortvalue_output(output, value)

    capacity = (positions or 0) + 8
    mask = np.zeros((1, capacity if positions else 1), np.int64)
    mask[0, :(positions or 0) + 1] = 1
    bind("input_ids", np.array([[42]], np.int64))
    bind("attention_mask", mask)
    rng = np.random.default_rng(0)
    for i in session.get_inputs():
        if positions and i.name.startswith("past_key_values."):
            bind(i.name, (rng.standard_normal((1, i.shape[1], capacity, i.shape[3])) * 0.1).astype(np.float32),
                 i.name.replace("past_key_values.", "present."))
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    out = np.zeros((1, 1, logits.shape[-1]), np.float32)
    value = ort.OrtValue.ortvalue_from_numpy(out)
    keep.append((out, value))
    binding.bind_ortvalue_output("logits", value)
    return _median_ms(lambda: session.run_with_iobinding(binding), repeats)


def measure_parts(graph: Path, threads: int = 2, positions=(20, 100, 300), rounds: int = 3, repeats: int = 50) -> dict:
    import onnx

    from edgerag.runtime import make_session

    model = onnx.load(str(graph))
    if not any(n.op_type == "GroupQueryAttention" for n in model.graph.node):
        raise ValueError(f"{graph} has no GroupQueryAttention: `decode parts` takes the fused graph apart")
    with tempfile.TemporaryDirectory() as folder:
        matmul_graph, matmul_count, weight_bytes = matmuls_only(model, Path(folder))
        whole, no_attention = make_session(graph, threads), make_session(without_attention(model, Path(folder)), threads)
        matmuls = make_session(matmul_graph, threads)
        feed = {i.name: np.random.default_rng(1).standard_normal((1, 1, i.shape[2])).astype(np.float32) for i in matmuls.get_inputs()}
        times: dict[str, list[float]] = {}
        for _ in range(rounds):
            for p in positions:
                times.setdefault(f"whole step, {p} cached positions", []).append(step_ms(whole, p, repeats))
            times.setdefault("no attention", []).append(step_ms(no_attention, None, repeats))
            times.setdefault("matmuls only", []).append(_median_ms(lambda: matmuls.run(None, feed), repeats))
    return {"ms": {k: statistics.median(v) for k, v in times.items()}, "matmuls": matmul_count,
            "matmul_weight_bytes": weight_bytes, "kernels": len(model.graph.node)}


def parts_command(argv=None) -> int:
    """What a decode step costs without the profiler, by taking the graph apart:
    `python -m edgerag.benchmarks.probes.decode parts BUNDLE/generator.onnx [--threads 2] [--positions 20,100,300]`.

    onnxruntime's profiler adds several microseconds to every kernel, which on a 300-kernel step is as
    much as the small operators themselves. Here the fused (GroupQueryAttention) generator runs as
    three graphs, each timed unprofiled with the runtime's session settings, in interleaved rounds:

      whole step      one token, the KV cache in place as the runtime binds it, at each number of
                      cached positions in `--positions`: what attention adds per position;
      no attention    each GroupQueryAttention replaced by the slice of its input that has the
                      query's width, and no cache: the step without attention;
      matmuls only    the step's quantized (and fp32) matmuls alone, each fed from a graph input:
                      how close the matmul kernels come to the weights' bandwidth floor.

    The floor is the matmuls' weight bytes over the machine's measured copy bandwidth.
    """
    from edgerag.benchmarks.machine import bandwidth_gb_s, decode_floor_ms

    parser = argparse.ArgumentParser(prog=f"{PROG} parts", description=parts_command.__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path, help="a fused generator graph, e.g. BUNDLE/generator.onnx")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--positions", default="20,100,300", help="cached positions for the whole step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=50, help="runs per measurement (its median is kept)")
    args = parser.parse_args(argv)
    positions = [int(p) for p in args.positions.split(",") if p]
    result = measure_parts(args.graph, args.threads, positions, args.rounds, args.repeats)
    bandwidth = bandwidth_gb_s()
    floor = decode_floor_ms(result["matmul_weight_bytes"], bandwidth)
    print(f"{args.graph}: {result['kernels']} nodes, {result['matmuls']} matmuls reading "
          f"{result['matmul_weight_bytes'] / 1e6:.1f} MB; floor {floor:.2f} ms at {bandwidth:.1f} GB/s; "
          f"{args.threads} threads, medians of {args.rounds} interleaved rounds")
    print("| graph | ms / step | × floor |\n|---|---|---|")
    for name, ms in result["ms"].items():
        print(f"| {name} | {ms:.2f} | {ms / floor:.2f} |")
    if len(positions) > 1:
        first, last = min(positions), max(positions)
        slope = (result["ms"][f"whole step, {last} cached positions"] - result["ms"][f"whole step, {first} cached positions"]) / (last - first)
        print(f"attention: {slope * 1000:.1f} µs per cached position per step ({first} -> {last} positions)")
    return 0


# ---------------------------------------------------------------------------------------- profile

def profiled_session(path: Path, threads: int, folder: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(folder) / "decode")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def breakdown(events: list[dict]) -> dict:
    """Kernel time per operator type, and the runs' own time, over the decode steps (the first run,
    the prefill, left out)."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode_runs = runs[1:]
    by_op, kernels = defaultdict(float), 0.0
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in decode_runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(a <= e["ts"] <= b for a, b in spans):
            by_op[e["args"]["op_name"]] += e["dur"]
            kernels += e["dur"]
    n = max(len(decode_runs), 1)
    run_us = sum(r["dur"] for r in decode_runs)
    return {"steps": len(decode_runs), "run_ms_per_step": run_us / n / 1000, "kernel_ms_per_step": kernels / n / 1000,
            "ops_ms_per_step": {op: us / n / 1000 for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def profile_command(argv=None) -> int:
    """Where a decode step's time goes, on a bundle's decoder-only generator:
    `python -m edgerag.benchmarks.probes.decode profile BUNDLE [--threads 2] [--new-tokens 32]`.

    A real question's RAG prompt (what the bundle reads of its top-k passages: their selected pieces
    where it compresses its context, else the passages whole; `--whole-passages` for the latter) is decoded greedily for exactly
    `--new-tokens` tokens (stop tokens ignored) with onnxruntime's profiler on. From the profile:
    each operator type's share of the decode steps' kernel time, onnxruntime's own time per step
    outside its kernels (the run minus the kernels: scheduling, allocation, output copies), and the
    Python loop's time per token outside onnxruntime's run (binding inputs, reading the logits,
    argmax). The floor is the generator's weight bytes over the machine's measured copy bandwidth.
    """
    from edgerag.benchmarks.machine import bandwidth_gb_s, decode_floor_ms, onnx_weight_bytes
    from edgerag.data import data_path, read_questions
    from edgerag.runtime import Pipeline
    from edgerag.runtime import DecoderOnlyGenerator

    p = argparse.ArgumentParser(prog=f"{PROG} profile", description=profile_command.__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--questions", default="xquad-en.json.gz", help="a SQuAD file; its first question makes the prompt")
    p.add_argument("--k", type=int, help="passages retrieved (default: the bundle's k)")
    p.add_argument("--whole-passages", action="store_true", help="read the top-k passages whole, uncompressed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="unprofiled rounds for the loop's own timing")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)

    pipeline = Pipeline.load(args.bundle, threads=args.threads, reuse_prefix="none")
    if pipeline.manifest.generator.family != "decoder-only":
        raise SystemExit("`decode profile` profiles decoder-only bundles")
    question = read_questions(data_path(args.questions))[0].question
    vector = pipeline.encoder.encode([question])
    rows, scores = pipeline.search(vector, args.k or pipeline.manifest.generation.k)
    passages = [(d["title"], d["text"]) for d in pipeline.passages_at(rows[0], scores[0])]
    if not args.whole_passages and pipeline.compression is not None:  # the pieces the runtime would pick
        passages = pipeline.context(question, vector[0], passages, pipeline.piece_vectors(rows[0]))
    prompt = pipeline.prompt_ids(question, passages, args.new_tokens)
    onnx_path = Path(args.bundle) / pipeline.manifest.generator.onnx

    # unprofiled: the loop as the runtime runs it, per token, and how much of it is onnxruntime's run
    in_place = pipeline.generator.kv_in_place
    # one token a step (no prompt lookup): the profile is of one decode step
    generator = DecoderOnlyGenerator(pipeline.generator.session, [], reuse_prefix="none", kv_in_place=in_place,
                                     prompt_lookup=0)
    run_ms, loop_ms = [], []
    original = generator.session.run_with_iobinding

    def timed_run(binding, *a, **kw):
        start = time.perf_counter()
        result = original(binding, *a, **kw)
        run_ms.append((time.perf_counter() - start) * 1000)
        return result

    generator.session.run_with_iobinding = timed_run
    for _ in range(args.rounds + 1):
        run_ms.clear()
        g = generator.greedy(prompt, args.new_tokens)
        loop_ms.append((g.decode_ms / max(len(g.tokens) - 1, 1), statistics.mean(run_ms[1:])))
    loop_ms = loop_ms[1:]  # the first round warms up
    step_ms = statistics.median(x for x, _ in loop_ms)
    ort_run_ms = statistics.median(y for _, y in loop_ms)

    with tempfile.TemporaryDirectory() as folder:
        session = profiled_session(onnx_path, args.threads, folder)
        profiled = DecoderOnlyGenerator(session, [], reuse_prefix="none", kv_in_place=in_place, prompt_lookup=0)
        profiled.greedy(prompt, args.new_tokens)  # warm-up, also profiled: dropped below by time
        profiled.greedy(prompt, args.new_tokens)
        events = json.loads(Path(session.end_profiling()).read_text())
    # the profile's timestamps count from the session's start: keep the second generation's runs
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    second = runs[len(runs) // 2:]
    first_ts = second[0]["ts"]
    figures = breakdown([e for e in events if e.get("ts", 0) >= first_ts])

    bandwidth = bandwidth_gb_s()
    weight_bytes = onnx_weight_bytes(onnx_path)
    floor = decode_floor_ms(weight_bytes, bandwidth)
    figures.update({"bundle": str(args.bundle), "threads": args.threads, "prompt_tokens": len(prompt),
                    "new_tokens": args.new_tokens, "loop_ms_per_token": step_ms, "ort_run_ms_per_token": ort_run_ms,
                    "python_ms_per_token": step_ms - ort_run_ms, "weight_bytes": weight_bytes,
                    "bandwidth_gb_s": bandwidth, "floor_ms_per_token": floor, "x_floor": step_ms / floor})
    kernel = figures["kernel_ms_per_step"]
    print(f"decode: {step_ms:.2f} ms/token ({step_ms / floor:.1f}x the floor of {floor:.2f} ms: "
          f"{weight_bytes / 1e6:.0f} MB of weights at {bandwidth:.1f} GB/s), prompt {len(prompt)} tokens, "
          f"{args.threads} threads")
    print(f"  onnxruntime run {ort_run_ms:.2f} ms/token (profiled: {figures['run_ms_per_step']:.2f}, of which kernels "
          f"{kernel:.2f}, onnxruntime outside its kernels {figures['run_ms_per_step'] - kernel:.2f}); "
          f"the Python loop outside the run {step_ms - ort_run_ms:.2f}")
    print("| operator | ms / token | share of kernel time |")
    print("|---|---|---|")
    for op, ms in list(figures["ops_ms_per_step"].items())[:10]:
        print(f"| {op} | {ms:.2f} | {100 * ms / kernel:.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


# ---------------------------------------------------------------------------------------- matmul kinds

MATMUL_KINDS = ("DynamicQuantizeMatMul", "MatMulNBits")
MATMUL_NBITS_BLOCK = 64


def matmul_chain(kind: str, rows: int, hidden: int, widths: list[int], layers: int, seed: int = 0) -> tuple[bytes, int]:
    """(serialized model, weight bytes): `layers` x one matmul per width, each reading input x [rows, hidden]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, weight_bytes = [], [], 0
    for layer in range(layers):
        for width in widths:
            name, out = f"w{layer}_{width}", f"y{layer}_{width}"
            # 7-bit weights, as onnxruntime's reduce_range writes them: on an x86 CPU without VNNI, the u8 x s8
            # kernel behind DynamicQuantizeMatMul adds pairs of products in saturating int16, so full-range
            # weights came out 12.5% off the exact product (AMD EPYC, AVX2, onnxruntime 1.32). The bytes read,
            # and so the timing, are the same either way.
            q = rng.integers(-64, 64, (hidden, width), dtype=np.int8)
            scale = rng.random(width, dtype=np.float32) * 0.01 + 0.001  # one per column: the same product for both kinds
            weight_bytes += q.nbytes
            if kind == "DynamicQuantizeMatMul":
                weights += [numpy_helper.from_array(q, name), numpy_helper.from_array(scale, name + "_scale")]
                nodes.append(helper.make_node(kind, ["x", name, name + "_scale", "", ""], [out], domain="com.microsoft"))
            else:  # [N, K / block, block] unsigned, zero point 128 by default
                packed = (q.T.astype(np.int16) + 128).astype(np.uint8).reshape(width, hidden // MATMUL_NBITS_BLOCK,
                                                                               MATMUL_NBITS_BLOCK)
                weights += [numpy_helper.from_array(packed, name),
                            numpy_helper.from_array(np.repeat(scale, hidden // MATMUL_NBITS_BLOCK), name + "_scale")]
                nodes.append(helper.make_node(kind, ["x", name, name + "_scale"], [out], domain="com.microsoft",
                                              K=hidden, N=width, bits=8, block_size=MATMUL_NBITS_BLOCK, accuracy_level=4))
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden])],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), weight_bytes


def measure_matmul_kinds(rows=(1, 86), hidden: int = 576, widths=(960, 2560), layers: int = 30, threads: int = 2,
                         rounds: int = 5, repeats: int = 10) -> dict:
    """{(kind, rows): {"ms", "gb_s"}}: medians over interleaved rounds of `repeats` runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    sessions, feeds, nbytes = {}, {}, {}
    for kind in MATMUL_KINDS:
        for m in rows:
            model, nbytes[kind, m] = matmul_chain(kind, m, hidden, list(widths), layers)
            sessions[kind, m] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            feeds[kind, m] = {"x": np.random.default_rng(1).standard_normal((m, hidden)).astype(np.float32)}
            sessions[kind, m].run(None, feeds[kind, m])  # prepacking and first-run allocations
    times = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            start = time.perf_counter()
            for _ in range(repeats):
                session.run(None, feeds[key])
            times[key].append((time.perf_counter() - start) / repeats)
    return {key: {"ms": statistics.median(t) * 1000, "gb_s": nbytes[key] / statistics.median(t) / 1e9} for key, t in times.items()}


def matmul_kinds_command(argv=None) -> int:
    """The two 8-bit matmul kinds of an int8sq bundle, at one row (a decode step) and at a prompt's rows
    (a prefill), on the same shapes and bytes:

        python -m edgerag.benchmarks.probes.decode matmul-kinds [--layers 30] [--hidden 576] [--widths 960,2560] [--rows 1,86]

    DynamicQuantizeMatMul (activations quantized per tensor at run time, int8 weights per column)
    against 8-bit MatMulNBits (blocks of 64, accuracy level 4), each as a chain of `--layers` x one
    matmul per width in `--widths`, random weights; interleaved rounds, medians. On onnxruntime 1.32
    MatMulNBits computes more than one row in fp32 from dequantized weights, which is why int8sq keeps
    every projection it can smooth in dynamic int8.
    """
    parser = argparse.ArgumentParser(prog=f"{PROG} matmul-kinds", description=matmul_kinds_command.__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--widths", default="960,2560", help="output widths of each layer's matmuls (SmolLM2 student: QKV, gate/up)")
    parser.add_argument("--rows", default="1,86")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    result = measure_matmul_kinds(rows, args.hidden, widths, args.layers, args.threads, args.rounds)
    print(f"{args.layers} x widths {widths} from {args.hidden}, {args.threads} threads, medians of {args.rounds} interleaved rounds\n")
    print("| kind | rows | ms | weight GB/s |\n|---|---|---|---|")
    for (kind, m), r in result.items():
        print(f"| {kind} | {m} | {r['ms']:.2f} | {r['gb_s']:.1f} |")
    return 0


# ---------------------------------------------------------------------------------------- the command

COMMANDS = {"parts": parts_command, "profile": profile_command, "matmul-kinds": matmul_kinds_command}


def main(argv=None) -> int:
    return run_command(PROG, __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
