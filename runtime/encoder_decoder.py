"""Greedy decoding over an encoder-decoder pair (export/bart_graph.py): onnxruntime and numpy only.

The encoder runs once per prompt and emits every decoder layer's cross-attention K/V; the decoder
graph serves the first step (empty past) and the cached ones. Both caches stay in onnxruntime's
buffers: each step binds the previous step's `present` OrtValues as its `past`.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import onnxruntime as ort

from edgerag.runtime.generation import Generation, GreedyDecoder
from edgerag.runtime.session import run_bound


class EncoderDecoderGenerator(GreedyDecoder):
    """Greedy decoding, as Hugging Face's generate(do_sample=False, num_beams=1) does it.

    The decoder starts from [decoder_start_token_id] and, where the model has one (bart-large
    checkpoints do), forced_bos_token_id: HF's generate forces that as the first generated token,
    so it is fed here with the start token and is neither yielded nor counted in max_new_tokens.
    Generation keeps no state on the object, so threads may share a generator.
    """

    def __init__(self, encoder_session: ort.InferenceSession, decoder_session: ort.InferenceSession,
                 stop_token_ids: list[int], decoder_start_token_id: int, forced_bos_token_id: int | None = None):
        self.encoder = encoder_session
        self.decoder = decoder_session
        self.stop = set(stop_token_ids)
        self.start_ids = [decoder_start_token_id] + ([forced_bos_token_id] if forced_bos_token_id is not None else [])
        self.cross_outputs = [o.name for o in encoder_session.get_outputs()]
        self.past_inputs = [i for i in decoder_session.get_inputs() if i.name.startswith("past.")]
        self.present_outputs = [i.name.replace("past.", "present.") for i in self.past_inputs]
        decoder_cross = {i.name for i in decoder_session.get_inputs() if i.name.startswith("cross.")}
        if decoder_cross != set(self.cross_outputs):
            raise ValueError(f"the encoder's outputs {sorted(self.cross_outputs)} are not the decoder's cross "
                             f"inputs {sorted(decoder_cross)}")

    def last_logits(self, prompt_ids: list[int]) -> np.ndarray:
        """The first decoder step's next-token logits [vocab] (for parity checks)."""
        cross = dict(zip(self.cross_outputs, self.encoder.run(self.cross_outputs, self.encoder_feed(prompt_ids))))
        feed = {"input_ids": np.array([self.start_ids], dtype=np.int64),
                "encoder_attention_mask": np.ones((1, len(prompt_ids)), dtype=np.int64), **self.empty_cache(), **cross}
        return self.decoder.run(["logits"], feed)[0][0]

    @staticmethod
    def encoder_feed(prompt_ids: list[int]) -> dict[str, np.ndarray]:
        """The encoder graph's inputs for a prompt."""
        return {"input_ids": np.array([prompt_ids], dtype=np.int64),
                "attention_mask": np.ones((1, len(prompt_ids)), dtype=np.int64)}

    def steps(self, result: Generation, prompt_ids: list[int], max_new_tokens: int) -> Iterator[int]:
        """The decoding loop (runtime.generation's step interface)."""
        if max_new_tokens <= 0:
            return
        start = time.perf_counter()
        cross = dict(zip(self.cross_outputs, run_bound(self.encoder, self.encoder.io_binding(),
                                                        self.encoder_feed(prompt_ids), {}, self.cross_outputs)))
        encoder_mask = np.ones((1, len(prompt_ids)), dtype=np.int64)
        cache = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in self.empty_cache().items()}
        ids = np.array([self.start_ids], dtype=np.int64)
        binding = self.decoder.io_binding()
        for step in range(max_new_tokens):
            logits, *presents = run_bound(self.decoder, binding, {"input_ids": ids, "encoder_attention_mask": encoder_mask},
                                          {**cache, **cross}, ["logits", *self.present_outputs])
            token = result.choose(logits.numpy()[0])
            elapsed = (time.perf_counter() - start) * 1000
            if step == 0:
                result.prefill_ms = elapsed  # the encoder and the first decoder step
            else:
                result.step_ms.append(elapsed)
                result.decode_tokens += 1
            yield token
            start = time.perf_counter()
            cache = {i.name: p for i, p in zip(self.past_inputs, presents)}
            ids = np.array([[token]], dtype=np.int64)
