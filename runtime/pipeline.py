"""Bundle -> answers, with onnxruntime, numpy, hnswlib, tokenizers and the standard library.

    pipeline = Pipeline.load("bundle/")
    answer = pipeline.ask("Who won Super Bowl 50?")
    for piece in pipeline.stream("..."): print(piece, end="")
    answers = pipeline.ask_batch(["...", "..."])
"""

from __future__ import annotations

import ctypes
import functools
import os
import sqlite3
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import hnswlib
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from edgerag.runtime.compress import Compression, PieceVectors, compress_context, split_pieces
from edgerag.runtime.encoder_decoder import EncoderDecoderGenerator
from edgerag.runtime.generation import ORT_DTYPES, Generation, GreedyDecoder, draft_by_lookup, run_bound
from edgerag.runtime.manifest import KV_IN_PLACE_GRAPHS, LOGITS_TO_KEEP, BundleError, Manifest, check_in_bundle, read_manifest, verify
from edgerag.runtime.prompt import PromptError, PromptTemplate, build_prompt_ids


def make_session(path: Path, threads: int | None, provider: str = "CPUExecutionProvider",
                 spinning: bool = True) -> ort.InferenceSession:
    """spinning: the session's threads keep spinning for a while after each run, ready for the next.
    Right for the generator (a run per token); wrong for a graph run once per question, whose
    spinning threads then compete with the generator's for the cores."""
    available = ort.get_available_providers()
    if provider not in available:
        raise ValueError(f"execution provider {provider!r} is not available; available: {', '.join(available)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # a memory pattern is planned per set of input shapes, and a prompt's shapes rarely come twice:
    # without it, prefill ran as fast and peaked 4 MB lower, decode 0.15 ms a token faster (measured)
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=[provider])


def return_freed_memory() -> None:
    """Give the C heap's freed pages back to the system. glibc keeps them otherwise: parsing the
    generator's tokenizer left 16 MB freed but resident, on top of which the generator then loaded."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: its allocator decides


MADV_RANDOM = 1  # Linux's mman.h


@functools.cache
def _libc_madvise():
    madvise_call = ctypes.CDLL(None, use_errno=True).madvise
    madvise_call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise_call


def madvise(start: int, end: int, advice: int) -> bool:
    """madvise(2) on [start, end) through the C library; False where it failed or there is none."""
    try:
        return _libc_madvise()(start, end - start, advice) == 0
    except (OSError, AttributeError, TypeError):
        return False


def read_weights_on_demand(paths: Iterable[Path]) -> None:
    """Keep resident only the pages of memory-mapped weights that answers read.

    onnxruntime maps a graph's weights file; the weights it prepacks are copied out at load and their
    pages let go, but the embedding tables stay mapped and are read a row per token. Linux kept far
    more of them than those rows: the checksum pass had left the whole file in the page cache (in
    large folios, which a mapping takes whole), and each fault reads and maps the pages around it.
    Dropping the file's cached pages and marking its mappings random-access took the compressed demo
    bundle's resident memory after 31 answers from 300 to 272 MB (README, "Memory and start-up"). The
    price: a row's first read comes from the disk (prefill about 2 ms slower over those answers here).
    Best effort: on another system the kernel decides."""
    paths = {str(Path(p).resolve()) for p in paths}
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)  # mapped pages stay
            finally:
                os.close(descriptor)
        except AttributeError:  # no posix_fadvise on this system
            break
        except OSError:
            continue
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    madvise(start, end, MADV_RANDOM)
    except OSError:
        pass


MADV_COLLAPSE = 25  # Linux 6.1+
HUGE_PAGE = 2 << 20
FULLY_RESIDENT = 0.9  # the share of a mapping resident for collapse_when_idle to take it


def anonymous_regions(resident: bool = False) -> dict[tuple[int, int], int]:
    """{(start, end): resident bytes} of this process's writable anonymous mappings (Linux). The
    resident bytes come from /proc/self/smaps, which takes tens of milliseconds to read; without
    `resident`, the mappings alone come from /proc/self/maps (under a millisecond) and count 0."""
    regions, current = {}, None
    try:
        with open("/proc/self/smaps" if resident else "/proc/self/maps") as lines:
            for line in lines:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:
                    anonymous = (len(fields) == 5 or fields[5].strip() == "[heap]") and fields[1].startswith("rw")
                    current = tuple(int(x, 16) for x in fields[0].split("-")) if anonymous else None
                    if current:
                        regions[current] = 0
                elif current and line.startswith("Rss:"):
                    regions[current] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return regions


def huge_page_blocks(low: int, high: int) -> range:
    """The starts of the whole 2 MB pages inside [low, high)."""
    return range(-(-low // HUGE_PAGE) * HUGE_PAGE, high // HUGE_PAGE * HUGE_PAGE, HUGE_PAGE)


class AnswersInFlight:
    """Counts the answers being generated: `idle` is set while there are none, `answered` once one
    has ended. Entered around each generation."""

    def __init__(self):
        self._count = 0
        self._lock = threading.Lock()
        self.idle = threading.Event()
        self.idle.set()
        self.answered = threading.Event()

    def __enter__(self):
        with self._lock:
            self._count += 1
            self.idle.clear()

    def __exit__(self, *exc):
        with self._lock:
            self._count -= 1
            if self._count == 0:
                self.idle.set()
        self.answered.set()


def huge_pages_allowed() -> bool:
    """Whether this system lets processes use transparent huge pages (Linux; "never" says no)."""
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def collapse_when_idle(before: Iterable[tuple[int, int]], answers: AnswersInFlight, first_wait_s: float) -> None:
    """collapse_into_huge_pages on the anonymous mappings made since `before` (the load's), 2 MB at a
    time, only while no answer is being generated: collapsing holds the process's memory map for
    each page it copies, which stalls an answer's page faults (beside the first answer it took
    0.15 -> 0.45 s). Waits for the first answer to end, or `first_wait_s` without one, and runs at
    the lowest nice level."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only, on Linux
        except (AttributeError, OSError):
            pass
    answers.answered.wait(first_wait_s)
    before = set(before)
    for (low, high), resident in anonymous_regions(resident=True).items():
        if (low, high) in before or resident < FULLY_RESIDENT * (high - low):
            continue
        for block in huge_page_blocks(low, high):
            answers.idle.wait()
            collapse_into_huge_pages([(block, block + HUGE_PAGE)])


