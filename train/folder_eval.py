"""Evaluation of a teacher/student model folder with torch, by the same rules and scores as a bundle
(edgerag.evaluation, which dispatches here): a decoder-only folder (query_encoder/ + generator/), or a
hf-rag run's encoder-decoder teacher or student."""

from __future__ import annotations

import random
import time
from pathlib import Path

from edgerag.data import Passage, Question
from edgerag.metrics import RECALL_DEPTH, abstains, context_figures, score, write_answers
from edgerag.models import load_encoder, load_generator, passage_encoder_folder, read_info
from edgerag.runtime.compress import Compression, compress_context

from .rag_model import (concatenated_generate, doc_scores_for, load_rag, make_rag_examples, marginal_generate,
                        rag_generate, student_input)
from .retrieval import DPR_PASSAGE_FORMAT, PassageIndex, embed, passage_text


def evaluate_folder(folder: Path, questions: list[Question], passages: list[Passage], k: int = 3,
                    passage_embeddings=None, batch_size: int = 8, max_prompt_tokens: int | None = None,
                    max_answer_tokens: int | None = None, answers_out: Path | None = None,
                    unanswerable: float = 0.0, seed: int = 0) -> dict:
    """Metrics of a teacher/student folder. `passage_embeddings` (rows aligned with `passages`) saves
    re-encoding the corpus; otherwise the folder's passage encoder (edgerag.json) or its own query
    encoder embeds it.

    unanswerable: as edgerag.evaluation.evaluate_bundle's, the share of the questions also asked over
    passages that cannot answer them; a folder abstains where NO_ANSWER's first token is the more
    likely (confidence below ABSTAIN_AT: a folder has no fitted threshold; a bundle's is fitted at export)."""
    import torch

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
        from .compression_fit import shared_piece_embedder

        pieces = shared_piece_embedder(passage_encoder_folder(folder) or folder / "query_encoder", compression.max_piece_words)

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
    # With unanswerable questions in the mix, the open answers are scored as a bundle's are (edgerag.evaluation):
    # generated with NO_ANSWER ruled out at the first step and their confidence read, an abstention an
    # empty answer; the answerable half of the abstention figures then reuses them instead of asking again.
    open_confidences = [] if unanswerable else None
    with torch.inference_mode():
        open_answers = generate(generator, prompter, prompts, batch_size=batch_size, progress=f"eval {folder.name} open",
                                confidences=open_confidences)
    seconds = (time.perf_counter() - start) / max(len(questions), 1)
    answered = open_answers
    if unanswerable:
        open_answers = ["" if abstains(c, ABSTAIN_AT) else a for a, c in zip(answered, open_confidences)]

    gold_prompts = [prompter.prompt(q.question, context(q.question, v, [(q.title, q.context)])) for q, v in zip(questions, q_emb)]
    with torch.inference_mode():
        gold_answers = generate(generator, prompter, gold_prompts, batch_size=batch_size, progress=f"eval {folder.name} gold")
    ranked_ids = [[passages[r].id for r in rows] for rows in ranked_rows]
    result = score(questions, open_answers, ranked_ids, gold_answers)
    result.update(context_figures(questions, [gen_tok.decode(ids, skip_special_tokens=True) for ids in prompts],
                                  [len(ids) for ids in prompts]))
    result.update({"generator_params": count_params(generator), "encoder_params": count_params(encoder),
                   "seconds_per_question": round(seconds, 4)})
    if unanswerable:
        result["abstention"] = unanswerable_figures(generator, prompter, context, questions, q_emb, ranked_rows,
                                                    passages, list(zip(answered, open_confidences)), k, unanswerable,
                                                    seed, batch_size)
    if answers_out is not None:
        write_answers(answers_out, questions, open_answers, gold_answers, ranked_ids)
    return result


# a folder abstains where NO_ANSWER's first token is more likely than not
ABSTAIN_AT = 0.5


def unanswerable_figures(generator, prompter, context, questions, q_emb, ranked_rows, passages, open_answers, k: int,
                         share: float, seed: int, batch_size: int) -> dict:
    """abstention_figures of a torch generator: its open-domain (answer, confidence) for the answerable
    questions, and k passages that cannot answer (built as a bundle's evaluation builds them) for a
    `share` of them."""
    import torch

    from edgerag.data import unanswerable_passages, unanswerable_sample
    from edgerag.metrics import abstention_figures, answer_record

    from .teacher import generate

    made = unanswerable_sample(questions, share, seed)
    rng = random.Random(seed + 2)
    asked = []
    for q, v, rows in zip(questions, q_emb, ranked_rows):
        if q.id in made:
            negatives = unanswerable_passages(q, [passages[r] for r in rows], passages, k, rng)
            asked.append(prompter.prompt(q.question, context(q.question, v, [(p.title, p.text) for p in negatives])))
    confidences = []
    with torch.inference_mode():
        answers = iter(generate(generator, prompter, asked, batch_size=batch_size, progress="eval unanswerable",
                                confidences=confidences))
    confidences = iter(confidences)
    records = [answer_record(q, next(answers), next(confidences), False) if q.id in made
               else answer_record(q, *open_answers[i], True) for i, q in enumerate(questions)]
    return abstention_figures(records, ABSTAIN_AT)


