"""The two 8-bit matmul kinds of an int8sq bundle, at one row (a decode step) and at a prompt's rows
(a prefill), on the same shapes and bytes:

    python -m edgerag.benchmarks.matmul_kinds [--layers 30] [--hidden 576] [--widths 960,2560] [--rows 1,86]

DynamicQuantizeMatMul (activations quantized per tensor at run time, int8 weights per column)
against 8-bit MatMulNBits (blocks of 64, accuracy level 4), each as a chain of `--layers` x one
matmul per width in `--widths`, random weights; interleaved rounds, medians. On onnxruntime 1.32
MatMulNBits computes more than one row in fp32 from dequantized weights, which is why int8sq keeps
every projection it can smooth in dynamic int8.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

KINDS = ("DynamicQuantizeMatMul", "MatMulNBits")
BLOCK = 64


def chain(kind: str, rows: int, hidden: int, widths: list[int], layers: int, seed: int = 0) -> tuple[bytes, int]:
    """(serialized model, weight bytes): `layers` x one matmul per width, each reading input x [rows, hidden]."""
    rng = np.random.default_rng(seed)
    nodes, weights, weight_bytes = [], [], 0
    for layer in range(layers):
        for width in widths:
            name, out = f"w{layer}_{width}", f"y{layer}_{width}"
            q = rng.integers(-127, 128, (hidden, width), dtype=np.int8)
            scale = rng.random(width, dtype=np.float32) * 0.01 + 0.001  # one per column: the same product for both kinds
            weight_bytes += q.nbytes
            if kind == "DynamicQuantizeMatMul":
                weights += [numpy_helper.from_array(q, name), numpy_helper.from_array(scale, name + "_scale")]
                nodes.append(helper.make_node(kind, ["x", name, name + "_scale", "", ""], [out], domain="com.microsoft"))
            else:  # [N, K / block, block] unsigned, zero point 128 by default
                packed = (q.T.astype(np.int16) + 128).astype(np.uint8).reshape(width, hidden // BLOCK, BLOCK)
                weights += [numpy_helper.from_array(packed, name), numpy_helper.from_array(np.repeat(scale, hidden // BLOCK), name + "_scale")]
                nodes.append(helper.make_node(kind, ["x", name, name + "_scale"], [out], domain="com.microsoft",
                                              K=hidden, N=width, bits=8, block_size=BLOCK, accuracy_level=4))
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, hidden])],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), weight_bytes


def measure(rows=(1, 86), hidden: int = 576, widths=(960, 2560), layers: int = 30, threads: int = 2,
            rounds: int = 5, repeats: int = 10) -> dict:
    """{(kind, rows): {"ms", "gb_s"}}: medians over interleaved rounds of `repeats` runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    sessions, feeds, nbytes = {}, {}, {}
    for kind in KINDS:
        for m in rows:
            model, nbytes[kind, m] = chain(kind, m, hidden, list(widths), layers)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--widths", default="960,2560", help="output widths of each layer's matmuls (SmolLM2 student: QKV, gate/up)")
    parser.add_argument("--rows", default="1,86")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    result = measure(rows, args.hidden, widths, args.layers, args.threads, args.rounds)
    print(f"{args.layers} x widths {widths} from {args.hidden}, {args.threads} threads, medians of {args.rounds} interleaved rounds\n")
    print("| kind | rows | ms | weight GB/s |\n|---|---|---|---|")
    for (kind, m), r in result.items():
        print(f"| {kind} | {m} | {r['ms']:.2f} | {r['gb_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
