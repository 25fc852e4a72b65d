"""Which confidence tells answerable contexts from unanswerable ones best, on one abstaining bundle:

    python -m edgerag.benchmarks.probes.confidence BUNDLE --held-in RUN/student [--questions F] [--n 200] [--k K]
        [--max-costs 2,1,0.5]

Every answer is generated once with abstention off, keeping 1 - P(NO_ANSWER) at the first step and
the log-probability of each token the answer keeps (its end included). Each candidate confidence is
then fitted as export fits it (metrics.fit_threshold: the best overall F1 whose abstentions cost the
held-in answerable questions at most 2 F1 points, or each of --max-costs) on the held-in questions (the student folder's
calibration.jsonl, their passages added to the bundle in memory), and scored on the evaluation
questions, half of them asked over passages that cannot answer them (SQuAD 2.0's figures); beside
it, the most the evaluation questions themselves allow within that bound. The runtime's "answer"
confidence is "first step x geometric mean".
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

CANDIDATES = {
    "first step (\"no_answer\")": lambda r: r["first_step"],
    "geometric mean of the answer's tokens": lambda r: r["geometric_mean"],
    "least probable token": lambda r: r["least"],
    "first step x first token": lambda r: r["first_step"] * r["first_token"],
    "first step x least probable token": lambda r: r["first_step"] * r["least"],
    "first step x geometric mean (\"answer\")": lambda r: r["first_step"] * r["geometric_mean"],
}


def answer_records(bundle: Path, questions: list, held_in: bool, k: int | None) -> list[dict]:
    """evaluation.abstention_records, each with its first-step confidence and its tokens' probabilities."""
    from edgerag import evaluation
    from edgerag.runtime import Pipeline
    from edgerag.runtime.generation import Generation

    seen = {}
    score, settle, record = Generation._score, Generation.settle, evaluation._record

    def scoring(self, logits, token):
        before = self._answer_log_probability
        score(self, logits, token)
        self.__dict__.setdefault("token_log_probabilities", []).append(self._answer_log_probability - before)

    def settling(self):
        seen.update(first_step=self.confidence, logs=list(self.__dict__.get("token_log_probabilities", [])))
        settle(self)

    def recording(q, answer, answerable):
        logs = seen.pop("logs", []) or [-math.inf]
        probabilities = [math.exp(x) for x in logs]
        return {**record(q, answer, answerable), "first_step": seen.pop("first_step", 0.0) or 0.0,
                "first_token": probabilities[0], "least": min(probabilities),
                "geometric_mean": math.exp(sum(logs) / len(logs))}

    Generation._score, Generation.settle, evaluation._record = scoring, settling, recording
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline = Pipeline.load(bundle, check=False, abstain_threshold=0.0)
        if pipeline.manifest.abstention is None:
            raise SystemExit(f"{bundle}: the bundle did not learn to abstain (its manifest has no abstention)")
        pipeline.manifest.abstention.confidence = "answer"  # every token scored, whatever the bundle decides on
        if held_in:
            pipeline.add_passages(list({q.passage_id: (q.passage_id, q.title, q.context) for q in questions}.values()))
        return evaluation.abstention_records(pipeline, questions, 0.5, k or pipeline.manifest.generation.k, 0)
    finally:
        Generation._score, Generation.settle, evaluation._record = score, settle, record


def table(held_in: list[dict], evaluated: list[dict], max_cost: float = 2.0) -> str:
    from edgerag.metrics import abstention_figures, fit_threshold

    lines = [f"| confidence | threshold fitted on held-in within {max_cost:g} | held-in: abstained (F1 cost) | "
             f"evaluation: abstained | F1 cost | overall F1 (without) | evaluation's own best within {max_cost:g} |",
             "|" + "---|" * 7]
    for name, confidence in CANDIDATES.items():
        fit_rows = [{**r, "confidence": confidence(r)} for r in held_in]
        rows = [{**r, "confidence": confidence(r)} for r in evaluated]
        threshold = fit_threshold(fit_rows, max_cost)
        a, b = abstention_figures(fit_rows, threshold), abstention_figures(rows, threshold)

        def cost(f):
            return f["has_answer_f1_without_abstention"] - f["has_answer_f1"]
        within = [abstention_figures(rows, t) for t in sorted({r["confidence"] for r in rows})]
        best = max((f for f in within if cost(f) <= max_cost), key=lambda f: f["no_answer_accuracy"], default=None)
        lines.append(f"| {name} | {threshold:.3f} | {a['no_answer_accuracy']:.1f}% ({-cost(a):.2f}) | "
                     f"{b['no_answer_accuracy']:.1f}% | {-cost(b):.2f} | {b['f1_overall']:.2f} ({b['f1_overall_without_abstention']:.2f}) | "
                     + (f"{best['no_answer_accuracy']:.1f}% at {best['threshold']:.3f} ({-cost(best):.2f}) |" if best else "– |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    from edgerag.data import read_questions, sample_questions
    from edgerag.models import calibration_questions, read_calibration

    parser = argparse.ArgumentParser(prog="python -m edgerag.benchmarks.probes.confidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--held-in", type=Path, required=True,
                        help="the student folder whose calibration.jsonl the fit reads, or such a file")
    parser.add_argument("--questions", default="../shared/data/xquad-en.json.gz")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--k", type=int, default=None, help="passages per question (default: the bundle's)")
    parser.add_argument("--max-costs", default="2", help="comma-separated bounds on the held-in answerable F1 cost, "
                        "one table each (export's --abstain-cost; default: %(default)s)")
    args = parser.parse_args(argv)
    max_costs = [float(c) for c in args.max_costs.split(",")]
    held_in = read_calibration(args.held_in) if args.held_in.is_file() else calibration_questions(args.held_in)
    if not held_in:
        parser.error(f"{args.held_in}: no held-in questions (a student that did not learn to abstain)")
    evaluated = sample_questions(read_questions(args.questions), args.n, 0)
    fit, scored = answer_records(args.bundle, held_in, True, args.k), answer_records(args.bundle, evaluated, False, args.k)
    print("\n\n".join(table(fit, scored, c) for c in max_costs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
