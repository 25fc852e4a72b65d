"""What prefix reuse buys: prefill time with each reuse_prefix mode (none, template, previous), on one bundle.

    python -m edgerag.benchmarks.prefix_reuse BUNDLE [--questions ../shared/data/xquad-en.json.gz]

Two sequences of questions: a random sample (only the prompt template is shared) and follow-up
questions on the same passages (the retrieved passages are shared too).
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np

from edgerag.runtime import Pipeline


def read_paragraphs(path: str) -> list[dict]:
    import gzip
    import json

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [p for article in json.load(f)["data"] for p in article["paragraphs"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
