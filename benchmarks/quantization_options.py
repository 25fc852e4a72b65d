"""Each `--quantize` option of a generator, side by side in one process: size, agreement with fp32, speed.

    python -m edgerag.benchmarks.quantization_options --generator HuggingFaceTB/SmolLM2-135M-Instruct

Agreement is measured against the fp32 ONNX graph (itself checked against PyTorch at export):
the largest |Δ| of last-position logits, and the share of questions whose greedy answer is the
same token for token. Speed rounds are interleaved across the variants, so that a noisy machine
slows them all alike; the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


VARIANTS = {"none": {}, "int8wo": {}, "int8sq": {}, "int8swo": {}, "int8": {}, "int4": {}, "int4-block128": {"block_size": 128}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--questions", default="xquad-en.json.gz")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", help="write the rows as JSON here too")
    args = parser.parse_args(argv)

    import onnx
    from tokenizers import Tokenizer

    from edgerag.export import onnx_export
    from edgerag.export.quantize import quantize
    from edgerag.runtime.manifest import KV_IN_PLACE_GRAPHS
    from edgerag.runtime import DecoderOnlyGenerator, make_session
    from edgerag.runtime.prompt import PromptTemplate, build_prompt_ids
    from edgerag.data import data_path, read_squad

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = onnx_export.materialize(args.generator, tmp / "hf", causal_lm=True)
        fp32_graph, builder = onnx_export.export_generator(folder)
        onnx_export.save(fp32_graph, tmp / "none.onnx")
        del fp32_graph
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        template = PromptTemplate.for_vocab(tokenizer.token_to_id)
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
        passages, all_questions, _ = read_squad(data_path(args.questions))
        questions = all_questions[::max(len(all_questions) // args.n, 1)][:args.n]
        prompts = [build_prompt_ids(encode, template, q.question, [(q.title, q.context)], 2000) for q in questions]
        stop = [i for i in (tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")) if i is not None]

        generators = {}
        for name in args.variants.split(","):
            path = tmp / f"{name}.onnx"
            if name in ("int8sq", "int8swo"):  # calibrated the way `edgerag export` calibrates it
                from edgerag.export import ExportOptions
                from edgerag.export.bundle import smoothed_generator_graph
                from edgerag.models import load_generator

                source, _ = smoothed_generator_graph(load_generator(str(folder))[0], builder, encode, template,
                                                     all_questions, passages, ExportOptions())
                model, _ = quantize(source, name)
                onnx_export.save(model, path)
            elif name != "none":
                method = name.split("-")[0]
                model, _ = quantize(onnx.load(str(tmp / "none.onnx")), method, **VARIANTS[name])
                onnx_export.save(model, path)
            # one token a step: the options' own parity and speed, not prompt lookup's
            generators[name] = DecoderOnlyGenerator(make_session(path, args.threads), stop, reuse_prefix=False,
                                                    kv_in_place=builder in KV_IN_PLACE_GRAPHS, prompt_lookup=0)
        reference = generators.get("none") or DecoderOnlyGenerator(make_session(tmp / "none.onnx", args.threads), stop,
                                                                   reuse_prefix=False, kv_in_place=builder in KV_IN_PLACE_GRAPHS,
                                                                   prompt_lookup=0)
        ref_logits = [reference.last_logits(p) for p in prompts]
        ref_answers = [reference.greedy(p, args.max_new_tokens).tokens for p in prompts]

        speed = {name: {"prefill": [], "decode": []} for name in generators}
        answers = {name: [] for name in generators}
        for round_ in range(args.rounds):
            for name, generator in generators.items():
                for prompt in prompts:
                    generation = generator.greedy(prompt, args.max_new_tokens)
                    if round_ == 0:
                        answers[name].append(generation.tokens)
                    speed[name]["prefill"].append(generation.prefill_ms)
                    if len(generation.tokens) > 1:
                        speed[name]["decode"].append(generation.decode_ms / (len(generation.tokens) - 1))
        for name, generator in generators.items():
            rows.append({
                "quantize": name,
                "size_mb": round((tmp / f"{name}.onnx").stat().st_size / 1e6, 1),
                "max_abs_logit_delta": round(max(float(np.abs(generator.last_logits(p) - r).max())
                                                 for p, r in zip(prompts, ref_logits)), 3),
                "same_greedy_answer": f"{sum(a == r for a, r in zip(answers[name], ref_answers))}/{len(prompts)}",
                "prefill_ms": round(float(np.median(speed[name]["prefill"])), 1),
                "decode_ms_per_token": round(float(np.median(speed[name]["decode"])), 2) if speed[name]["decode"] else None,
            })
    mean_tokens = float(np.mean([len(p) for p in prompts]))
    print(f"{args.generator}: {len(prompts)} questions with their gold passage (mean prompt {mean_tokens:.0f} tokens), "
          f"greedy {args.max_new_tokens} tokens, {args.threads} threads, medians of {args.rounds} interleaved rounds\n")
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"mean_prompt_tokens": mean_tokens, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
