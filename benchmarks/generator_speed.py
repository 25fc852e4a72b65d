"""Prefill and decode speed of generator graphs, side by side in one process.

    python -m edgerag.benchmarks.generator_speed A/generator.onnx B/generator.onnx --prompt-tokens 600
    python -m edgerag.benchmarks.generator_speed BUNDLE/generator.onnx --prompt-tokens 86 --new-tokens 12 --per-step

`--per-step` adds each decode step's median time, in order after the prefill: on our 2-core machine
the first steps after a prefill run slower than later ones, and a SQuAD answer is about 5 steps.

Random token ids (speed does not depend on them), the runtime's own decoding loop without
prefix reuse, rounds interleaved across the graphs so that a noisy machine slows them alike;
medians are reported. Works on any graph with the runtime's inputs and outputs, including
onnxruntime-genai's builder output (its head dimension is read from the graph or taken as 64).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from edgerag.runtime.manifest import LOGITS_TO_KEEP
from edgerag.runtime import DecoderOnlyGenerator, make_session


class AnyGenerator(DecoderOnlyGenerator):
    def empty_cache(self):
        return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3] if isinstance(i.shape[3], int) else 64), dtype=np.float32)
                for i in self.past_inputs}


def appends_in_place(graph) -> bool:
    """Whether the runtime can let the graph append to its KV cache in place: its attention is
    GroupQueryAttention and it computes the last position's logits only (the fused Llama graph)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    logits = next(o for o in model.graph.output if o.name == "logits").type.tensor_type.shape.dim
    last_positions = logits[1].dim_value == 1 or logits[1].dim_param == LOGITS_TO_KEEP
    return last_positions and any(n.op_type == "GroupQueryAttention" for n in model.graph.node)


def measure(graphs, prompt_tokens: int = 600, new_tokens: int = 17, threads: int = 2, rounds: int = 3) -> dict:
    """{graph: {"prefill_ms", "decode_ms_per_token", "step_ms"}}, medians over interleaved rounds;
    step_ms: each decode step's, in order after the prefill."""
    # one token a step (no prompt lookup): the step's own speed
    generators = {g: AnyGenerator(make_session(str(g), threads), [], reuse_prefix=False,
                                  kv_in_place=appends_in_place(g), prompt_lookup=0) for g in graphs}
    prompt = list(np.random.RandomState(0).randint(100, 20000, prompt_tokens))
    prefill = {g: [] for g in generators}
    decode = {g: [] for g in generators}
    steps = {g: [] for g in generators}
    for _ in range(rounds):
        for g, generator in generators.items():
            generation = generator.greedy(prompt, new_tokens)
            prefill[g].append(generation.prefill_ms)
            decode[g].append(generation.decode_ms / max(generation.decode_steps, 1))
            steps[g].append(generation.step_ms)
    return {g: {"prefill_ms": float(np.median(prefill[g])), "decode_ms_per_token": float(np.median(decode[g])),
                "step_ms": [float(np.median([r[i] for r in steps[g] if len(r) > i])) for i in range(max(map(len, steps[g])))]}
            for g in generators}


def graph_megabytes(graph) -> float:
    """The graph file and its external-data file(s)."""
    return sum(f.stat().st_size for f in Path(graph).parent.glob(Path(graph).name + "*")) / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-step", action="store_true", help="each decode step's median ms, in order after the prefill")
    args = parser.parse_args(argv)
    speed = measure(args.graphs, args.prompt_tokens, args.new_tokens, args.threads, args.rounds)
    print(f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {args.threads} threads, "
          f"medians of {args.rounds} interleaved rounds\n")
    print("| graph | MB | prefill ms | decode ms/token |\n|---|---|---|---|")
    for g, m in speed.items():
        print(f"| {g} | {graph_megabytes(g):.1f} | {m['prefill_ms']:.0f} | {m['decode_ms_per_token']:.1f} |")
    if args.per_step:
        print("\nms per decode step, in order after the prefill (median over rounds):\n")
        for g, m in speed.items():
            print(f"{g}: " + " ".join(f"{ms:.2f}" for ms in m["step_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
