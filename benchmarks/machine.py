"""What this machine can do at best: memory bandwidth and matmul throughput, and the floors they set.

A decoder reads every weight once per generated token, so decode cannot be faster than
bytes-of-weights / bandwidth. Prefill is compute-bound: FLOPs / matmul throughput. A system's
measured time divided by its floor says how much headroom its runtime leaves.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _best(fn, repeats: int) -> float:
    fn()  # warm up: page faults, thread pools
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bandwidth_gb_s(mb: int = 256, repeats: int = 5) -> float:
    """STREAM-like copy: a buffer far larger than the caches copied into another; read + write bytes
    per second (best of `repeats`). numpy copies on one core, which on small CPUs is close to the
    socket's bandwidth; the decode floor uses it as the bound."""
    a = np.ones(mb * (1 << 20) // 8, dtype=np.float64)
    return _copy_gb_s(a, np.empty_like(a), repeats)


def _copy_gb_s(source: np.ndarray, target: np.ndarray, repeats: int) -> float:
    """Bytes read and written per second copying source into target, best of `repeats`."""
    return 2 * source.nbytes / _best(lambda: np.copyto(target, source), repeats) / 1e9


class BandwidthProbe:
    """The copy-bandwidth probe, served from this process to a worker that asks for it between its
    questions (`ask_bandwidth`). On a shared machine the bandwidth and the decode time move together
    (by a third within a minute here), so each question's decode is held against the bandwidth of
    the moment it ran in, and the probe's buffers stay out of the worker's memory."""

    def __init__(self, mb: int = 256, repeats: int = 3):
        self.a = np.ones(mb * (1 << 20) // 8, dtype=np.float64)
        self.b = np.empty_like(self.a)
        self.repeats = repeats
        self.listener = Listener(family="AF_UNIX")
        self.address = self.listener.address
        threading.Thread(target=self._serve, daemon=True).start()

    def measure(self) -> float:
        """Best of `repeats` copies, as bandwidth_gb_s."""
        return _copy_gb_s(self.a, self.b, self.repeats)

    def _serve(self) -> None:
        while True:
            try:
                connection = self.listener.accept()
            except OSError:  # closed
                return
            with connection:
                try:
                    while connection.recv():
                        connection.send(self.measure())
                except (EOFError, OSError):
                    pass

    def close(self) -> None:
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ask_bandwidth(connection) -> float:
    """One measurement from a BandwidthProbe, over a `Client(probe.address)` connection."""
    connection.send(True)
    return connection.recv()


def numpy_matmul_gflops(n: int = 1024, repeats: int = 3) -> float:
    """fp32 GEMM through numpy's BLAS with its default threads."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    return 2 * n ** 3 / _best(lambda: a @ b, repeats) / 1e9


def _matmul_model(m: int, k: int, n: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def ort_matmul_gflops(threads: int, int8: bool = False, m: int = 256, k: int = 1024, n: int = 1024,
                      repeats: int = 5) -> float:
    """GEMM throughput through onnxruntime at `threads` intra-op threads: fp32 MatMul, or (int8=True)
    the dynamically quantized graph (DynamicQuantizeLinear + MatMulInteger), the int8 kernels that
    quantized generators use for prefill. The shape is a prefill's: m tokens times a k x n weight."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        onnx.save(_matmul_model(m, k, n), path)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            logging.disable(logging.WARNING)  # its "consider pre-processing" advice is about models, not this probe
            try:
                quantize_dynamic(str(path), str(Path(tmp) / "q.onnx"), weight_type=QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
            path = Path(tmp) / "q.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    return 2 * m * k * n / _best(lambda: session.run(None, {"x": x}), repeats) / 1e9


def measure(threads: list[int], quick: bool = False) -> dict:
    """The machine block of results.json, plus ORT throughput per thread count for the floors."""
    mb, n = (32, 256) if quick else (256, 1024)
    out = {"cpu": cpu_name(), "cores": cores(), "bandwidth_gb_s": round(bandwidth_gb_s(mb), 2),
           "matmul_gflops": round(numpy_matmul_gflops(n), 2), "ort_matmul_gflops": {}}
    shape = dict(m=64, k=256, n=256) if quick else {}
    for t in threads:
        out["ort_matmul_gflops"][str(t)] = {"fp32": round(ort_matmul_gflops(t, False, **shape), 2),
                                            "int8": round(ort_matmul_gflops(t, True, **shape), 2)}
    return out


# ------------------------------------------------------------------------------------------- floors

def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes a decode step reads from an ONNX graph's weights: all initializers except tables that are
    only gathered from (the input embedding: one row per token), quantized ones (GatherBlockQuantized:
    the table, its scales and zero points) included."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    gathered, used_otherwise = set(), set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if (node.op_type == "Gather" and i == 0) or (node.op_type == "GatherBlockQuantized" and i != 1):
                gathered.add(name)
            else:
                used_otherwise.add(name)
    total = 0
    for init in model.graph.initializer:
        if init.name in gathered and init.name not in used_otherwise:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in init.external_data}.get("length", 0))
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


def onnx_kv_bytes_per_position(path: str | Path, head_dim: int | None = None) -> dict:
    """Bytes of KV cache a decode step reads per cached position, from a decoder graph's cache inputs
    ([batch, kv_heads, positions, head_dim]): {"kv_bytes_prompt_position", "kv_bytes_new_position"}.
    A decoder-only graph reads its self-attention cache over the prompt and the tokens generated so
    far; an encoder-decoder's decoder reads the encoder's positions through its cross-attention cache
    (`cross.*`, Optimum's `*.encoder.*`) and the generated ones through its self-attention cache.
    `head_dim` stands in where the graph leaves the head size symbolic (onnxruntime-genai's builder
    does). Empty where a cache input's heads or head size are still unknown."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    cross = new = 0
    for value in model.graph.input:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if not value.name.startswith(("past", "cross")) or len(dims) != 4:
            continue
        dims[3] = dims[3] or head_dim
        if dims[1] is None or dims[3] is None:
            return {}
        nbytes = dims[1] * dims[3] * onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
        if value.name.startswith("cross") or ".encoder." in value.name:
            cross += nbytes
        else:
            new += nbytes
    if not new:
        return {}
    return {"kv_bytes_prompt_position": cross if cross else new, "kv_bytes_new_position": new}


def torch_kv_bytes_per_position(model) -> dict:
    """onnx_kv_bytes_per_position for a decoder-only torch causal LM: K and V of every layer's KV heads."""
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_position = c.num_hidden_layers * 2 * kv_heads * head_dim * next(model.parameters()).element_size()
    return {"kv_bytes_prompt_position": per_position, "kv_bytes_new_position": per_position}


def decode_bytes(weight_bytes: int, prompt_tokens: int, steps: int, kv_prompt: int, kv_new: int) -> float:
    """Bytes `steps` decode steps read in all: the weights each step, and the KV cache of every position
    before it (the prompt's, and the j-th step's j generated ones, its own included)."""
    return steps * (weight_bytes + kv_prompt * prompt_tokens) + kv_new * steps * (steps + 1) / 2


def torch_weight_bytes(model) -> int:
    """Parameter bytes of a torch causal LM, less the input embedding unless it is tied to the LM head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != emb.weight.data_ptr():
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def prefill_flops(params_non_embedding: int, layers: int, hidden: int, tokens: int) -> float:
    """2 FLOPs per weight per token, plus causal attention (QK^T and AV: 2 * 2 * T^2/2 * hidden per layer)."""
    return 2.0 * params_non_embedding * tokens + 2.0 * layers * hidden * tokens ** 2


def decode_floor_ms(weight_bytes: int, bandwidth_gb_s: float) -> float:
    return weight_bytes / (bandwidth_gb_s * 1e9) * 1000


def prefill_floor_ms(flops: float, gflops: float) -> float:
    return flops / (gflops * 1e9) * 1000
