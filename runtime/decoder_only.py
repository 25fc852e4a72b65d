"""Greedy decoding over a decoder-only graph (export/onnx_export.py, export/llama_graph.py):
onnxruntime and numpy only. One graph serves prefill and decode with a KV cache, reused across
prompts, appended to in place where the graph allows, and fed tokens drafted by prompt lookup."""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import onnxruntime as ort

from edgerag.runtime.generation import Generation, GreedyDecoder
from edgerag.runtime.manifest import LOGITS_TO_KEEP
from edgerag.runtime.prompt import check_prompt_lookup
from edgerag.runtime.session import ORT_DTYPES, run_bound


REUSE_MODES = ("template", "previous", "none")


def draft_by_lookup(context: np.ndarray, length: int, max_ngram: int, count: int) -> np.ndarray:
    """Prompt lookup decoding's draft: up to `count` tokens that followed the first earlier occurrence
    of the last n tokens of `context[:length]`, for the longest n up to `max_ngram` that occurs
    (Saxena 2023; transformers' prompt_lookup_num_tokens). Empty where none does."""
    tokens = context[:length]
    if count <= 0:
        return tokens[:0]
    for n in range(min(max_ngram, length - 1), 0, -1):
        # starts i < length - n whose n tokens match the tail, so at least one token follows them
        match = tokens[:length - n] == tokens[length - n]
        for shift in range(1, n):
            match &= tokens[shift:length - n + shift] == tokens[length - n + shift]
        found = np.flatnonzero(match)
        if len(found):
            start = found[0] + n
            return tokens[start:min(start + count, length)]
    return tokens[:0]

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
    PROMPT_LOOKUP = 4  # the default of tokens drafted per step (docs/bundle.md, "Decoding")

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

    @property
    def cached_prompt_ids(self) -> list[int]:
        """The prompt ids whose KV is cached for reuse (the template's opening, or the previous prompt)."""
        cached = self._cached
        return list(cached[0]) if cached else []

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

    def steps(self, result: Generation, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """The decoding loop (runtime.generation's step interface), over an IOBinding. In place, the KV
        cache is one buffer per layer that onnxruntime appends to, bound once; otherwise each step's
        `present` values stay in onnxruntime's buffers and are bound as the next step's `past`, with
        no copy through numpy."""
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
            token = result.choose(logits.numpy()[0, -1])
            self._record(result, step, start, prompt_ids, presents)
            result.decode_tokens += step > 0
            yield token
            cache = {i.name: p for i, p in zip(self.past_inputs, presents)}
            ids = np.array([[token]], dtype=np.int64)
            positions = np.array([[length]], dtype=np.int64)
            length += 1

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
            chosen = result.choose_checking(kept[0], ids[0, 1:len(kept[0])])  # at the prefill: no draft
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
                context[answer_at + made] = token
                made += 1
                yield token

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
