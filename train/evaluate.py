"""Evaluation, the same for teacher, student and exported bundle.

Per question: retrieve top-k from the whole corpus and answer greedily with the shared prompt
(open-domain EM/F1), the rank of the gold passage (recall@1/5/20), and the answer with the gold
passage given (EM/F1 gold). Scores are SQuAD v1.1 EM/F1 (best over the references), in 0-100.

A model folder (query_encoder/ + generator/) is run with torch; a bundle (manifest.json) with the
device runtime, which needs no torch.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from .data import Passage, Question, data_path, read_passages, read_questions
from .metrics import best_over_references, exact_match, f1, recall_at

METRICS = ("em", "f1", "em_gold", "f1_gold", "recall@1", "recall@5", "recall@20")
INFO_FILE = "edgerag.json"   # in a teacher/student folder: prompt settings, passage encoder, params
RECALL_DEPTH = 20


def sample_questions(questions: list[Question], n: int | None, seed: int = 0) -> list[Question]:
    """A seeded random sample of n questions; all of them, in file order, when n is None or 0."""
    if not n:
        return list(questions)
    return random.Random(seed).sample(list(questions), min(n, len(questions)))


def score(questions, open_answers, ranked_ids, gold_answers) -> dict:
    rows = []
    for q, answer, ranked, gold in zip(questions, open_answers, ranked_ids, gold_answers):
        rows.append({
            "em": best_over_references(exact_match, answer, q.answers),
            "f1": best_over_references(f1, answer, q.answers),
            "em_gold": best_over_references(exact_match, gold, q.answers),
            "f1_gold": best_over_references(f1, gold, q.answers),
            "recall@1": recall_at(ranked, q.passage_id, 1),
            "recall@5": recall_at(ranked, q.passage_id, 5),
            "recall@20": recall_at(ranked, q.passage_id, 20),
        })
    n = max(len(rows), 1)
    return {m: round(100.0 * sum(r[m] for r in rows) / n, 2) for m in METRICS}


# ---------------------------------------------------------------- torch folders

def read_info(folder: Path) -> dict:
    path = Path(folder) / INFO_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def passage_encoder_folder(folder: Path) -> Path | None:
    """The encoder that embeds a teacher/student folder's passages, where its edgerag.json names one
    other than its query encoder (a student fitted to the teacher's passage vectors carries the
    teacher's encoder for them); None where the query encoder does both."""
    name = read_info(folder).get("passage_encoder")
    if not name or name == "query_encoder":
        return None
    path = Path(folder) / name
    if not path.is_dir():
        raise FileNotFoundError(f"{Path(folder) / INFO_FILE} names the passage encoder {name!r}, but {path} is not a folder")
    return path


def load_folder(folder: Path):
    """(query encoder, tokenizer, pooling, max_length), (generator, tokenizer), info of a teacher/student folder."""
    from .sources import load_encoder, load_generator

    folder = Path(folder)
    return load_encoder(folder / "query_encoder"), load_generator(folder / "generator"), read_info(folder)


def evaluate_folder(folder: Path, questions: list[Question], passages: list[Passage], k: int = 3,
                    passage_embeddings=None, batch_size: int = 8, max_prompt_tokens: int | None = None,
                    max_answer_tokens: int | None = None, answers_out: Path | None = None) -> dict:
    """Metrics of a teacher/student folder. `passage_embeddings` (rows aligned with `passages`) saves
    re-encoding the corpus; otherwise the folder's passage encoder (edgerag.json) or its own query
    encoder embeds it."""
    import torch

    from .retrieval import PassageIndex, embed, passage_text
    from .student import count_params
    from .teacher import Prompter, generate

    torch.set_flush_denormal(True)  # denormal floats make CPU matmuls several times slower
    folder = Path(folder)
    (encoder, enc_tok, pooling, max_length), (generator, gen_tok), info = load_folder(folder)
    if passage_embeddings is None:
        from .sources import load_encoder

        p_folder = passage_encoder_folder(folder)
        p_enc, p_tok, p_pool, p_len = load_encoder(p_folder) if p_folder else (encoder, enc_tok, pooling, max_length)
        passage_embeddings = embed(p_enc, p_tok, [passage_text(p.title, p.text) for p in passages], p_pool, p_len,
                                   progress="embed corpus")
    index = PassageIndex(passages, passage_embeddings)
    prompter = Prompter(gen_tok, max_prompt_tokens or info.get("max_prompt_tokens", 512),
                        max_answer_tokens or info.get("max_answer_tokens", 24))

    # Open-domain: the timed part (encode the query, search, build the prompt, generate).
    start = time.perf_counter()
    q_emb = embed(encoder, enc_tok, [q.question for q in questions], pooling, max_length)
    ranked_rows = index.search(q_emb, max(k, RECALL_DEPTH))
    prompts = [prompter.prompt(q.question, [(passages[r].title, passages[r].text) for r in rows[:k]])
               for q, rows in zip(questions, ranked_rows)]
    with torch.inference_mode():
        open_answers = generate(generator, prompter, prompts, batch_size=batch_size, progress=f"eval {folder.name} open")
    seconds = (time.perf_counter() - start) / max(len(questions), 1)

    gold_prompts = [prompter.prompt(q.question, [(q.title, q.context)]) for q in questions]
    with torch.inference_mode():
        gold_answers = generate(generator, prompter, gold_prompts, batch_size=batch_size, progress=f"eval {folder.name} gold")
    ranked_ids = [[passages[r].id for r in rows] for rows in ranked_rows]
    result = score(questions, open_answers, ranked_ids, gold_answers)
    result.update({"generator_params": count_params(generator), "encoder_params": count_params(encoder),
                   "seconds_per_question": round(seconds, 4)})
    if answers_out is not None:
        _write_answers(answers_out, questions, open_answers, gold_answers, ranked_ids)
    return result


def _write_answers(path, questions, open_answers, gold_answers, ranked_ids) -> None:
    from .loop import atomic_write_text

    rows = [{"id": q.id, "question": q.question, "references": list(q.answers), "answer": a, "answer_gold": g,
             "retrieved": r[:5], "gold_passage": q.passage_id}
            for q, a, g, r in zip(questions, open_answers, gold_answers, ranked_ids)]
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- bundles (no torch)

def evaluate_bundle(bundle: Path, questions: list[Question], passages: list[Passage] | None, k: int = 3,
                    answers_out: Path | None = None) -> dict:
    """Metrics of an exported bundle through the device runtime; `passages` (if given) are added to its corpus."""
    from runtime import Pipeline

    p = Pipeline.load(bundle)
    if passages:
        p.add_passages([(x.id, x.title, x.text) for x in passages])
    open_answers, ranked_ids, gold_answers = [], [], []
    start = time.perf_counter()
    for q in questions:
        r = p.ask(q.question, k=k)
        open_answers.append(r.answer)
    seconds = (time.perf_counter() - start) / max(len(questions), 1)
    for q in questions:
        ranked_ids.append([d["id"] for d in p.retrieve(q.question, RECALL_DEPTH)])
        gold_answers.append(p.answer_with_passages(q.question, [(q.title, q.context)]).answer)
    result = score(questions, open_answers, ranked_ids, gold_answers)
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    result.update({"generator_params": _find_params(manifest.get("generator", {})),
                   "encoder_params": _find_params(manifest.get("query_encoder", {})),
                   "seconds_per_question": round(seconds, 4)})
    if answers_out is not None:
        _write_answers(answers_out, questions, open_answers, gold_answers, ranked_ids)
    return result


def _find_params(section: dict):
    for key in ("params", "parameters", "num_parameters", "n_params"):
        if isinstance(section, dict) and key in section:
            return section[key]
    return None


# ---------------------------------------------------------------- public entry point

def evaluate_model(model_path, questions_path, corpus_path=None, n=None, k: int = 3, seed: int = 0,
                   batch_size: int = 8, answers_out=None) -> dict:
    """Evaluate a teacher/student folder or a bundle on a SQuAD-format file.

    The corpus is `corpus_path` (SQuAD or JSONL) if given, else the passages of the questions file.
    Returns {"dataset", "n_questions", "k", "model", "em", "f1", ..., "seconds_per_question"};
    `answers_out` (a path) also gets every question's answers and retrieved passage ids as JSONL.
    """
    model_path = Path(model_path)
    questions = sample_questions(read_questions(questions_path), n, seed)
    is_bundle = (model_path / "manifest.json").exists()
    if is_bundle:
        passages = read_passages(corpus_path) if corpus_path else None
        metrics = evaluate_bundle(model_path, questions, passages, k, answers_out)
    else:
        if not (model_path / "generator").is_dir() or not (model_path / "query_encoder").is_dir():
            raise FileNotFoundError(f"{model_path}: neither a bundle (manifest.json) nor a model folder (query_encoder/ and generator/)")
        passages = read_passages(corpus_path or questions_path)
        metrics = evaluate_folder(model_path, questions, passages, k, batch_size=batch_size, answers_out=answers_out)
    return {"dataset": str(data_path(str(questions_path))), "n_questions": len(questions), "k": k,
            "model": str(model_path), **metrics}


def format_table(columns: dict[str, dict]) -> str:
    """A plain-text table: one row per metric, one column per model."""
    names = list(columns)
    keys = list(METRICS) + ["generator_params", "encoder_params", "seconds_per_question"]
    lines = [f"{'':22}" + "".join(f"{n:>14}" for n in names)]
    for key in keys:
        cells = []
        for n in names:
            v = columns[n].get(key)
            cells.append(f"{v:>14,}" if isinstance(v, int) else f"{v:>14.2f}" if isinstance(v, float) else f"{str(v):>14}")
        lines.append(f"{key:22}" + "".join(cells))
    return "\n".join(lines)
