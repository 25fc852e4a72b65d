"""Prefill and decode speed of generator graphs, side by side in one process.

    python benchmarks/generator_speed.py A/generator.onnx B/generator.onnx --prompt-tokens 600

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.pipeline import DecoderOnlyGenerator, make_session  # noqa: E402


class AnyGenerator(DecoderOnlyGenerator):
    def empty_cache(self):
        return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3] if isinstance(i.shape[3], int) else 64), dtype=np.float32)
                for i in self.past_inputs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    generators = {g: AnyGenerator(make_session(g, args.threads), [], reuse_prefix=False) for g in args.graphs}
    prompt = list(np.random.RandomState(0).randint(100, 20000, args.prompt_tokens))
    prefill = {g: [] for g in generators}
    decode = {g: [] for g in generators}
    for _ in range(args.rounds):
        for g, generator in generators.items():
            timings = {}
            tokens = list(generator.generate(prompt, args.new_tokens, timings))
            prefill[g].append(timings["prefill_ms"])
            decode[g].append(timings["decode_ms"] / max(len(tokens) - 1, 1))
    print(f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {args.threads} threads, "
          f"medians of {args.rounds} interleaved rounds\n")
    print("| graph | MB | prefill ms | decode ms/token |\n|---|---|---|---|")
    for g in generators:
        size = sum(f.stat().st_size for f in Path(g).parent.glob(Path(g).name + "*")) / 1e6
        print(f"| {g} | {size:.1f} | {np.median(prefill[g]):.0f} | {np.median(decode[g]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
