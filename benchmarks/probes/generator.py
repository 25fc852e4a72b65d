"""Probes of the generator step, run by hand: the speed of generator graphs, what prefix reuse buys,
and each `--quantize` option side by side.

    python -m edgerag.benchmarks.probes.generator speed A/generator.onnx B/generator.onnx --prompt-tokens 600
    python -m edgerag.benchmarks.probes.generator prefix-reuse BUNDLE [--questions ../shared/data/xquad-en.json.gz]
    python -m edgerag.benchmarks.probes.generator quantization-options --generator HuggingFaceTB/SmolLM2-135M-Instruct

`python -m edgerag.benchmarks.probes.generator COMMAND --help` says what each one measures.
`edgerag.benchmarks.curve` times its students' graphs with `measure_speed`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgerag.benchmarks.probes import run_command
from edgerag.runtime import DecoderOnlyGenerator, Pipeline, make_session
from edgerag.runtime.manifest import LOGITS_TO_KEEP

PROG = "python -m edgerag.benchmarks.probes.generator"


# ---------------------------------------------------------------------------------------- speed

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


def measure_speed(graphs, prompt_tokens: int = 600, new_tokens: int = 17, threads: int = 2, rounds: int = 3) -> dict:
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


def speed_command(argv=None) -> int:
    """Prefill and decode speed of generator graphs, side by side in one process.

        python -m edgerag.benchmarks.probes.generator speed A/generator.onnx B/generator.onnx --prompt-tokens 600
        python -m edgerag.benchmarks.probes.generator speed BUNDLE/generator.onnx --prompt-tokens 86 --new-tokens 12 --per-step

    `--per-step` adds each decode step's median time, in order after the prefill: on our 2-core machine
    the first steps after a prefill run slower than later ones, and a SQuAD answer is about 5 steps.

    Random token ids (speed does not depend on them), the runtime's own decoding loop without
    prefix reuse, rounds interleaved across the graphs so that a noisy machine slows them alike;
    medians are reported. Works on any graph with the runtime's inputs and outputs, including
    onnxruntime-genai's builder output (its head dimension is read from the graph or taken as 64).
    """
    parser = argparse.ArgumentParser(prog=f"{PROG} speed", description=speed_command.__doc__.split("\n\n")[0])
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-step", action="store_true", help="each decode step's median ms, in order after the prefill")
    args = parser.parse_args(argv)
    speed = measure_speed(args.graphs, args.prompt_tokens, args.new_tokens, args.threads, args.rounds)
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


# ---------------------------------------------------------------------------------------- prefix reuse

def read_paragraphs(path: str) -> list[dict]:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [p for article in json.load(f)["data"] for p in article["paragraphs"]]


def prefix_reuse_command(argv=None) -> int:
    """What prefix reuse buys: prefill time with each reuse_prefix mode (none, template, previous), on one bundle.

        python -m edgerag.benchmarks.probes.generator prefix-reuse BUNDLE [--questions ../shared/data/xquad-en.json.gz]

    Two sequences of questions: a random sample (only the prompt template is shared) and follow-up
    questions on the same passages (the retrieved passages are shared too).
    """
    parser = argparse.ArgumentParser(prog=f"{PROG} prefix-reuse", description=prefix_reuse_command.__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--questions", default="../shared/data/xquad-en.json.gz")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    paragraphs = read_paragraphs(args.questions)
    rng = random.Random(0)
    sequences = {
        "random questions": rng.sample([qa["question"] for p in paragraphs for qa in p["qas"]], 12),
        "follow-ups on one passage": [qa["question"] for p in (paragraphs[5], paragraphs[40]) for qa in p["qas"][:4]],
    }
    print("| questions | prefix reuse | prefill ms (median) | prompt tokens (mean) | reused tokens (mean) |\n|---|---|---|---|---|")
    for name, questions in sequences.items():
        for reuse in ("none", "template", "previous"):
            pipeline = Pipeline.load(args.bundle, threads=args.threads, reuse_prefix=reuse)
            pipeline.ask("A warm-up question about nothing in particular?")
            answers = [pipeline.ask(q) for q in questions]
            print(f"| {name} | {reuse} | {np.median([a.timings['prefill_ms'] for a in answers]):.0f} | "
                  f"{np.mean([a.prompt_tokens for a in answers]):.0f} | "
                  f"{np.mean([a.timings['reused_prompt_tokens'] for a in answers]):.0f} |")
    return 0


def answers_command(argv=None) -> int:
    """What span answers cost: the same questions with answers "free" and "spans", interleaved, on one bundle.

        python -m edgerag.benchmarks.probes.generator answers BUNDLE [--questions ../shared/data/xquad-en.json.gz] [--n 100]

    Prints each setting's p50 answer time, decode ms per token, p50 citation time, and where the bundle
    abstains, the p50 of what its first-step screening and the citation add to an answer (the answers are
    generated with abstention at threshold 0, so that both settings answer every question).
    """
    parser = argparse.ArgumentParser(prog=f"{PROG} answers", description=answers_command.__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--questions", default="../shared/data/xquad-en.json.gz")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    questions = random.Random(1).sample([qa["question"] for p in read_paragraphs(args.questions) for qa in p["qas"]],
                                        args.n)
    pipelines = {kind: Pipeline.load(args.bundle, threads=args.threads, answers=kind, abstain_threshold=0.0)
                 for kind in ("free", "spans")}
    rows = {kind: [] for kind in pipelines}
    for _ in range(args.rounds):
        for question in questions:
            for kind, pipeline in pipelines.items():  # interleaved: the machine's drift falls on both
                rows[kind].append(pipeline.ask(question))
    print("| answers | p50 ms | decode ms/token | new tokens | p50 citation ms | p50 abstention + citation ms |\n"
          "|---|---|---|---|---|---|")
    for kind, answers in rows.items():
        decoded = sum(a.timings["decode_ms"] for a in answers) / max(sum(a.timings["decode_tokens"] for a in answers), 1)
        trust = np.median([a.timings["abstain_ms"] + a.timings["cite_ms"] for a in answers])
        print(f"| {kind} | {np.median([a.timings['total_ms'] for a in answers]):.1f} | {decoded:.2f} | "
              f"{sum(a.new_tokens for a in answers)} | {np.median([a.timings['cite_ms'] for a in answers]):.3f} | "
              f"{trust:.3f} |")
    return 0


# ---------------------------------------------------------------------------------------- quantization options

QUANTIZE_VARIANTS = {"none": {}, "int8wo": {}, "int8sq": {}, "int8swo": {}, "int8": {}, "int4": {},
                     "int4-block128": {"block_size": 128}}


def quantization_options_command(argv=None) -> int:
    """Each `--quantize` option of a generator, side by side in one process: size, agreement with fp32, speed.

        python -m edgerag.benchmarks.probes.generator quantization-options --generator HuggingFaceTB/SmolLM2-135M-Instruct

    Agreement is measured against the fp32 ONNX graph (itself checked against PyTorch at export):
    the largest |Δ| of last-position logits, and the share of questions whose greedy answer is the
    same token for token. Speed rounds are interleaved across the variants, so that a noisy machine
    slows them all alike; the medians are reported.
    """
    parser = argparse.ArgumentParser(prog=f"{PROG} quantization-options",
                                     description=quantization_options_command.__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--questions", default="xquad-en.json.gz")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(QUANTIZE_VARIANTS))
    parser.add_argument("--out", help="write the rows as JSON here too")
    args = parser.parse_args(argv)

    import onnx
    from tokenizers import Tokenizer

    from edgerag.export import onnx_export
    from edgerag.export.quantize import quantize
    from edgerag.runtime.manifest import KV_IN_PLACE_GRAPHS
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
                model, _ = quantize(onnx.load(str(tmp / "none.onnx")), method, **QUANTIZE_VARIANTS[name])
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


# ---------------------------------------------------------------------------------------- the command

COMMANDS = {"speed": speed_command, "prefix-reuse": prefix_reuse_command, "answers": answers_command,
            "quantization-options": quantization_options_command}


def main(argv=None) -> int:
    return run_command(PROG, __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
