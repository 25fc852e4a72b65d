"""A compressed student in a decoder-only run (recipe [compress]): the encoders, prompts and piece
vectors it reads with, its selector fitted on the run's train questions, and its distillation examples
(the teacher's targets, the student's compressed prompt).

The run-independent parts (piece vectors, the selector's fit, RECOMP's teacher positives) are
edgerag.train.compression_fit; the selection itself is edgerag.runtime.compress, the device's code.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from edgerag.data import Passage, Question

from . import loop
from .retrieval import embed, retrieve_for
from .run import Run


def student_piece_encoder(run: Run) -> Path:
    """The encoder that embeds the student's passages and their pieces (as `edgerag export` will)."""
    return run.student_passage_encoder if run.separate_passage_encoder else run.student_encoder


def student_piece_embedder(run: Run):
    from edgerag.runtime.compress import MAX_PIECE_WORDS

    from .compression_fit import shared_piece_embedder

    return shared_piece_embedder(student_piece_encoder(run), MAX_PIECE_WORDS)


def student_query_vectors(run: Run, questions: list[Question]):
    return query_vectors(run.student_encoder, questions)


def query_vectors(encoder_folder, questions: list[Question]):
    from edgerag.model_files import normalizes
    from edgerag.models import load_encoder

    encoder, tok, pooling, max_length = load_encoder(encoder_folder)
    return embed(encoder, tok, [q.question for q in questions], pooling, max_length, normalize=normalizes(encoder_folder))


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


@dataclasses.dataclass
class CompressedReader:
    """Who reads a compressed context in training: its compression, the encoders of its questions and
    pieces, and its prompts."""
    compression: object      # edgerag.runtime.compress.Compression
    query_encoder: Path
    piece_encoder: Path
    prompter: object         # edgerag.train.teacher.Prompter, compact template


def student_reader(run: Run) -> CompressedReader:
    from edgerag.models import read_info
    from edgerag.runtime.compress import Compression

    return CompressedReader(Compression.from_dict(read_info(run.student_dir)["compression"]), run.student_encoder,
                            student_piece_encoder(run), student_prompter(run))


def teacher_reader(run: Run, compression=None) -> CompressedReader:
    """The teacher reading a compressed context ([teacher_finetune] context = "compressed"): [compress]'s
    passages and budget with the default selector, pieces and questions in the teacher's own encoder, or
    the `compression` its folder records."""
    from edgerag.models import load_tokenizer
    from edgerag.runtime.compress import Compression, Selector

    from .teacher import Prompter

    c, p = run.recipe.compress, run.recipe.prompt
    compression = compression or Compression(c.passages, c.budget, Selector())
    generator = run.teacher_generator if run.teacher_generator.exists() else run.teacher_base_generator
    return CompressedReader(compression, run.teacher_encoder, run.teacher_encoder,
                            Prompter(load_tokenizer(generator), p.max_prompt_tokens, p.max_answer_tokens, compact=True))


def compressed_student_examples(run: Run, questions: list[Question], examples: list, ranked: list[list[Passage]],
                                negatives: list[tuple[Question, list[Passage]]] = ()):
    return compressed_examples(run, student_reader(run), questions, examples, ranked, negatives,
                               run.recipe.distill_generator.gold_probability, seed_offset=3)


def compressed_examples(run: Run, reader: CompressedReader, questions: list[Question], examples: list,
                        ranked: list[list[Passage]], negatives: list[tuple[Question, list[Passage]]] = (),
                        gold_probability: float = 1.0, seed_offset: int = 3):
    """The examples with `reader`'s prompt in place of theirs: the compressed context of its top
    `compression.passages` passages (the gold one inserted with `gold_probability` where retrieval missed
    it), in the compact template; for `negatives` (a question and passages that cannot answer it, whose
    example id ends in NEGATIVE_ID), the compressed context of those passages. Targets stay as they
    are, so a teacher's cached distributions line up with the answer positions. Returns them and the
    share of `questions` whose compressed context holds a gold answer."""
    from .compression_fit import answer_share, compressed_contexts, shared_piece_embedder
    from .teacher import NEGATIVE_ID, Example, rag_context

    compression, prompter = reader.compression, reader.prompter
    rng = random.Random(run.recipe.seed + seed_offset)
    wide = [rag_context(q, found, compression.passages, gold_probability, rng) for q, found in zip(questions, ranked)]
    wide += [[(p.title, p.text) for p in passages[:compression.passages]] for _, passages in negatives]
    asked = list(questions) + [q for q, _ in negatives]
    ids = [q.id for q in questions] + [q.id + NEGATIVE_ID for q, _ in negatives]
    contexts = compressed_contexts(compression, [q.question for q in asked], query_vectors(reader.query_encoder, asked),
                                   wide, shared_piece_embedder(reader.piece_encoder, compression.max_piece_words), prompter.encode,
                                   progress="compressed contexts")
    prompts = {i: prompter.prompt(q.question, ctx) for i, q, ctx in zip(ids, asked, contexts)}
    return [Example(e.question_id, prompts[e.question_id], e.target) for e in examples], \
        round(answer_share(questions, contexts[:len(questions)]), 2)
