"""A compressed student in a decoder-only run (recipe [compress]): the encoders, prompts and piece
vectors it reads with, its selector fitted on the run's train questions, and its distillation examples
(the teacher's targets, the student's compressed prompt).

The run-independent parts (piece vectors, the selector's fit, RECOMP's teacher positives) are
edgerag.train.compression_fit; the selection itself is edgerag.runtime.compress, the device's code.
"""

from __future__ import annotations

import random

from edgerag.data import Passage, Question

from . import loop
from .retrieval import embed, retrieve_for
from .run import Run


def student_piece_embedder(run: Run):
    """Piece vectors by the encoder that embeds the student's passages (as `edgerag export` will)."""
    from edgerag.runtime.compress import MAX_PIECE_WORDS

    from .compression_fit import PieceEmbedder

    return PieceEmbedder(run.student_passage_encoder if run.teacher_passages else run.student_encoder, MAX_PIECE_WORDS)


def student_query_vectors(run: Run, questions: list[Question]):
    from edgerag.model_files import normalizes
    from edgerag.models import load_encoder

    encoder, tok, pooling, max_length = load_encoder(run.student_encoder)
    return embed(encoder, tok, [q.question for q in questions], pooling, max_length,
                 normalize=normalizes(run.student_encoder))


def student_prompter(run: Run):
    """The compressed student's prompts (the compact template), in the teacher's token ids."""
    from edgerag.models import load_tokenizer

    from .teacher import Prompter

    p = run.recipe.prompt
    return Prompter(load_tokenizer(run.teacher_generator), p.max_prompt_tokens, p.max_answer_tokens, compact=True)


def fitted_compression(run: Run):
    """The recipe's compression, with the selector's lexical weight fitted on train questions (their
    top passages as retrieved, no gold inserted: what the device sees). Returns it and the share of
    questions whose selected pieces hold the answer, for each weight tried."""
    from edgerag.runtime.compress import Compression, Selector

    from .compression_fit import fit_selector

    c = run.recipe.compress
    compression = Compression(c.passages, c.budget, Selector())
    if not c.fit_selector:
        return compression, {}
    questions = run.questions("train")[:c.fit_questions]
    contexts = [[(p.title, p.text) for p in ranked] for ranked in retrieve_for(run, questions, c.passages)]
    positives = None
    if c.fit_target == "teacher":
        from edgerag.models import load_generator

        from .compression_fit import teacher_positives
        from .teacher import Prompter

        teacher, tokenizer = load_generator(run.teacher_generator)
        p = run.recipe.prompt
        positives = teacher_positives(teacher.to(loop.device()).eval(),
                                      Prompter(tokenizer, p.max_prompt_tokens, p.max_answer_tokens),
                                      questions, contexts, compression.max_piece_words)
        del teacher
    selector, shares = fit_selector(compression, questions, student_query_vectors(run, questions), contexts,
                                    student_piece_embedder(run), student_prompter(run).encode, positives)
    kept = "answer in context" if positives is None else "teacher's best piece kept"
    print(f"[student_folder] selector: lexical weight {selector.lexical} ({kept}, %, by weight: {shares})")
    return Compression(c.passages, c.budget, selector), shares


def compressed_student_examples(run: Run, questions: list[Question], examples: list, ranked: list[list[Passage]],
                                negatives: list[tuple[Question, list[Passage]]] = ()):
    """The distillation examples with the student's prompt in place of the teacher's: the compressed
    context of its top `compress.passages` passages (the gold one inserted as the teacher's examples
    insert it), in the compact template; for `negatives` (a question and passages that cannot answer
    it, whose example id ends in NEGATIVE_ID), the compressed context of those passages. Targets stay
    as they are, so the teacher's cached distributions line up with the student's answer positions."""
    from edgerag.models import read_info
    from edgerag.runtime.compress import Compression

    from .compression_fit import answer_share, compressed_contexts
    from .teacher import NEGATIVE_ID, Example, rag_context

    r, cfg = run.recipe, run.recipe.distill_generator
    compression = Compression.from_dict(read_info(run.student_dir)["compression"])
    prompter = student_prompter(run)
    rng = random.Random(r.seed + 3)
    wide = [rag_context(q, found, compression.passages, cfg.gold_probability, rng) for q, found in zip(questions, ranked)]
    wide += [[(p.title, p.text) for p in passages[:compression.passages]] for _, passages in negatives]
    asked = list(questions) + [q for q, _ in negatives]
    ids = [q.id for q in questions] + [q.id + NEGATIVE_ID for q, _ in negatives]
    contexts = compressed_contexts(compression, [q.question for q in asked], student_query_vectors(run, asked),
                                   wide, student_piece_embedder(run), prompter.encode)
    prompts = {i: prompter.prompt(q.question, ctx) for i, q, ctx in zip(ids, asked, contexts)}
    return [Example(e.question_id, prompts[e.question_id], e.target) for e in examples], \
        round(answer_share(questions, contexts[:len(questions)]), 2)

