"""Bundle -> answers, with onnxruntime, numpy, hnswlib, tokenizers and the standard library.

    pipeline = Pipeline.load("bundle/")
    answer = pipeline.ask("Who won Super Bowl 50?")
    for piece in pipeline.stream("..."): print(piece, end="")
    answers = pipeline.ask_batch(["...", "..."])
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import hnswlib
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from edgerag.runtime.manifest import Manifest, read_manifest, verify
from edgerag.runtime.prompt import PromptError, PromptTemplate, build_prompt_ids

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def make_session(path: Path, threads: int | None, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    available = ort.get_available_providers()
    if provider not in available:
        raise ValueError(f"execution provider {provider!r} is not available; available: {', '.join(available)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=[provider])


class QueryEncoder:
    """Text -> L2-normalized embeddings; pooling and normalization are inside the graph."""

    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer, max_length: int):
        self.session = session
        self.tokenizer = tokenizer
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0)
        self.input_names = {i.name for i in session.get_inputs()}

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        feed = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return self.session.run(["embedding"], feed)[0]


class PassageStore:
    """Passage text on disk (sqlite), so the device never holds the whole corpus in memory."""

    def __init__(self, path: Path):
        # immutable=1: sqlite writes nothing (no journal, no lock files), so checksums stay valid
        self.db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self.extra: dict[int, tuple[str, str, str]] = {}  # passages added in memory, by index row

    def add(self, rows: Iterable[int], passages: list[tuple[str, str, str]]) -> None:
        self.extra.update({int(r): p for r, p in zip(rows, passages)})

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        """Every (id, title, text), in index row order: the bundle's, then any added."""
        yield from self.db.execute("SELECT id, title, text FROM passages ORDER BY row")
        for row in sorted(self.extra):
            yield self.extra[row]

    def has_ids(self, ids: list[str]) -> set[str]:
        marks = ",".join("?" * len(ids))
        found = {pid for (pid,) in self.db.execute(f"SELECT id FROM passages WHERE id IN ({marks})", ids)}
        wanted = set(ids)
        return found | {pid for pid, _, _ in self.extra.values() if pid in wanted}

    def get(self, rows: Iterable[int]) -> list[tuple[str, str, str]]:
        rows = [int(r) for r in rows]
        found = {r: self.extra[r] for r in rows if r in self.extra}
        stored = [r for r in rows if r not in found]
        if stored:
            marks = ",".join("?" * len(stored))
            for row, pid, title, text in self.db.execute(
                    f"SELECT row, id, title, text FROM passages WHERE row IN ({marks})", stored):
                found[row] = (pid, title, text)
        return [found[r] for r in rows]


class Generation:
    """One greedy generation: iterate it for the new token ids; its figures fill in as it runs."""

    def __init__(self, decode):
        self.tokens: list[int] = []
        self.prefill_ms = 0.0
        self.decode_ms = 0.0
        self.reused_prompt_tokens = 0
        self._steps = decode(self)  # the decoding loop, which records its figures on this object

    def __iter__(self) -> Iterator[int]:
        for token in self._steps:
            self.tokens.append(token)
            yield token


