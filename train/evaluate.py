"""Evaluation of a teacher/student folder (query_encoder/ + generator/) with torch, by the same
rules and scores as a bundle (edgerag.evaluation, which also dispatches here)."""

from __future__ import annotations

import time
from pathlib import Path

from edgerag.data import Passage, Question
from edgerag.evaluation import RECALL_DEPTH, context_figures, score, write_answers
from edgerag.models import load_encoder, load_generator, passage_encoder_folder, read_info
from edgerag.runtime.compress import Compression, compress_context


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
    encoder, enc_tok, pooling, max_length = load_encoder(folder / "query_encoder")
    generator, gen_tok = load_generator(folder / "generator")
    info = read_info(folder)
    if passage_embeddings is None:
        p_folder = passage_encoder_folder(folder)
        p_enc, p_tok, p_pool, p_len = load_encoder(p_folder) if p_folder else (encoder, enc_tok, pooling, max_length)
        passage_embeddings = embed(p_enc, p_tok, [passage_text(p.title, p.text) for p in passages], p_pool, p_len,
                                   progress="embed corpus")
    index = PassageIndex(passages, passage_embeddings)
    compression = Compression.from_dict(info["compression"]) if info.get("compression") else None
    prompter = Prompter(gen_tok, max_prompt_tokens or info.get("max_prompt_tokens", 512),
                        max_answer_tokens or info.get("max_answer_tokens", 24), compact=info.get("template") == "compact")
    if compression is not None:
        from .compress import PieceEmbedder

        pieces = PieceEmbedder(passage_encoder_folder(folder) or folder / "query_encoder", compression.max_piece_words)

    def context(question: str, vector, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """What the generator reads: the passages, or their selected pieces (a compressed student)."""
        if compression is None:
            return found
        return compress_context(compression, question, vector, found, pieces(found), prompter.encode)

    # Open-domain: the timed part (encode the query, search, compress, build the prompt, generate).
    start = time.perf_counter()
    q_emb = embed(encoder, enc_tok, [q.question for q in questions], pooling, max_length)
    ranked_rows = index.search(q_emb, max(k, RECALL_DEPTH))
    if compression is not None:  # piece vectors come with a bundle, computed at export: not timed here
        paused = time.perf_counter()
        pieces([(passages[r].title, passages[r].text) for rows in ranked_rows for r in rows[:k]])
        start += time.perf_counter() - paused
    prompts = [prompter.prompt(q.question, context(q.question, v, [(passages[r].title, passages[r].text) for r in rows[:k]]))
               for q, v, rows in zip(questions, q_emb, ranked_rows)]
    with torch.inference_mode():
        open_answers = generate(generator, prompter, prompts, batch_size=batch_size, progress=f"eval {folder.name} open")
    seconds = (time.perf_counter() - start) / max(len(questions), 1)

    gold_prompts = [prompter.prompt(q.question, context(q.question, v, [(q.title, q.context)])) for q, v in zip(questions, q_emb)]
    with torch.inference_mode():
        gold_answers = generate(generator, prompter, gold_prompts, batch_size=batch_size, progress=f"eval {folder.name} gold")
    ranked_ids = [[passages[r].id for r in rows] for rows in ranked_rows]
    result = score(questions, open_answers, ranked_ids, gold_answers)
    result.update(context_figures(questions, [gen_tok.decode(ids, skip_special_tokens=True) for ids in prompts],
                                  [len(ids) for ids in prompts]))
    result.update({"generator_params": count_params(generator), "encoder_params": count_params(encoder),
                   "seconds_per_question": round(seconds, 4)})
    if answers_out is not None:
        write_answers(answers_out, questions, open_answers, gold_answers, ranked_ids)
    return result
