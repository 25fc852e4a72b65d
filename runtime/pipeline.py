"""Bundle -> answers, with onnxruntime, numpy, hnswlib, tokenizers and the standard library.

    pipeline = Pipeline.load("bundle/")
    answer = pipeline.ask("Who won Super Bowl 50?")
    for piece in pipeline.stream("..."): print(piece, end="")
    answers = pipeline.ask_batch(["...", "..."])

The Pipeline and the Answer it returns; below it, runtime.loading opens a bundle's parts,
runtime.retrieval, runtime.compress and runtime.prompt make a question's prompt, and a generator
(runtime.decoder_only, runtime.encoder_decoder) decodes it through runtime.generation's loop.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import hnswlib
import numpy as np
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from edgerag.runtime.citations import cite
from edgerag.runtime.compress import Compression, PieceVectors, compress_context, split_pieces
from edgerag.runtime.decoder_only import DecoderOnlyGenerator
from edgerag.runtime.encoder_decoder import EncoderDecoderGenerator
from edgerag.runtime.generation import Abstention, SpanConstraint, periodic_tail, repetition_cut
from edgerag.runtime.corpus import (ChangeOptions, CorpusChange, PassageEmbedder, add_documents, remove_documents,
                                    sync_documents)
from edgerag.runtime.loading import open_corpus, open_current, open_parts, weight_files
from edgerag.runtime.manifest import ANSWER_KINDS, Manifest
from edgerag.runtime.memory import (AnswersInFlight, anonymous_regions, collapse_when_idle, huge_pages_allowed,
                                    read_weights_on_demand)
from edgerag.runtime.prompt import (PromptError, PromptTemplate, TokenIds, build_prompt_ids, check_count,
                                    check_prompt_lookup, check_question, check_threshold)
from edgerag.runtime.retrieval import PassageStore, QueryEncoder


@dataclass
class Answer:
    question: str
    answer: str
    passages: list[dict]
    timings: dict
    prompt_tokens: int = 0
    new_tokens: int = 0
    tokens_per_second: float = 0.0
    # "stop" (the model ended it), "length" (max_new_tokens), "repetition" (a repeating tail was cut),
    # "deadline" (the caller's deadline passed), "cancelled" (the caller's cancel event was set),
    # "abstained" (the context does not hold an answer, as far as the generator can tell: answer "")
    stop_reason: str = ""
    # what the generator read: the passages' selected pieces where the bundle compresses its context,
    # else the passages themselves ({"title", "text"}, in rank order)
    context: list[dict] = field(default_factory=list)
    # where the answer stands (runtime.citations): the passage, and the spans in its stored text of the
    # sentence and of the answer; empty, and supported False, where the answer appears nowhere in what was read
    citations: list[dict] = field(default_factory=list)
    supported: bool = False
    # where the bundle learned to abstain (manifest.abstention): whether it did, and the answer's
    # confidence (1 - the probability of the no-answer output, times the geometric mean of the answer's
    # token probabilities where manifest.abstention.confidence is "answer"), compared with the threshold; None without
    abstained: bool = False
    confidence: float | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to_record(self) -> dict:
        """The answer as one JSON-ready record (timings to the microsecond)."""
        record = self.to_dict()
        record["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        record["tokens_per_second"] = round(self.tokens_per_second, 2)
        return record


@dataclass
class Pipeline:
    """A loaded bundle: query encoder, hnswlib index, passage store and generator."""

    path: Path
    manifest: Manifest
    encoder: QueryEncoder
    index: hnswlib.Index
    store: PassageStore
    generator: DecoderOnlyGenerator | EncoderDecoderGenerator | None
    tokenizer: Tokenizer
    template: PromptTemplate
    size: int = field(default=0)
    compression: Compression | None = None
    pieces: PieceVectors | None = None
    _added_pieces: dict = field(default_factory=dict, repr=False)  # index row -> piece vectors of added passages
    # hnswlib's ef is set per search and added passages grow the index: retrieval runs one at a time
    _retrieval_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # moves the memory the load allocated to huge pages between answers (collapse_when_idle); None: huge pages off
    huge_pages: threading.Thread | None = field(default=None, repr=False)
    # entered around each answer; background work (huge pages) waits while it is held. A caller that
    # must not share the machine with that work (a bandwidth probe) enters it too
    answers_in_flight: AnswersInFlight = field(default_factory=AnswersInFlight, repr=False)
    # the generator's tokenizer as `encode(text) -> ids` (no special tokens): the prompt's and the compressed context's
    token_ids: TokenIds = field(init=False, repr=False)
    # "spans": every answer a span of the context the generator read; "free": the generator's own tokens
    answers: str = field(init=False)
    # abstain where an answer's confidence is below it (None: the bundle cannot abstain; 0: never)
    abstain_threshold: float | None = field(init=False)
    _next_label: int = field(init=False, repr=False)
    # the encoder export embedded passages and pieces with (its passage encoder, where it ships one),
    # loaded on first use: a bundle that is only asked never needs it
    _passage_embedder_loaded: PassageEmbedder | None = field(default=None, init=False, repr=False)
    _passage_embedder_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        self.token_ids = TokenIds(self.tokenizer)
        self._next_label = self.manifest.index.labels or self.size  # the label add_passages gives next
        self.answers = self.manifest.generation.answers
        abstention = self.manifest.abstention
        self.abstain_threshold = None if abstention is None else abstention.threshold

    @classmethod
    def load(cls, bundle: str | Path, threads: int | None = None, check: bool = True,
             reuse_prefix: str | bool = "template", retrieval_only: bool = False,
             prompt_lookup: int | None = None, answers: str | None = None,
             abstain_threshold: float | None = None, budget: int | None = None) -> "Pipeline":
        """Load a bundle directory. Every file's checksum is verified (`check=False` skips that): the weight
        files' beside the loading, every other file's before it is parsed.

        retrieval_only: load no generator (retrieve and passages work; ask and stream do not).

        reuse_prefix: "template" (the default) starts every prompt from the KV of the template's
        opening, computed once here; "previous" from the part it shares with the previous prompt;
        "none" from scratch (see DecoderOnlyGenerator).

        prompt_lookup: tokens drafted per decode step from the prompt, where the generator graph
        takes them (None: DecoderOnlyGenerator.PROMPT_LOOKUP; 0: one token per step).

        answers: "spans" makes every answer a span of the context the generator read, "free" leaves
        the generator's tokens as they are (None: the bundle's setting, generation.answers).

        abstain_threshold: abstain where an answer's confidence is below it, in [0, 1] (None: the
        bundle's, manifest.abstention.threshold; 0: never). A bundle that did not learn to abstain
        has no confidence and ignores it.

        budget: tokens of piece text in the compressed context (None: the bundle's,
        manifest.compression.budget). More holds a gold answer more often but costs prefill time, and
        a student reads best the budget it was distilled on; a bundle without compression ignores it.

        Threads may share a Pipeline: ask, stream, ask_batch and retrieve keep no state between
        calls (with "previous", an answer depends on the previous prompt within the quantization
        error of int8sq), retrieval is serialized and generation runs concurrently.
        """
        check_prompt_lookup(prompt_lookup)
        check_threshold(abstain_threshold)
        check_count("budget", budget)
        if answers is not None and answers not in ANSWER_KINDS:
            raise ValueError(f"answers is {answers!r}; choose from {', '.join(ANSWER_KINDS)}")
        bundle = Path(bundle)
        before = anonymous_regions()
        manifest, parts = open_current(bundle, lambda m: open_parts(bundle, m, threads, reuse_prefix, retrieval_only,
                                                                    prompt_lookup, check))
        pipeline = cls(bundle, manifest, **parts._asdict())
        pipeline.answers = answers or manifest.generation.answers
        if abstain_threshold is not None and pipeline.abstain_threshold is not None:
            pipeline.abstain_threshold = float(abstain_threshold)
        if budget is not None and pipeline.compression is not None:
            room = pipeline.prompt_budget(manifest.generation.max_new_tokens)
            if budget >= room:
                raise PromptError(f"budget is {budget} tokens; this bundle's prompt holds {room} with the question and "
                                  f"the template (its own budget is {pipeline.compression.budget})")
            pipeline.compression = replace(pipeline.compression, budget=budget)
        return cls._opened(pipeline, retrieval_only, [bundle / name for name in weight_files(manifest)], before)

    @staticmethod
    def _opened(pipeline: "Pipeline", retrieval_only: bool, weights: list[Path],
                regions_before: Iterable[tuple[int, int]]) -> "Pipeline":
        """The pipeline, once it has loaded (and passed its checks): its memory settled (the mapped
        weights read on demand, what the load allocated moved to huge pages in the background), and
        a warning, once, of what it lacks."""
        read_weights_on_demand(weights)
        if huge_pages_allowed():
            # the thread holds what it needs, not the pipeline, which it would otherwise keep alive
            pipeline.huge_pages = threading.Thread(
                target=collapse_when_idle, args=(list(regions_before), pipeline.answers_in_flight,
                                                 pipeline.HUGE_PAGES_WITHOUT_QUESTION_S),
                name="edgerag-huge-pages", daemon=True)
            pipeline.huge_pages.start()
        if pipeline.compression is None and not retrieval_only:
            warnings.warn(f"bundle {pipeline.path} carries no compressed-context data (exported before it existed, or "
                          "from a student that reads whole passages): answers read the full top-k passages", stacklevel=3)
        return pipeline

    # a pipeline that waits this long for its first question moves its pages to huge ones meanwhile
    HUGE_PAGES_WITHOUT_QUESTION_S = 1.0

    # retrieval ---------------------------------------------------------------------------
    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the k nearest passages for each embedding."""
        with self._retrieval_lock:
            return self._search(embeddings, k)

    def _search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.size)
        if k == 0:
            return np.zeros((len(embeddings), 0), np.uint64), np.zeros((len(embeddings), 0), np.float32)
        self.index.set_ef(max(self.manifest.index.ef, k))
        try:
            rows, distances = self.index.knn_query(embeddings, k=k)
        except RuntimeError:
            # removed passages' slots still sit in the graph: a small ef may then find fewer than
            # k live ones (hnswlib's "Cannot return the results in a contiguous 2D array")
            self.index.set_ef(self.index.get_current_count())
            rows, distances = self.index.knn_query(embeddings, k=k)
        return rows, 1.0 - distances  # hnswlib's 'ip' distance is 1 - dot product

    def _look_up(self, embeddings: np.ndarray, k: int, timings: dict) -> list[tuple[list[dict], list | None]]:
        """For each embedding, its top-k passages and their piece vectors (None where the bundle does
        not compress), taken in one step: a corpus reloaded meanwhile is seen whole or not at all.
        timings["search_ms"]: the index search alone, per embedding."""
        with self._retrieval_lock:
            started = time.perf_counter()
            rows, scores = self._search(embeddings, k)
            timings["search_ms"] = (time.perf_counter() - started) * 1000 / max(len(embeddings), 1)
            return [(self._passages_at(r, s), self.piece_vectors(r) if self.compression is not None else None)
                    for r, s in zip(rows, scores)]

    def retrieve(self, question: str, k: int | None = None) -> list[dict]:
        check_question(question)
        vector = self.encoder.encode([question])
        with self._retrieval_lock:
            rows, scores = self._search(vector, self._k(k))
            return self._passages_at(rows[0], scores[0])

    def passages_at(self, rows, scores=None) -> list[dict]:
        """The passages at index rows, as {"id", "title", "score", "text"}."""
        with self._retrieval_lock:
            return self._passages_at(rows, scores)

    def _passages_at(self, rows, scores=None) -> list[dict]:
        scores = [None] * len(rows) if scores is None else [float(s) for s in scores]
        found = self.store.get(rows)
        return [{"id": pid, "title": title, "score": score, "text": text}
                for (pid, title, text), score in zip(found, scores)]

    def passages(self) -> list[tuple[str, str, str]]:
        """Every (id, title, text) the pipeline retrieves from, in index row order."""
        with self._retrieval_lock:
            return list(self.store)

    def add_passages(self, passages: list[tuple[str, str, str]], batch_size: int = 64) -> int:
        """Add (id, title, text) passages to the in-memory index, embedded as export embedded the bundle's
        (its passage encoder, else its query encoder).

        Passages whose id the bundle already holds are skipped, so a corpus that overlaps the
        bundle's own passages does not duplicate them. Returns how many were added.
        """
        added = 0
        for start in range(0, len(passages), batch_size):
            chunk = list({p[0]: p for p in passages[start:start + batch_size]}.values())  # each id once
            vectors = self._passage_embedder().embed([(title, text) for _, title, text in chunk])
            with self._retrieval_lock:  # the check and the add as one step: concurrent adds cannot duplicate
                known = self.store.has_ids([pid for pid, _, _ in chunk])
                keep = [i for i, p in enumerate(chunk) if p[0] not in known]
                if not keep:
                    continue
                rows = np.arange(self._next_label, self._next_label + len(keep))
                self.index.resize_index(self.index.get_current_count() + len(keep))
                self.index.add_items(vectors[keep], rows)
                self._next_label += len(keep)
                self.store.add(rows, [chunk[i] for i in keep])
                if self.compression is not None:
                    self._added_pieces.update(zip(rows.tolist(), self._embed_pieces([chunk[i][1:] for i in keep])))
                self.size += len(keep)
            added += len(keep)
        return added

    # the bundle's documents, changed on disk (runtime.corpus) --------------------------------
    def add_documents(self, paths, options: ChangeOptions | None = None) -> CorpusChange:
        """Add files and folders to the bundle on disk (runtime.corpus.add_documents), then answer from it."""
        return self._changed(add_documents(self.path, paths, options, self._passage_embedder()))

    def remove_documents(self, sources, options: ChangeOptions | None = None) -> CorpusChange:
        return self._changed(remove_documents(self.path, sources, options))

    def sync_documents(self, folder, options: ChangeOptions | None = None) -> CorpusChange:
        return self._changed(sync_documents(self.path, folder, options, self._passage_embedder()))

    def _passage_embedder(self) -> PassageEmbedder:
        # the query encoder's session serves where it also embeds passages; a passage encoder loads once
        with self._passage_embedder_lock:
            if self._passage_embedder_loaded is None:
                shared = self.encoder if self.manifest.passage_encoder is None else None
                self._passage_embedder_loaded = PassageEmbedder(self.path, self.manifest, shared)
            return self._passage_embedder_loaded

    def _changed(self, change: CorpusChange) -> CorpusChange:
        if change.changed:
            self.reload_corpus()
        return change

    def reload_corpus(self) -> bool:
        """Answer from the bundle's corpus as it is on disk now, if it changed (another process's
        `edgerag sync`, say). Questions in flight finish on the corpus they started with; passages
        added in memory (add_passages) are dropped. Returns whether it changed."""
        manifest, corpus = open_current(self.path, lambda m: None if m.to_bytes() == self.manifest.to_bytes()
                                        else open_corpus(self.path, m, check=True))
        if corpus is None:
            return False
        index, store, pieces = corpus
        with self._retrieval_lock:
            old_store = self.store
            self.manifest, self.index, self.store, self.pieces = manifest, index, store, pieces
            self.size, self._next_label = manifest.index.count, manifest.index.labels or manifest.index.count
            self._added_pieces = {}
            old_store.close()
        return True

    # the compressed context --------------------------------------------------------------
    def context(self, question: str, query_vector: np.ndarray, passages: list[tuple[str, str]],
                piece_vectors: list[np.ndarray] | None = None) -> list[tuple[str, str]]:
        """What the generator reads of (title, text) passages in rank order: their pieces that the
        bundle's selector picks for the question (runtime.compress), or the passages themselves where
        the bundle does not compress. piece_vectors: the passages' stored ones (else embedded here)."""
        if self.compression is None:
            return list(passages)
        if piece_vectors is None:
            piece_vectors = self._embed_pieces(passages)
        return compress_context(self.compression, question, query_vector, passages, piece_vectors, self.token_ids)

    def piece_vectors(self, rows) -> list[np.ndarray]:
        """The piece vectors of the passages at index rows: the bundle's, or those of added passages."""
        return [self._added_pieces[int(r)] if int(r) in self._added_pieces else self.pieces.of(int(r)) for r in rows]

    def _embed_pieces(self, passages: list[tuple[str, str]]) -> list[np.ndarray]:
        """Piece vectors of passages the bundle does not store, embedded as export embedded the stored
        ones (its passage encoder, else its query encoder), each passage's pieces in a batch of their own."""
        out = []
        for title, text in passages:
            pieces = split_pieces(text, self.compression.max_piece_words)
            out.append(self._passage_embedder().embed([(title, p) for p in pieces]) if pieces
                       else np.zeros((0, self.manifest.query_encoder.dim), np.float32))
        return out

    # generation --------------------------------------------------------------------------
    def prompt_ids(self, question: str, passages: list[tuple[str, str]], max_new_tokens: int | None = None) -> list[int]:
        """The generator's prompt for a question and (title, text) passages in rank order, cut to fit
        the context with room for `max_new_tokens` (runtime.prompt's truncation rule)."""
        if check_count("max_new_tokens", max_new_tokens) is None:
            max_new_tokens = self.manifest.generation.max_new_tokens
        return build_prompt_ids(self.token_ids, self.template, question, passages, self.prompt_budget(max_new_tokens))

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Prompt tokens that fit: a decoder-only context holds the prompt and the answer; an encoder's
        holds the prompt alone (the answer is the decoder's)."""
        gen = self.manifest.generator
        if gen.family != "encoder-decoder":
            return gen.max_context - max_new_tokens
        longest = gen.decoder_positions - 1 - (gen.forced_bos_token_id is not None)
        if gen.decoder_positions and max_new_tokens > longest:
            raise PromptError(f"max_new_tokens is {max_new_tokens}; this bundle's decoder writes at most {longest} tokens")
        return gen.max_context

    def _answer(self, question: str, passages: list[dict], context: list[tuple[str, str]], max_new_tokens: int | None,
                timings: dict, started: float, deadline: float | None = None,
                cancel: threading.Event | None = None) -> Iterator[str]:
        if self.generator is None:
            raise ValueError("this pipeline was loaded with retrieval_only=True: it has no generator")
        if check_count("max_new_tokens", max_new_tokens) is None:
            max_new_tokens = self.manifest.generation.max_new_tokens
        if not context:  # nothing to read (an empty corpus): no answer to give
            return Answer(question, "", passages, {**timings, "total_ms": (time.perf_counter() - started) * 1000},
                          stop_reason="abstained", abstained=True, confidence=0.0 if self.abstain_threshold is not None else None)
        prompt = self.prompt_ids(question, context, max_new_tokens)
        decoder = DecodeStream(skip_special_tokens=True)
        constraint = None
        if self.answers == "spans":
            # passage texts apart: a span never runs from one into the next (nor into a title)
            constraint = SpanConstraint("\x00".join(text for _, text in context),
                                        lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                                        self.generator.stop, self.token_ids)
        abstention = None
        if self.abstain_threshold is not None:
            abstention = Abstention(self.manifest.abstention.token_ids, self.abstain_threshold,
                                    reads_answer=self.manifest.abstention.confidence == "answer")
        # an answer that may yet turn out to be an abstention is not streamed before it is settled
        hold = abstention is not None and abstention.reads_answer and abstention.threshold > 0
        generation = self.generator.generate(prompt, max_new_tokens, constraint, abstention)
        window = self.manifest.generation.repetition_window
        # A piece is held back while its token is part of a repeating tail, so that a loop which is
        # then cut is never streamed, and white space is held back while it may end the answer (whose
        # text is stripped): streamed text and the answer's text stay the same.
        with self.answers_in_flight:  # the background huge-page work waits while an answer is generated
            pieces, sent, stop_reason, streamed = [], 0, "", StrippedText()
            for token in generation:
                if len(generation.tokens) == 1:
                    timings["ttft_ms"] = (time.perf_counter() - started) * 1000
                pieces.append(decoder.step(self.tokenizer, token) or "")
                cut = repetition_cut(generation.tokens, window)
                if cut is not None:
                    stop_reason = "repetition"
                    break
                if deadline is not None and time.monotonic() > deadline:
                    stop_reason = "deadline"
                if cancel is not None and cancel.is_set():
                    stop_reason = "cancelled"
                if stop_reason:
                    break
                ready = len(pieces) - (periodic_tail(generation.tokens, window // 3) if window else 0)
                if ready > sent and not hold:
                    chunk = streamed.add("".join(pieces[sent:ready]))
                    sent = ready
                    if chunk:
                        yield chunk
            generation.settle()
            tokens = generation.tokens[:cut] if stop_reason == "repetition" else generation.tokens
            if generation.abstained:
                tokens, stop_reason = [], ""
            rest = streamed.add("".join(pieces[sent:len(tokens)]))
            if rest:
                yield rest
        timings.update(prefill_ms=generation.prefill_ms, decode_ms=generation.decode_ms,
                       decode_steps=generation.decode_steps, decode_tokens=generation.decode_tokens,
                       reused_prompt_tokens=generation.reused_prompt_tokens, abstain_ms=generation.abstain_ms,
                       total_ms=(time.perf_counter() - started) * 1000)
        # A cut (length, deadline, cancel) can fall between the bytes of one character, which decode to
        # U+FFFD; the stream never sent that half, and the answer's text keeps none of it either.
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip().rstrip("\ufffd").rstrip()
        decode_s = generation.decode_ms / 1000
        t = time.perf_counter()
        citation = cite(text, context, passages, question)
        timings["cite_ms"] = (time.perf_counter() - t) * 1000
        return Answer(question, text, passages, timings, len(prompt), len(tokens),
                      generation.decode_tokens / decode_s if decode_s > 0 else 0.0, stop_reason or generation.stop_reason,
                      [{"title": title, "text": passage_text} for title, passage_text in context],
                      [citation.to_dict()] if citation else [], citation is not None, generation.abstained,
                      generation.confidence)

    def stream(self, question: str, k: int | None = None, max_new_tokens: int | None = None,
               deadline: float | None = None, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield answer text as it is produced; the generator's return value is the full Answer.

        deadline: a time.monotonic() value after which generation stops (stop_reason "deadline");
        cancel: an event that stops it when set (stop_reason "cancelled").
        """
        check_question(question)
        k = self._k(k)
        check_count("max_new_tokens", max_new_tokens)
        started = time.perf_counter()
        timings = {}
        vector = self.encoder.encode([question])
        timings["encode_ms"] = (time.perf_counter() - started) * 1000
        (passages, piece_vectors), = self._look_up(vector, k, timings)
        context = self._context_timed(question, vector[0], passages, piece_vectors, timings)
        return (yield from self._answer(question, passages, context, max_new_tokens, timings, started, deadline, cancel))

    def _context_timed(self, question: str, vector, passages: list[dict], piece_vectors, timings: dict) -> list[tuple[str, str]]:
        t = time.perf_counter()
        context = self.context(question, vector, [(p["title"], p["text"]) for p in passages], piece_vectors)
        timings["compress_ms"] = (time.perf_counter() - t) * 1000
        return context

    def ask(self, question: str, k: int | None = None, max_new_tokens: int | None = None,
            deadline: float | None = None, cancel: threading.Event | None = None) -> Answer:
        return _drain(self.stream(question, k, max_new_tokens, deadline, cancel))

    def _k(self, k) -> int:
        return self.manifest.generation.k if check_count("k", k) is None else k

    def answer_with_passages(self, question: str, passages: list[tuple[str, str]],
                             max_new_tokens: int | None = None) -> Answer:
        """Answer from given (title, text) passages, skipping retrieval (e.g. the gold passage)."""
        check_question(question)
        given = [{"id": None, "title": t, "score": None, "text": x} for t, x in passages]
        timings = {"encode_ms": 0.0, "search_ms": 0.0}
        started = time.perf_counter()
        context = list(passages)
        if self.compression is not None:
            context = self.context(question, self.encoder.encode([question])[0], context)
        return _drain(self._answer(question, given, context, max_new_tokens, timings, started))

    def ask_batch(self, questions: list[str], k: int | None = None, max_new_tokens: int | None = None) -> list[Answer]:
        """Many questions: encoded and searched together, then answered one by one."""
        for i, q in enumerate(questions):
            try:
                check_question(q)
            except PromptError as e:
                raise PromptError(f"question {i} of the batch: {e}") from None
        k = self._k(k)
        check_count("max_new_tokens", max_new_tokens)
        if not questions:
            return []
        started = time.perf_counter()
        vectors = self.encoder.encode(questions)
        encode_ms = (time.perf_counter() - started) * 1000 / max(len(questions), 1)
        searched = {}
        found = self._look_up(vectors, k, searched)
        search_ms = searched["search_ms"]
        answers = []
        for q, vector, (passages, piece_vectors) in zip(questions, vectors, found):
            timings = {"encode_ms": encode_ms, "search_ms": search_ms}
            started = time.perf_counter()
            context = self._context_timed(q, vector, passages, piece_vectors, timings)
            answers.append(_drain(self._answer(q, passages, context, max_new_tokens, timings, started)))
        return answers


class StrippedText:
    """Streams a text stripped: what `add` returns, joined, is the text added so far without its white
    space at the start, and without the white space at its end, which is held until more text follows it
    (a piece such as ".\n" sends its "." at once and its newline only if the answer goes on)."""

    def __init__(self):
        self.started = False
        self.held = ""

    def add(self, chunk: str) -> str:
        text = self.held + chunk
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.held = text[len(body):]
        self.started = self.started or bool(body)
        return body


def _drain(stream: Iterator[str]) -> Answer:
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value