class DecoderOnlyGenerator:
    """Greedy decoding over one ONNX graph that serves prefill and decode with a KV cache.

    Inputs input_ids, attention_mask, past_key_values.N.key/value (and position_ids where the graph
    has them); outputs logits and present.N.key/value: the layout of both export builders.
    """

    # reuse a previous prompt's KV only when it saves at least this many positions
    MIN_REUSED_TOKENS = 8

    def __init__(self, session: ort.InferenceSession, stop_token_ids: list[int], reuse_prefix: bool = True):
        self.session = session
        self.stop = set(stop_token_ids)
        self.past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_outputs = [n.replace("past_key_values.", "present.") for n in (i.name for i in self.past_inputs)]
        self.input_names = {i.name for i in session.get_inputs()}
        self.reuse_prefix = reuse_prefix
        self._last_prompt: list[int] = []
        self._last_prompt_cache: list[ort.OrtValue] = []  # the prefill's present values, copied out only when reused

    def empty_cache(self) -> dict[str, np.ndarray]:
        # inputs are [batch, kv_heads, past_length, head_dim]; kv_heads and head_dim are fixed in the graph
        return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=ORT_DTYPES[i.type]) for i in self.past_inputs}

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        """Greedy decoding from `prompt_ids`, token by token as the result is iterated; the stop token is not yielded."""
        return Generation(lambda result: self._steps(result, prompt_ids, max_new_tokens))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        """The whole generation at once."""
        generation = self.generate(prompt_ids, max_new_tokens)
        for _ in generation:
            pass
        return generation

    def last_logits(self, prompt_ids: list[int]) -> np.ndarray:
        """The next-token logits after `prompt_ids`, from an empty cache (for parity checks)."""
        feed = {"input_ids": np.array([prompt_ids], dtype=np.int64),
                "attention_mask": np.ones((1, len(prompt_ids)), dtype=np.int64), **self.empty_cache()}
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(len(prompt_ids), dtype=np.int64)[None]
        return self.session.run(["logits"], feed)[0][0, -1]

    def _steps(self, result: Generation, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """The decoding loop. The KV cache stays in onnxruntime's own buffers (IOBinding): each step's
        `present` values are bound as the next step's `past` without a round trip through numpy."""
        binding = self.session.io_binding()
        reused = self._reusable_prefix(prompt_ids)
        if reused:
            # RAG prompts share the template's opening, and follow-up questions often share their
            # top passages: the KV of the previous prompt's common prefix is exact for this one
            past = {i.name: c.numpy()[:, :, :reused] for i, c in zip(self.past_inputs, self._last_prompt_cache)}
        else:
            past = self.empty_cache()
        cache = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in past.items()}
        ids = np.array([prompt_ids[reused:]], dtype=np.int64)
        length = len(prompt_ids)
        positions = np.arange(reused, length, dtype=np.int64)[None, :]
        result.reused_prompt_tokens = reused
        for step in range(max_new_tokens):
            start = time.perf_counter()
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", np.ones((1, length), dtype=np.int64))
            if "position_ids" in self.input_names:
                binding.bind_cpu_input("position_ids", positions)
            for name, value in cache.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits")
            for name in self.present_outputs:
                binding.bind_output(name)
            self.session.run_with_iobinding(binding)
            logits, *presents = binding.get_outputs()
            token = int(logits.numpy()[0, -1].argmax())
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            elapsed = (time.perf_counter() - start) * 1000
            if step == 0:
                result.prefill_ms = elapsed
                if self.reuse_prefix:
                    self._last_prompt = list(prompt_ids)
                    self._last_prompt_cache = presents
            else:
                result.decode_ms += elapsed
            if token in self.stop:
                return
            yield token
            cache = {i.name: p for i, p in zip(self.past_inputs, presents)}
            ids = np.array([[token]], dtype=np.int64)
            positions = np.array([[length]], dtype=np.int64)
            length += 1

    def _reusable_prefix(self, prompt_ids: list[int]) -> int:
        """Positions of `prompt_ids` whose KV the previous prompt already computed (0: none)."""
        if not self.reuse_prefix or not self._last_prompt:
            return 0
        limit = min(len(self._last_prompt), len(prompt_ids) - 1)  # at least one position is fed
        common = 0
        while common < limit and self._last_prompt[common] == prompt_ids[common]:
            common += 1
        return common if common >= self.MIN_REUSED_TOKENS else 0


GENERATORS = {"decoder-only": DecoderOnlyGenerator}