def collapse_into_huge_pages(regions: Iterable[tuple[int, int]]) -> int:
    """Back the given anonymous mappings with 2 MB pages; returns the bytes collapsed.

    Decoding streams every weight once per token, and onnxruntime's prepacked weights (most of a
    loaded pipeline) sit in anonymous memory. On 4 KB pages that is a TLB miss every 4 KB; the
    kernel gives huge pages at allocation time only when one is free, which on a machine that has
    run a while it often is not. Collapsing copies the pages into huge ones: 0.3 s for the demo
    bundle's 140 MB, so Pipeline.load has it done in a background thread between answers
    (collapse_when_idle). Decode went from about 7.4 to 6.4 ms/token (README, "Memory and
    start-up"). It is given only mappings at least FULLY_RESIDENT resident (onnxruntime's prepacked
    weights are; the kernel fills the rest of each 2 MB it collapses): resident memory measured the
    same with and without it.
    Best effort: without MADV_COLLAPSE (Linux before 6.1) nothing changes."""
    collapsed = 0
    for low, high in regions:
        blocks = huge_page_blocks(low, high)
        if blocks and madvise(blocks[0], blocks[-1] + HUGE_PAGE, MADV_COLLAPSE):
            collapsed += len(blocks) * HUGE_PAGE
    return collapsed


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

    def count(self) -> int:
        """Passages in the bundle's store (added ones aside)."""
        return self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

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


REUSE_MODES = ("template", "previous", "none")


