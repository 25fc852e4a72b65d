"""What both generation loops share (runtime.pipeline's decoder-only one and
runtime.encoder_decoder's): the Generation a call returns, the greedy calls around a loop, and one
step over an IOBinding."""

from __future__ import annotations

from typing import Iterator

import numpy as np

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def run_bound(session, binding, cpu_inputs: dict, ort_inputs: dict, outputs: list[str]) -> list:
    """One run of `session` over `binding`: numpy inputs copied in, OrtValue inputs (a KV cache from the
    previous step) bound as they are, outputs left in onnxruntime's buffers. Returns the outputs as
    OrtValues, in the order of `outputs`, with the binding cleared for the next step."""
    for name, value in cpu_inputs.items():
        binding.bind_cpu_input(name, value)
    for name, value in ort_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name)
    session.run_with_iobinding(binding)
    values = binding.get_outputs()
    binding.clear_binding_inputs()
    binding.clear_binding_outputs()
    return values


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


class Generation:
    """One greedy generation: iterate it for the new token ids; its figures fill in as it runs."""

    def __init__(self, decode):
        self.tokens: list[int] = []
        self.prefill_ms = 0.0
        # the time of each forward pass after the prefill, in order, the one that produced a stop
        # token included (the first ones after a prefill run slower)
        self.step_ms: list[float] = []
        # the tokens those passes handed out, a stop token included: more than the passes where the
        # model accepts tokens that prompt lookup drafted
        self.decode_tokens = 0
        self.reused_prompt_tokens = 0
        self.stop_reason = ""  # "stop" (a stop token) or "length" (max_new_tokens) once it has run to its end
        self._steps = decode(self)  # the decoding loop, which records its figures on this object

    @property
    def decode_ms(self) -> float:
        return sum(self.step_ms)

    @property
    def decode_steps(self) -> int:
        return len(self.step_ms)

    def __iter__(self) -> Iterator[int]:
        for token in self._steps:
            self.tokens.append(token)
            yield token


class GreedyDecoder:
    """generate() and greedy() around a family's loop, `_steps(result, prompt_ids, max_new_tokens)`,
    which yields token ids and records its figures on `result`; `past_inputs` are the graph's
    KV-cache inputs, [batch, heads, past_length, head_dim]."""

    past_inputs: list

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        """Greedy decoding from `prompt_ids`, token by token as the result is iterated; the stop token is not yielded."""
        return Generation(lambda result: self._steps(result, prompt_ids, max_new_tokens))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        """The whole generation at once."""
        generation = self.generate(prompt_ids, max_new_tokens)
        for _ in generation:
            pass
        return generation

    def empty_cache(self) -> dict[str, np.ndarray]:
        # heads and head_dim are fixed in the graph; the past is empty
        return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=ORT_DTYPES[i.type]) for i in self.past_inputs}