@dataclass
class Answer:
    question: str
    answer: str
    passages: list[dict]
    timings: dict
    prompt_tokens: int = 0
    new_tokens: int = 0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Pipeline:
    """A loaded bundle: query encoder, hnswlib index, passage store and generator."""

    path: Path
    manifest: Manifest
    encoder: QueryEncoder
    index: hnswlib.Index
    store: PassageStore
    generator: DecoderOnlyGenerator
    tokenizer: Tokenizer
    template: PromptTemplate
    size: int = field(default=0)

    @classmethod
    def load(cls, bundle: str | Path, threads: int | None = None, check: bool = True,
             reuse_prefix: bool = True) -> "Pipeline":
        """Load a bundle directory. Every file's checksum is verified first (`check=False` skips that).

        reuse_prefix: keep the last prompt's KV cache and start the next prompt from the part they share.
        """
        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        if check:
            verify(bundle, manifest)
        enc, gen, idx = manifest.query_encoder, manifest.generator, manifest.index
        encoder = QueryEncoder(make_session(bundle / enc.onnx, threads),
                               Tokenizer.from_file(str(bundle / enc.tokenizer)), enc.max_length)
        index = hnswlib.Index(space=idx.space, dim=idx.dim)
        index.load_index(str(bundle / idx.file), max_elements=idx.count)
        index.set_ef(idx.ef)
        # read_manifest has refused families without a generation loop here
        generator = GENERATORS[gen.family](make_session(bundle / gen.onnx, threads),
                                           manifest.prompt.stop_token_ids, reuse_prefix)
        return cls(bundle, manifest, encoder, index, PassageStore(bundle / manifest.passages.file),
                   generator, Tokenizer.from_file(str(bundle / gen.tokenizer)), manifest.prompt.template, idx.count)

    # retrieval ---------------------------------------------------------------------------
    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the k nearest passages for each embedding."""
        k = min(k, self.size)
        self.index.set_ef(max(self.manifest.index.ef, k))
        rows, distances = self.index.knn_query(embeddings, k=k)
        return rows, 1.0 - distances  # hnswlib's 'ip' distance is 1 - dot product

    def retrieve(self, question: str, k: int | None = None) -> list[dict]:
        rows, scores = self.search(self.encoder.encode([question]), k or self.manifest.generation.k)
        return self.passages_at(rows[0], scores[0])

    def passages_at(self, rows, scores=None) -> list[dict]:
        """The passages at index rows, as {"id", "title", "score", "text"}."""
        scores = [None] * len(rows) if scores is None else [float(s) for s in scores]
        return [{"id": pid, "title": title, "score": score, "text": text}
                for (pid, title, text), score in zip(self.store.get(rows), scores)]

    def passages(self) -> Iterator[tuple[str, str, str]]:
        """Every (id, title, text) the pipeline retrieves from, in index row order."""
        return iter(self.store)

    def add_passages(self, passages: list[tuple[str, str, str]], batch_size: int = 64) -> int:
        """Add (id, title, text) passages to the in-memory index, embedded with the bundle's query encoder.

        Passages whose id the bundle already holds are skipped, so a corpus that overlaps the
        bundle's own passages does not duplicate them. Returns how many were added.
        """
        self.index.resize_index(self.size + len(passages))
        fmt = self.manifest.index.passage_format
        added = 0
        for start in range(0, len(passages), batch_size):
            chunk = passages[start:start + batch_size]
            known = self.store.has_ids([pid for pid, _, _ in chunk])
            chunk = [p for p in chunk if p[0] not in known]
            if not chunk:
                continue
            vectors = self.encoder.encode([fmt.format(title=title, text=text) for _, title, text in chunk])
            rows = np.arange(self.size, self.size + len(chunk))
            self.index.add_items(vectors, rows)
            self.store.add(rows, chunk)
            self.size += len(chunk)
            added += len(chunk)
        return added

    # generation --------------------------------------------------------------------------
    def prompt_ids(self, question: str, passages: list[tuple[str, str]], max_new_tokens: int | None = None) -> list[int]:
        """The generator's prompt for a question and (title, text) passages in rank order, cut to fit
        the context with room for `max_new_tokens` (runtime.prompt's truncation rule)."""
        max_new_tokens = max_new_tokens or self.manifest.generation.max_new_tokens
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
        return build_prompt_ids(encode, self.template, question, passages,
                                self.manifest.generator.max_context - max_new_tokens)

    def _answer(self, question: str, passages: list[dict], max_new_tokens: int | None,
                timings: dict, started: float) -> Iterator[str]:
        max_new_tokens = max_new_tokens or self.manifest.generation.max_new_tokens
        prompt = self.prompt_ids(question, [(p["title"], p["text"]) for p in passages], max_new_tokens)
        decoder = DecodeStream(skip_special_tokens=True)
        generation = self.generator.generate(prompt, max_new_tokens)
        for token in generation:
            if len(generation.tokens) == 1:
                timings["ttft_ms"] = (time.perf_counter() - started) * 1000
            piece = decoder.step(self.tokenizer, token)
            if piece:
                yield piece
        timings.update(prefill_ms=generation.prefill_ms, decode_ms=generation.decode_ms,
                       reused_prompt_tokens=generation.reused_prompt_tokens,
                       total_ms=(time.perf_counter() - started) * 1000)
        tokens = generation.tokens
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        decode_s = generation.decode_ms / 1000
        return Answer(question, text, passages, timings, len(prompt), len(tokens),
                      (len(tokens) - 1) / decode_s if decode_s > 0 and len(tokens) > 1 else 0.0)

    def stream(self, question: str, k: int | None = None, max_new_tokens: int | None = None) -> Iterator[str]:
        """Yield answer text as it is produced; the generator's return value is the full Answer."""
        if not question or not question.strip():
            raise PromptError("the question is empty")
        started = time.perf_counter()
        timings = {}
        vector = self.encoder.encode([question])
        timings["encode_ms"] = (time.perf_counter() - started) * 1000
        t = time.perf_counter()
        rows, scores = self.search(vector, k or self.manifest.generation.k)
        timings["search_ms"] = (time.perf_counter() - t) * 1000
        passages = self.passages_at(rows[0], scores[0])
        return (yield from self._answer(question, passages, max_new_tokens, timings, started))

    def ask(self, question: str, k: int | None = None, max_new_tokens: int | None = None) -> Answer:
        return _drain(self.stream(question, k, max_new_tokens))

    def answer_with_passages(self, question: str, passages: list[tuple[str, str]],
                             max_new_tokens: int | None = None) -> Answer:
        """Answer from given (title, text) passages, skipping retrieval (e.g. the gold passage)."""
        if not question or not question.strip():
            raise PromptError("the question is empty")
        given = [{"id": None, "title": t, "score": None, "text": x} for t, x in passages]
        timings = {"encode_ms": 0.0, "search_ms": 0.0}
        return _drain(self._answer(question, given, max_new_tokens, timings, time.perf_counter()))

    def ask_batch(self, questions: list[str], k: int | None = None, max_new_tokens: int | None = None) -> list[Answer]:
        """Many questions: encoded and searched together, then answered one by one."""
        for q in questions:
            if not q or not q.strip():
                raise PromptError("a question in the batch is empty")
        started = time.perf_counter()
        vectors = self.encoder.encode(questions)
        encode_ms = (time.perf_counter() - started) * 1000 / max(len(questions), 1)
        t = time.perf_counter()
        rows, scores = self.search(vectors, k or self.manifest.generation.k)
        search_ms = (time.perf_counter() - t) * 1000 / max(len(questions), 1)
        answers = []
        for q, r, s in zip(questions, rows, scores):
            timings = {"encode_ms": encode_ms, "search_ms": search_ms}
            answers.append(_drain(self._answer(q, self.passages_at(r, s), max_new_tokens, timings, time.perf_counter())))
        return answers


def _drain(stream: Iterator[str]) -> Answer:
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value
