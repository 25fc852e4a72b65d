"""onnxruntime sessions for a bundle's graphs: the options every runtime graph is loaded with, and one
run over an IOBinding (what a generator's step calls)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def make_session(path: Path, threads: int | None, provider: str = "CPUExecutionProvider",
                 spinning: bool = True) -> ort.InferenceSession:
    """spinning: the session's threads keep spinning for a while after each run, ready for the next.
    Right for the generator (a run per token); wrong for a graph run once per question, whose
    spinning threads then compete with the generator's for the cores."""
    available = ort.get_available_providers()
    if provider not in available:
        raise ValueError(f"execution provider {provider!r} is not available; available: {', '.join(available)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # a memory pattern is planned per set of input shapes, and a prompt's shapes rarely come twice:
    # without it, prefill ran as fast and peaked 4 MB lower, decode 0.15 ms a token faster (measured)
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=[provider])


def run_bound(session, binding, cpu_inputs: dict, ort_inputs: dict, outputs: list[str]) -> list:
    """One run of `session` over `binding`: numpy inputs copied in, OrtValue inputs (a KV cache from the
    previous step) bound as they are, outputs left in onnxruntime's buffers. Returns the outputs as
    OrtValues, in the order of `outputs`, with the binding cleared for the next step."""
    for name, value in cpu_inputs.items():
        binding.bind_cpu_input(name, value)
    for name, value in ort_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name)
    session.run_with_iobinding(binding)
    values = binding.get_outputs()
    binding.clear_binding_inputs()
    binding.clear_binding_outputs()
    return values
