"""What a decode step costs without the profiler, by taking the graph apart:
`python -m edgerag.benchmarks.decode_parts BUNDLE/generator.onnx [--threads 2] [--positions 20,100,300]`.

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

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

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


def measure(graph: Path, threads: int = 2, positions=(20, 100, 300), rounds: int = 3, repeats: int = 50) -> dict:
    import onnx

    from edgerag.runtime import make_session

    model = onnx.load(str(graph))
    if not any(n.op_type == "GroupQueryAttention" for n in model.graph.node):
        raise ValueError(f"{graph} has no GroupQueryAttention: decode_parts takes the fused graph apart")
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


def main(argv=None) -> int:
    from edgerag.benchmarks.machine import bandwidth_gb_s, decode_floor_ms

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path, help="a fused generator graph, e.g. BUNDLE/generator.onnx")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--positions", default="20,100,300", help="cached positions for the whole step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=50, help="runs per measurement (its median is kept)")
    args = parser.parse_args(argv)
    positions = [int(p) for p in args.positions.split(",") if p]
    result = measure(args.graph, args.threads, positions, args.rounds, args.repeats)
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


if __name__ == "__main__":
    raise SystemExit(main())
