"""`make demo`: the built-in default, end to end, in about 15 minutes on 2 CPU cores.

distill (recipes/demo.toml) -> export a quantized bundle -> ask XQuAD questions through the
device runtime -> print teacher against student for quality, size and time. Re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgerag.metrics import abstains

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Which NFL team represented the AFC at Super Bowl 50?",
    "What is the name of the region in France the Normans gave their name to?",
    "What is the largest city of Poland?",
    "Who painted the Mona Lisa?",  # no passage of the corpus holds it: the bundle should abstain
]


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def said(answer, threshold: float | None) -> str:
    """The answer, or for one the bundle declines (an answer written with abstention off, whose
    confidence is below `threshold`) why, and what it would have said: a declined question still
    shows what the model read into its passages."""
    if not abstains(answer.confidence, threshold):
        return answer.answer
    return (f"(no answer: its confidence {answer.confidence:.3f} is below the bundle's threshold {threshold:.3f}; "
            f'with abstention off it would say "{answer.answer}")')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.toml"))
    args = parser.parse_args(argv)
    run = Path(args.run)
    timings = {}

    from edgerag.train.driver import distill

    t = time.time()
    distill(args.recipe, run, resume=True)
    timings["distill_s"] = time.time() - t

    from edgerag.export import ExportOptions
    from edgerag.export.bundle import export_bundle
    from edgerag.models import calibration_questions, folder_models, passage_encoder_folder, read_info
    from edgerag.runtime.manifest import MANIFEST

    bundle = run / "bundle"
    t = time.time()
    if not (bundle / MANIFEST).exists():
        query_encoder, generator = folder_models(run / "student")
        passage_encoder = passage_encoder_folder(run / "student")  # as `edgerag export RUN/student` does
        info = read_info(run / "student")  # a compressed student's settings: its k, selector and template
        export_bundle(query_encoder, generator, Path(args.data) / "xquad-en.json.gz", bundle,
                      str(passage_encoder) if passage_encoder else None,
                      options=ExportOptions(parity_questions=4, calibration_prompts=8, k=info.get("k", ExportOptions.k)),
                      compression=info.get("compression"), calibration=calibration_questions(run / "student"))
    timings["export_s"] = time.time() - t

    from edgerag.runtime import Pipeline

    t = time.time()
    pipeline = Pipeline.load(bundle)
    timings["load_s"] = time.time() - t
    # every answer written with its confidence, and declined by comparison, as `edgerag eval` does:
    # a declined answer is generated once and can still be shown
    threshold = pipeline.abstain_threshold
    if threshold is not None:
        pipeline.abstain_threshold = 0.0
    print("\n== asking the bundle (onnxruntime only) ==")
    for question in QUESTIONS:
        answer = pipeline.ask(question)
        top = answer.passages[0]
        print(f"Q: {question}\nA: {said(answer, threshold)}")
        for citation in [] if abstains(answer.confidence, threshold) else answer.citations:
            print(f"   source: {citation['title']}: \"{citation['sentence']}\"")
        print(f"   top passage: {top['title']} (score {top['score']:.3f}); "
              f"prefill {answer.timings['prefill_ms']:.0f} ms for {answer.prompt_tokens} tokens, "
              f"{answer.tokens_per_second:.1f} tok/s, total {answer.timings['total_ms']:.0f} ms")

    report = json.loads((run / "eval.json").read_text())
    print(f"\n== teacher vs student ({report['dataset']}, {report['n_questions']} questions, k={report['k']}) ==")
    keys = ["em", "f1", "em_gold", "f1_gold", "recall@5", "prompt_tokens", "generator_params", "encoder_params",
            "seconds_per_question"]
    print(f"{'':10}" + "".join(f"{k:>22}" for k in keys))
    for who in ("teacher", "student"):
        row = report[who]
        print(f"{who:10}" + "".join(f"{row.get(k, float('nan')):>22.4g}" for k in keys))
    print(f"\nsizes: student folder {folder_mb(run / 'student'):.0f} MB, bundle {folder_mb(bundle):.0f} MB")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