def evaluate_rag_folder(folder, questions, corpus, k: int = 3, passage_vectors=None, max_prompt_tokens: int | None = None,
                        max_answer_tokens: int | None = None, batch_size: int = 8, answers_out: Path | None = None) -> dict:
    """A hf-rag teacher folder (rag/ + query_encoder/ + passage_encoder/: the RAG model's own generation)
    or an encoder-decoder student folder (its reading), by edgerag.evaluation's rules: open-domain
    and gold-passage EM/F1, recall@k; plus prompt_tokens (encoder tokens read per question: every
    context, for a reader of one passage at a time) and answer_in_context (the share of questions
    whose contexts, as read, hold a gold answer string). `passage_vectors` (rows aligned with
    `corpus`) saves embedding the corpus with the folder's passage encoder."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from .student import count_params

    folder, info = Path(folder), read_info(folder)
    max_prompt_tokens = max_prompt_tokens or info.get("max_prompt_tokens", 512)
    max_answer_tokens = max_answer_tokens or info.get("max_answer_tokens", 24)
    question_bert, q_tok, pooling, q_max = load_encoder(folder / "query_encoder")
    if (folder / "rag").is_dir():
        model, rag_tok = load_rag(folder / "rag")
        generator, tok, reading = model.generator, rag_tok.generator, "teacher"
    else:
        generator = BartForConditionalGeneration.from_pretrained(folder / "generator").eval()
        tok, reading = AutoTokenizer.from_pretrained(folder / "generator"), info.get("reading", "concatenated")
    if passage_vectors is None:
        p_enc, p_tok, p_pool, p_max = load_encoder(folder / info.get("passage_encoder", "passage_encoder"))
        fmt = info.get("passage_format", DPR_PASSAGE_FORMAT)
        passage_vectors = embed(p_enc, p_tok, [fmt.format(title=p.title, text=p.text) for p in corpus], p_pool, p_max,
                                progress="embed corpus (DPR)", normalize=False)
    vectors = torch.from_numpy(np.asarray(passage_vectors, dtype=np.float32))
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    q_vectors = embed(question_bert, q_tok, [q.question for q in questions], pooling, q_max, normalize=False)
    ranked = PassageIndex(range(len(corpus)), vectors.numpy()).search(q_vectors, max(k, RECALL_DEPTH))
    k = min(k, len(corpus))
    open_examples = make_rag_examples(questions, [rows[:k] for rows in ranked], corpus, tok, generator, k,
                                      max_prompt_tokens, max_answer_tokens, 0.0, random.Random(0), {})
    pad_id = generator.config.pad_token_id

    def answers(examples, doc_scores):
        out = []
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            scores = doc_scores(batch)
            if reading == "teacher":
                ids = rag_generate(model, batch, scores, pad_id, max_answer_tokens)
            elif reading == "marginalized":
                ids = marginal_generate(generator, batch, scores, pad_id, max_answer_tokens)
            else:
                ids = concatenated_generate(generator, [e.concatenated for e in batch], pad_id, max_answer_tokens)
            out += [tok.decode(a, skip_special_tokens=True).strip() for a in ids]
        return out

    def retrieved_scores(batch):
        with torch.no_grad():
            return doc_scores_for(question_bert, q_tok, batch, vectors)

    open_answers = answers(open_examples, retrieved_scores)
    seconds = (time.perf_counter() - start) / max(len(questions), 1)
    # with the gold passage alone (one passage: its doc score does not matter)
    gold_corpus = [_passage(q) for q in questions]
    gold_examples = make_rag_examples(questions, [[i] for i in range(len(questions))], gold_corpus, tok, generator,
                                      1, max_prompt_tokens, max_answer_tokens, 0.0, random.Random(0), {})
    gold_answers = answers(gold_examples, lambda batch: torch.zeros(len(batch), 1))
    ranked_ids = [[corpus[i].id for i in rows] for rows in ranked]
    result = score(questions, open_answers, ranked_ids, gold_answers)
    read = [student_input(e, "marginalized" if reading == "teacher" else reading) for e in open_examples]
    result.update(context_figures(questions, [tok.decode(sum(rows, []), skip_special_tokens=True) for rows in read],
                                  [sum(len(x) for x in rows) for rows in read]))
    result.update({"reading": reading, "generator_params": count_params(generator),
                   "encoder_params": count_params(question_bert), "seconds_per_question": round(seconds, 4)})
    if answers_out is not None:
        write_answers(answers_out, questions, open_answers, gold_answers, ranked_ids)
    return result


def _passage(question):
    return Passage(question.passage_id, question.title, question.context)