class DecoderOnlyGenerator(GreedyDecoder):
    """Greedy decoding over one ONNX graph that serves prefill and decode with a KV cache.

    Inputs input_ids, attention_mask, past_key_values.N.key/value (and position_ids where the graph
    has them); outputs logits and present.N.key/value: the layout of both export builders.

    reuse_prefix: where a prompt starts from a KV cache computed before.
      "template"  the prompt template's opening, computed once (`prefix_ids`) and never changed:
                  every answer depends on its own prompt only, whatever ran before or beside it.
      "previous"  the part of the previous prompt that this one shares (follow-up questions on the
                  same passages reuse those too). With dynamic int8 activations (int8sq) the answer
                  then depends on the previous question within the quantization error.
      "none"      every prompt from scratch. True and False stand for "template" and "none".

    kv_in_place: the graph's attention (GroupQueryAttention, the fused Llama graph) can append to
    its KV cache in place. Each layer's past and present are then one buffer, sized for the whole
    generation and bound once: a step neither copies the cache nor allocates or rebinds it.
    Generation keeps no other state on the object, so threads may share a generator.

    prompt_lookup: tokens drafted per step by prompt lookup decoding, in place and where the graph
    takes `logits_to_keep` (0: one token per step). An extractive answer copies its tokens from the
    passages: a step feeds the tokens that followed the latest n-gram's earlier occurrence after the
    new token, and keeps those the model would have chosen itself, plus its own next one. One read
    of the weights then yields several tokens. Greedy output is unchanged in exact arithmetic; with
    dynamic int8 activations (int8sq) a row's quantization scale is shared with the rows fed beside
    it, so answers move within the quantization error.
    """

    # reuse a previous prompt's KV only when it saves at least this many positions
    MIN_REUSED_TOKENS = 8
    # the longest n-gram prompt lookup matches (it falls back to shorter ones)
    LOOKUP_NGRAM = 3
    PROMPT_LOOKUP = 4  # the default of tokens drafted per step (README, "Prompt lookup")

    def __init__(self, session: ort.InferenceSession, stop_token_ids: list[int], reuse_prefix="template",
                 prefix_ids: list[int] = (), kv_in_place: bool = False, max_positions: int | None = None,
                 prompt_lookup: int | None = None):
        mode = {True: "template", False: "none"}.get(reuse_prefix, reuse_prefix)
        if mode not in REUSE_MODES:
            raise ValueError(f"reuse_prefix must be one of {', '.join(REUSE_MODES)}, not {reuse_prefix!r}")
        self.session = session
        self.stop = set(stop_token_ids)
        self.past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_outputs = [n.replace("past_key_values.", "present.") for n in (i.name for i in self.past_inputs)]
        self.input_names = {i.name for i in session.get_inputs()}
        self.reuse_prefix = mode
        self.kv_in_place = kv_in_place
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self.vocab_size, self.logits_dtype = logits.shape[-1], ORT_DTYPES.get(logits.type, np.float32)
        self.max_positions = max_positions  # prompt + new tokens the graph allows (None: not checked here)
        keeps_positions = LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
        if kv_in_place and ((logits.shape[1] != 1 and not keeps_positions) or not isinstance(self.vocab_size, int)
                            or "position_ids" in self.input_names):
            raise ValueError("kv_in_place needs a graph that computes the last position's logits, over a fixed "
                             "vocabulary, and finds positions from the attention mask")
        self.prompt_lookup = self.PROMPT_LOOKUP if check_prompt_lookup(prompt_lookup) is None else prompt_lookup
        if not (kv_in_place and keeps_positions):
            self.prompt_lookup = 0  # a draft's rejected tokens are undone in place, and checked with their logits
        # (prompt ids, their KV as one array or OrtValue per past input), replaced as a whole so that a
        # reader in another thread always gets a matching pair
        self._cached: tuple[list[int], list] | None = None
        if mode == "template" and len(prefix_ids) >= self.MIN_REUSED_TOKENS:
            self._cached = (list(prefix_ids), self._prefill(list(prefix_ids)))

    def last_logits(self, prompt_ids: list[int]) -> np.ndarray:
        """The next-token logits after `prompt_ids`, from an empty cache (for parity checks)."""
        return self.session.run(["logits"], self._fresh_feed(prompt_ids))[0][0, -1]

    def _prefill(self, prompt_ids: list[int]) -> list[np.ndarray]:
        """The KV of `prompt_ids`, from an empty cache."""
        return self.session.run(self.present_outputs, self._fresh_feed(prompt_ids))

    def _fresh_feed(self, prompt_ids: list[int]) -> dict:
        feed = {"input_ids": np.array([prompt_ids], dtype=np.int64),
                "attention_mask": np.ones((1, len(prompt_ids)), dtype=np.int64), **self.empty_cache()}
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(len(prompt_ids), dtype=np.int64)[None]
        return feed

    def _steps(self, result: Generation, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """The decoding loop, over an IOBinding. In place, the KV cache is one buffer per layer that
        onnxruntime appends to, bound once; otherwise each step's `present` values stay in
        onnxruntime's buffers and are bound as the next step's `past`, with no copy through numpy."""
        if self.max_positions is not None and len(prompt_ids) + max_new_tokens > self.max_positions:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new tokens exceed the generator's "
                             f"{self.max_positions} positions")
        binding = self.session.io_binding()
        reused, kv = self._reusable_prefix(prompt_ids)
        if reused:
            # RAG prompts share the template's opening, and follow-up questions often share their
            # top passages: the KV of a common prefix, computed before, is exact for this prompt
            past = {i.name: (c.numpy() if isinstance(c, ort.OrtValue) else c)[:, :, :reused]
                    for i, c in zip(self.past_inputs, kv)}
        else:
            past = self.empty_cache()
        length = len(prompt_ids)
        result.reused_prompt_tokens = reused
        if self.kv_in_place:
            yield from self._steps_in_place(result, binding, past, prompt_ids, reused, max_new_tokens)
            return
        cache = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in past.items()}
        ids = np.array([prompt_ids[reused:]], dtype=np.int64)
        positions = np.arange(reused, length, dtype=np.int64)[None, :]
        for step in range(max_new_tokens):
            start = time.perf_counter()
            inputs = {"input_ids": ids, "attention_mask": np.ones((1, length), dtype=np.int64)}
            if "position_ids" in self.input_names:
                inputs["position_ids"] = positions
            logits, *presents = run_bound(self.session, binding, inputs, cache, ["logits", *self.present_outputs])
            token = int(logits.numpy()[0, -1].argmax())
            self._record(result, step, start, prompt_ids, presents)
            result.decode_tokens += step > 0
            if token in self.stop:
                result.stop_reason = "stop"
                return
            yield token
            cache = {i.name: p for i, p in zip(self.past_inputs, presents)}
            ids = np.array([[token]], dtype=np.int64)
            positions = np.array([[length]], dtype=np.int64)
            length += 1
        result.stop_reason = "length"

    def _steps_in_place(self, result: Generation, binding, past: dict, prompt_ids: list[int], reused: int,
                        max_new_tokens: int) -> Iterator[int]:
        """The loop with the KV cache in place: every input is bound once, at the generation's full
        length, and a step writes the new token into its bound arrays. The attention mask has a slot
        per position of the cache, zero until a token fills it: the attention reads each sequence's
        length from the mask's sum, and with shapes that never change onnxruntime does no per-step
        shape work (0.2-0.4 ms a token, measured). A step that checks a draft feeds more positions;
        those the model rejects are undone by clearing their mask slots, and later steps overwrite
        their KV."""
        length, capacity = len(prompt_ids), len(prompt_ids) + max_new_tokens
        logits, kv_buffers = self._bind_in_place(binding, past, reused, capacity)
        mask = np.zeros((1, capacity), dtype=np.int64)
        mask[0, :length] = 1
        answer_at = len(prompt_ids)
        context = np.zeros(capacity, dtype=np.int64)  # the prompt and the answer so far: where drafts come from
        context[:answer_at] = prompt_ids
        prompt = np.array([prompt_ids[reused:]], dtype=np.int64)
        keep = np.ones(1, dtype=np.int64)
        # the arrays must outlive the binding's OrtValues, which share their memory: all are locals here
        binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(mask))
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(prompt))
        if self.prompt_lookup:
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(keep))
        # a step's fed ids and kept logits, and their OrtValues, by the positions it feeds
        by_count = {}
        ids, kept, made = prompt, logits, 0
        for step in range(max_new_tokens):
            if made == max_new_tokens:
                break
            start = time.perf_counter()
            if step:
                # the step yields its accepted drafts and one token more: no more than are still allowed
                draft = draft_by_lookup(context, answer_at + made, self.LOOKUP_NGRAM,
                                        min(self.prompt_lookup, max_new_tokens - made - 1))
                count = 1 + len(draft)
                if count not in by_count:
                    arrays = (np.zeros((1, count), dtype=np.int64),
                              logits if count == 1 else np.zeros((1, count, self.vocab_size), dtype=self.logits_dtype))
                    by_count[count] = (*arrays, *map(ort.OrtValue.ortvalue_from_numpy, arrays))
                if ids is not by_count[count][0]:
                    ids, kept, ids_value, kept_value = by_count[count]
                    binding.bind_ortvalue_input("input_ids", ids_value)
                    binding.bind_ortvalue_output("logits", kept_value)
                    keep[0] = count
                ids[0, 0] = context[answer_at + made - 1]
                ids[0, 1:] = draft
                mask[0, length:length + count] = 1
                length += count
            self.session.run_with_iobinding(binding)  # writes the logits and appends to kv_buffers
            chosen = kept[0].argmax(-1)
            accepted = 0  # the leading drafts that the model chose itself
            while accepted < len(chosen) - 1 and chosen[accepted] == ids[0, accepted + 1]:
                accepted += 1
            rejected = len(chosen) - 1 - accepted
            mask[0, length - rejected:length] = 0  # their KV is overwritten by the next step
            length -= rejected
            self._record(result, step, start, prompt_ids, kv_buffers)
            for token in map(int, chosen[:accepted + 1]):
                # counted as handed out: a caller that stops early (a repetition cut, a deadline) has
                # not taken the rest of a step's tokens
                result.decode_tokens += step > 0
                if token in self.stop:
                    result.stop_reason = "stop"
                    return
                context[answer_at + made] = token
                made += 1
                yield token
        result.stop_reason = "length"

    def _record(self, result: Generation, step: int, start: float, prompt_ids: list[int], presents: list) -> None:
        """Books a step's time on `result`, and after the prefill keeps the prompt's KV for reuse."""
        elapsed = (time.perf_counter() - start) * 1000
        if step == 0:
            result.prefill_ms = elapsed
            if self.reuse_prefix == "previous":
                self._cached = (list(prompt_ids), presents)  # copied out only when reused
        else:
            result.step_ms.append(elapsed)

    def _bind_in_place(self, binding, past: dict, reused: int, capacity: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Binds each layer's past and present to one buffer of `capacity` positions, which starts with
        `past`, and the logits to one array. Returns (logits, buffers): numpy arrays that share their
        memory with the bound values, so they read each run's results without a copy. The attention
        finds each sequence's length from the attention mask; positions beyond it are never read."""
        buffers = []
        for i, present in zip(self.past_inputs, self.present_outputs):
            start = past[i.name]
            buffer = np.zeros((*start.shape[:2], capacity, start.shape[3]), dtype=start.dtype)
            buffer[:, :, :reused] = start
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(i.name, value)
            binding.bind_ortvalue_output(present, value)
            buffers.append(buffer)
        logits = np.zeros((1, 1, self.vocab_size), dtype=self.logits_dtype)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        return logits, buffers

    def _reusable_prefix(self, prompt_ids: list[int]) -> tuple[int, list | None]:
        """(positions of `prompt_ids` whose KV is cached, that KV); (0, None) where none is."""
        cached = self._cached  # one read: another thread may replace it meanwhile
        if cached is None:
            return 0, None
        ids, kv = cached
        limit = min(len(ids), len(prompt_ids) - 1)  # at least one position is fed
        common = 0
        while common < limit and ids[common] == prompt_ids[common]:
            common += 1
        return (common, kv) if common >= self.MIN_REUSED_TOKENS else (0, None)


def _decoder_only(bundle: Path, manifest: Manifest, threads, reuse_prefix, prefix_ids,
                  prompt_lookup) -> DecoderOnlyGenerator:
    return DecoderOnlyGenerator(make_session(bundle / manifest.generator.onnx, threads),
                                manifest.prompt.stop_token_ids, reuse_prefix, prefix_ids,
                                kv_in_place=manifest.generator.graph in KV_IN_PLACE_GRAPHS,
                                max_positions=manifest.generator.max_context, prompt_lookup=prompt_lookup)


def _encoder_decoder(bundle: Path, manifest: Manifest, threads, reuse_prefix, prefix_ids,
                     prompt_lookup) -> EncoderDecoderGenerator:
    # reuse_prefix has nothing to reuse here: the encoder reads the whole prompt at once, and the
    # decoder's cache starts empty for every answer; its decoder graph drafts nothing (prompt_lookup)
    gen = manifest.generator
    return EncoderDecoderGenerator(make_session(bundle / gen.onnx, threads), make_session(bundle / gen.decoder_onnx, threads),
                                   manifest.prompt.stop_token_ids, gen.decoder_start_token_id, gen.forced_bos_token_id)


# family -> (bundle, manifest, threads, reuse_prefix, prefix ids, prompt_lookup) -> its generator
GENERATORS = {"decoder-only": _decoder_only, "encoder-decoder": _encoder_decoder}


def _periodic_run(tokens: list[int], period: int) -> int:
    """Length of the longest tail of `tokens` in which every token equals the one `period` before it
    (counting that first block)."""
    i = len(tokens) - period - 1
    while i >= 0 and tokens[i] == tokens[i + period]:
        i -= 1
    return len(tokens) - 1 - i


def repetition_cut(tokens: list[int], window: int) -> int | None:
    """Where to cut an answer whose last `window` tokens repeat one block (at least three times over):
    after the first occurrence of the block in that run. None where they do not, or window is 0.

    A small model decoding greedily can loop ("Angularananan..." up to the token limit); the run of
    repeats is cut, its first block kept.
    """
    if window <= 0 or len(tokens) < window:
        return None
    for period in range(1, window // 3 + 1):
        run = _periodic_run(tokens, period)
        if run >= window:
            return len(tokens) - run + period
    return None


def periodic_tail(tokens: list[int], max_period: int) -> int:
    """Length of the longest tail of `tokens` that repeats one block of at most `max_period` tokens at
    least twice: what a stream holds back while a loop may be starting (0 where none does)."""
    runs = [_periodic_run(tokens, period) for period in range(1, max_period + 1)]
    return max([run for period, run in enumerate(runs, start=1) if run >= 2 * period], default=0)


def check_count(name: str, value) -> int | None:
    """None (the bundle's default) or a positive int, else a PromptError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PromptError(f"{name} must be a positive integer, not {value!r}")
    return value


def check_prompt_lookup(value) -> int | None:
    """None (the default) or a count of tokens, 0 or more, else a ValueError."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"prompt_lookup must be a whole number of tokens, 0 or more, not {value!r}")
    return value


def check_question(question) -> str:
    """The question, or a PromptError saying why it cannot be asked."""
    if not isinstance(question, str):
        raise PromptError(f"the question must be text, not {type(question).__name__}")
    if not question.strip():
        raise PromptError("the question is empty")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError("the question is not valid Unicode (it holds a lone surrogate)") from None
    return question


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
    # "deadline" (the caller's deadline passed), "cancelled" (the caller's cancel event was set)
    stop_reason: str = ""
    # what the generator read: the passages' selected pieces where the bundle compresses its context,
    # else the passages themselves ({"title", "text"}, in rank order)
    context: list[dict] = field(default_factory=list)

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

    @classmethod
    def load(cls, bundle: str | Path, threads: int | None = None, check: bool = True,
             reuse_prefix: str | bool = "template", retrieval_only: bool = False,
             prompt_lookup: int | None = None) -> "Pipeline":
        """Load a bundle directory. Every file's checksum is verified (`check=False` skips that): the weight
        files' beside the loading, every other file's before it is parsed.

        retrieval_only: load no generator (retrieve and passages work; ask and stream do not).

        reuse_prefix: "template" (the default) starts every prompt from the KV of the template's
        opening, computed once here; "previous" from the part it shares with the previous prompt;
        "none" from scratch (see DecoderOnlyGenerator).

        prompt_lookup: tokens drafted per decode step from the prompt, where the generator graph
        takes them (None: DecoderOnlyGenerator.PROMPT_LOOKUP; 0: one token per step).

        Threads may share a Pipeline: ask, stream, ask_batch and retrieve keep no state between
        calls (with "previous", an answer depends on the previous prompt within the quantization
        error of int8sq), retrieval is serialized and generation runs concurrently.
        """
        check_prompt_lookup(prompt_lookup)
        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        for name in manifest.named_files().values():  # unverified bundles too: a clear error, not a library's
            check_in_bundle(bundle, name)
        weights = {n for n in (manifest.query_encoder.weights, manifest.generator.weights) if n}
        before = anonymous_regions()
        if not check:
            pipeline = cls._open(bundle, manifest, threads, reuse_prefix, retrieval_only, prompt_lookup)
            return cls._opened(pipeline, retrieval_only, [bundle / name for name in weights], before)
        # The graphs' weight files (most of a bundle's bytes) are hashed in a thread while onnxruntime
        # builds the sessions: both release the GIL, so the two overlap on two cores. Every other file
        # is checked before it is parsed (hnswlib trusts its input); the weights' sizes are checked
        # first too, so a damaged weight file can only hold wrong values until its hash says so. No
        # pipeline is returned before every file has passed.
        verify(bundle, manifest, set(manifest.files) - weights)
        verify(bundle, manifest, weights, sizes_only=True)
        with ThreadPoolExecutor(max_workers=1) as pool:
            weights_checked = pool.submit(verify, bundle, manifest, weights)
            try:
                pipeline = cls._open(bundle, manifest, threads, reuse_prefix, retrieval_only, prompt_lookup)
            except Exception:
                weights_checked.result()  # damaged weights are reported as damaged, not as the library's error
                raise
            weights_checked.result()
        return cls._opened(pipeline, retrieval_only, [bundle / name for name in weights], before)

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

    @classmethod
    def _open(cls, bundle: Path, manifest: Manifest, threads: int | None, reuse_prefix: str | bool,
              retrieval_only: bool, prompt_lookup: int | None = None) -> "Pipeline":
        enc, gen, idx = manifest.query_encoder, manifest.generator, manifest.index
        with _reading(bundle, enc.onnx, enc.tokenizer, *filter(None, [enc.weights])):
            # the encoder runs once per question: spinning threads would then slow the generator's
            # prefill (the compressed demo bundle's p50 162 -> 105 ms on 2 cores; README, "Memory and start-up")
            encoder = QueryEncoder(make_session(bundle / enc.onnx, threads, spinning=False),
                                   Tokenizer.from_file(str(bundle / enc.tokenizer)), enc.max_length)
        with _reading(bundle, idx.file):
            index = hnswlib.Index(space=idx.space, dim=idx.dim)
            index.load_index(str(bundle / idx.file), max_elements=idx.count)
        if index.get_current_count() != idx.count:
            raise BundleError(f"{idx.file} in bundle {bundle} holds {index.get_current_count()} vectors, "
                              f"the manifest says {idx.count}")
        index.set_ef(idx.ef)
        with _reading(bundle, manifest.passages.file):
            store = PassageStore(bundle / manifest.passages.file)
            stored = store.count()
        if stored != manifest.passages.count or manifest.passages.count != idx.count:
            raise BundleError(f"{manifest.passages.file} in bundle {bundle} holds {stored} passages for "
                              f"{idx.count} index vectors, the manifest says {manifest.passages.count}")
        compression = pieces = None
        if manifest.compression is not None:
            with _reading(bundle, manifest.compression.file):
                compression = manifest.compression.settings()
                pieces = PieceVectors.load(bundle / manifest.compression.file, idx.count, manifest.compression.pieces, idx.dim)
        template = manifest.prompt.template
        with _reading(bundle, gen.tokenizer):
            tokenizer = Tokenizer.from_file(str(bundle / gen.tokenizer))
        return_freed_memory()
        generator = None
        if not retrieval_only:
            with _reading(bundle, gen.onnx, *filter(None, [gen.decoder_onnx, gen.weights])):
                # read_manifest has refused families without a generation loop here
                generator = GENERATORS[gen.family](bundle, manifest, threads, reuse_prefix,
                                                   tokenizer.encode(template.prefix, add_special_tokens=False).ids,
                                                   prompt_lookup)
            return_freed_memory()
        return cls(bundle, manifest, encoder, index, store, generator, tokenizer, template, idx.count, compression, pieces)

    # retrieval ---------------------------------------------------------------------------
    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the k nearest passages for each embedding."""
        with self._retrieval_lock:
            k = min(k, self.size)
            self.index.set_ef(max(self.manifest.index.ef, k))
            rows, distances = self.index.knn_query(embeddings, k=k)
        return rows, 1.0 - distances  # hnswlib's 'ip' distance is 1 - dot product

    def retrieve(self, question: str, k: int | None = None) -> list[dict]:
        check_question(question)
        rows, scores = self.search(self.encoder.encode([question]), self._k(k))
        return self.passages_at(rows[0], scores[0])

    def passages_at(self, rows, scores=None) -> list[dict]:
        """The passages at index rows, as {"id", "title", "score", "text"}."""
        scores = [None] * len(rows) if scores is None else [float(s) for s in scores]
        with self._retrieval_lock:
            found = self.store.get(rows)
        return [{"id": pid, "title": title, "score": score, "text": text}
                for (pid, title, text), score in zip(found, scores)]

    def passages(self) -> list[tuple[str, str, str]]:
        """Every (id, title, text) the pipeline retrieves from, in index row order."""
        with self._retrieval_lock:
            return list(self.store)

    def add_passages(self, passages: list[tuple[str, str, str]], batch_size: int = 64) -> int:
        """Add (id, title, text) passages to the in-memory index, embedded with the bundle's query encoder.

        Passages whose id the bundle already holds are skipped, so a corpus that overlaps the
        bundle's own passages does not duplicate them. Returns how many were added.
        """
        fmt = self.manifest.index.passage_format
        added = 0
        for start in range(0, len(passages), batch_size):
            chunk = list({p[0]: p for p in passages[start:start + batch_size]}.values())  # each id once
            vectors = self.encoder.encode([fmt.format(title=title, text=text) for _, title, text in chunk])
            with self._retrieval_lock:  # the check and the add as one step: concurrent adds cannot duplicate
                known = self.store.has_ids([pid for pid, _, _ in chunk])
                keep = [i for i, p in enumerate(chunk) if p[0] not in known]
                if not keep:
                    continue
                rows = np.arange(self.size, self.size + len(keep))
                self.index.resize_index(self.size + len(keep))
                self.index.add_items(vectors[keep], rows)
                self.store.add(rows, [chunk[i] for i in keep])
                if self.compression is not None:
                    self._added_pieces.update(zip(rows.tolist(), self._embed_pieces([chunk[i][1:] for i in keep])))
                self.size += len(keep)
            added += len(keep)
        return added

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
        return compress_context(self.compression, question, query_vector, passages, piece_vectors, self._encode)

    def _piece_vectors(self, rows) -> list[np.ndarray]:
        return [self._added_pieces[int(r)] if int(r) in self._added_pieces else self.pieces.of(int(r)) for r in rows]

    def _embed_pieces(self, passages: list[tuple[str, str]]) -> list[np.ndarray]:
        """Piece vectors of passages the bundle does not store, embedded with its query encoder (as
        add_passages embeds whole passages)."""
        fmt, out = self.manifest.index.passage_format, []
        for title, text in passages:
            pieces = split_pieces(text, self.compression.max_piece_words)
            out.append(self.encoder.encode([fmt.format(title=title, text=p) for p in pieces]) if pieces
                       else np.zeros((0, self.manifest.query_encoder.dim), np.float32))
        return out

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # generation --------------------------------------------------------------------------
    def prompt_ids(self, question: str, passages: list[tuple[str, str]], max_new_tokens: int | None = None) -> list[int]:
        """The generator's prompt for a question and (title, text) passages in rank order, cut to fit
        the context with room for `max_new_tokens` (runtime.prompt's truncation rule)."""
        if check_count("max_new_tokens", max_new_tokens) is None:
            max_new_tokens = self.manifest.generation.max_new_tokens
        return build_prompt_ids(self._encode, self.template, question, passages, self.prompt_budget(max_new_tokens))

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
        prompt = self.prompt_ids(question, context, max_new_tokens)
        decoder = DecodeStream(skip_special_tokens=True)
        generation = self.generator.generate(prompt, max_new_tokens)
        window = self.manifest.generation.repetition_window
        # A piece is held back while its token is part of a repeating tail, so that a loop which is
        # then cut is never streamed: streamed text and the answer's text stay the same.
        with self.answers_in_flight:  # the background huge-page work waits while an answer is generated
            pieces, sent, stop_reason = [], 0, ""
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
                if ready > sent:
                    yield "".join(pieces[sent:ready])
                    sent = ready
            tokens = generation.tokens[:cut] if stop_reason == "repetition" else generation.tokens
            if len(tokens) > sent:
                yield "".join(pieces[sent:len(tokens)])
        timings.update(prefill_ms=generation.prefill_ms, decode_ms=generation.decode_ms,
                       decode_steps=generation.decode_steps, decode_tokens=generation.decode_tokens,
                       reused_prompt_tokens=generation.reused_prompt_tokens,
                       total_ms=(time.perf_counter() - started) * 1000)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        decode_s = generation.decode_ms / 1000
        return Answer(question, text, passages, timings, len(prompt), len(tokens),
                      generation.decode_tokens / decode_s if decode_s > 0 else 0.0, stop_reason or generation.stop_reason,
                      [{"title": title, "text": text} for title, text in context])

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
        t = time.perf_counter()
        rows, scores = self.search(vector, k)
        timings["search_ms"] = (time.perf_counter() - t) * 1000
        passages = self.passages_at(rows[0], scores[0])
        context = self._context_timed(question, vector[0], passages, rows[0], timings)
        return (yield from self._answer(question, passages, context, max_new_tokens, timings, started, deadline, cancel))

    def _context_timed(self, question: str, vector, passages: list[dict], rows, timings: dict) -> list[tuple[str, str]]:
        t = time.perf_counter()
        pairs = [(p["title"], p["text"]) for p in passages]
        with self._retrieval_lock:  # added passages' piece vectors change with add_passages
            vectors = self._piece_vectors(rows) if self.compression is not None else None
        context = self.context(question, vector, pairs, vectors)
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
        t = time.perf_counter()
        rows, scores = self.search(vectors, k)
        search_ms = (time.perf_counter() - t) * 1000 / max(len(questions), 1)
        answers = []
        for q, vector, r, s in zip(questions, vectors, rows, scores):
            timings = {"encode_ms": encode_ms, "search_ms": search_ms}
            started = time.perf_counter()
            passages = self.passages_at(r, s)
            context = self._context_timed(q, vector, passages, r, timings)
            answers.append(_drain(self._answer(q, passages, context, max_new_tokens, timings, started)))
        return answers


class _reading:
    """Turns a library's error while a bundle file loads into a BundleError naming the file."""

    def __init__(self, bundle: Path, *names: str):
        self.bundle, self.names = bundle, names

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None and not isinstance(error, BundleError) and isinstance(error, Exception):
            raise BundleError(f"{' or '.join(self.names)} in bundle {self.bundle} does not load: "
                              f"{type(error).__name__}: {error}") from None
        return False


def _drain(stream: Iterator[str]) -> Answer:
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value
