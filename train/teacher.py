"""The RAG generator side: prompts, training examples, the answer-only loss, and greedy generation.

One prompt for everything: `runtime.prompt.build_prompt_ids` with the template the tokenizer calls
for, so the student sees in training exactly what the device will give it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from edgerag.runtime.prompt import PromptTemplate, build_prompt_ids


@dataclass
class Example:
    """One generator training example: the prompt, the target (answer + answer_end), and provenance."""
    question_id: str
    prompt: list[int]
    target: list[int]


# appended to a question's id in the example that asks it over passages that cannot answer it
NEGATIVE_ID = "#no-answer"


class Prompter:
    """Token-level prompt building for one tokenizer."""

    def __init__(self, tokenizer, max_prompt_tokens: int, max_answer_tokens: int = 24, compact: bool = False):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.template = PromptTemplate.for_vocab(lambda t: vocab.get(t), compact)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_answer_tokens = max_answer_tokens
        end = self.encode(self.template.answer_end)
        # Generation stops at the template's answer end (its first token) or at eos.
        self.stop_ids = sorted({i for i in [end[0] if end else None, tokenizer.eos_token_id] if i is not None})

    def encode(self, text: str) -> list[int]:
        # No special tokens: a GGUF tokenizer would add a BOS the device never sees.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, question: str, passages) -> list[int]:
        return build_prompt_ids(self.encode, self.template, question, passages, self.max_prompt_tokens)

    def target(self, answer: str) -> list[int]:
        ids = self.encode(answer.strip())[: self.max_answer_tokens]
        return ids + self.encode(self.template.answer_end)


def rag_context(question, ranked_passages, k: int, gold_probability: float, rng: random.Random):
    """Top-k retrieved passages as (title, text) pairs. Where retrieval missed the gold passage, it
    replaces one at a random rank with probability `gold_probability`, so the model learns both to
    read the answer off a passage and to cope with contexts that lack it."""
    from edgerag.data import Passage

    top = list(ranked_passages[:k])
    if k > 0 and all(p.id != question.passage_id for p in top) and rng.random() < gold_probability:
        gold = Passage(question.passage_id, question.title, question.context)
        if top:
            top[rng.randrange(len(top))] = gold
        else:
            top = [gold]
    return [(p.title, p.text) for p in top]


def make_examples(prompter: Prompter, questions, contexts, answers=None) -> list[Example]:
    """Examples from questions, their contexts ((title, text) lists) and answers (default: the first gold one)."""
    out = []
    for i, q in enumerate(questions):
        answer = answers[i] if answers is not None else q.answers[0]
        out.append(Example(q.id, prompter.prompt(q.question, contexts[i]), prompter.target(answer)))
    return out


def example_length(example: Example) -> int:
    """Its tokens in a batch: `collate` pads every row to the longest prompt + target."""
    return len(example.prompt) + len(example.target)


def collate(examples: list[Example], pad_id: int, device=None):
    """Left-padded batch: every row ends with its target, so the logits we need are the last few.

    Returns ids, attention mask, position ids (counting from the first real token, as on the device)
    and labels that are -100 everywhere but the target.
    """
    import torch

    seqs = [e.prompt + e.target for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (e, s) in enumerate(zip(examples, seqs)):
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
        labels[row, width - len(e.target):] = torch.tensor(e.target)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if device is not None:
        ids, mask, positions, labels = ids.to(device), mask.to(device), positions.to(device), labels.to(device)
    return ids, mask, positions, labels


def right_pad(rows: list[list[int]], pad_id: int):
    """Right-padded ids [rows, longest] and their attention mask (BART's positions count from the
    left; a causal LM's prompts are left-padded by `collate` instead)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def target_logits(model, examples: list[Example], pad_id: int, hidden: bool = False, inputs_embeds=None):
    """Logits that predict each target token, [batch, max_target, vocab], right-aligned per row, and the
    labels they predict (-100 where a shorter target has none); optionally the final hidden states there.
    `inputs_embeds`: the collated ids' embeddings, given instead of the ids (gradient matching).

    Only the last positions go through the LM head: with a 49k vocabulary the head costs as much as
    the rest of a small model, and the prompt positions carry no loss."""
    ids, mask, positions, labels = collate(examples, pad_id, _device(model))
    n = max(len(e.target) for e in examples)
    inputs = {"input_ids": ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    out = model(**inputs, attention_mask=mask, position_ids=positions, logits_to_keep=n + 1,
                output_hidden_states=hidden)
    logits = out.logits[:, :-1]
    h = out.hidden_states[-1][:, -n - 1:-1] if hidden else None
    return logits, labels[:, -n:], h


def answer_loss(model, examples: list[Example], pad_id: int):
    """Cross-entropy on the answer tokens only (the prompt is context, not something to learn)."""
    import torch.nn.functional as F

    logits, labels, _ = target_logits(model, examples, pad_id)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)


def _device(model):
    return next(model.parameters()).device


def generate(model, prompter: Prompter, prompts: list[list[int]], batch_size: int = 8, max_new_tokens: int | None = None,
             progress: str | None = None, confidences: list | None = None) -> list[str]:
    """Greedy answers for prompt token ids, left-padded in batches, stopping at answer_end or eos.

    confidences: a list that gets each answer's confidence as the device computes it (1 minus the
    probability that it begins NO_ANSWER at the first step); the answers are then those with NO_ANSWER's
    first tokens ruled out at the first step, as a device that does not abstain gives them."""
    import torch
    from tqdm.auto import tqdm

    from edgerag.runtime.prompt import no_answer_token_ids

    no_answer = no_answer_token_ids(prompter.encode) if confidences is not None else None
    if confidences is not None:
        confidences[:] = [None] * len(prompts)

    max_new_tokens = max_new_tokens or prompter.max_answer_tokens
    pad_id = prompter.tokenizer.pad_token_id if prompter.tokenizer.pad_token_id is not None else prompter.stop_ids[0]
    dev = _device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, leave=False):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        extra = {}
        if no_answer is not None:
            extra = {"logits_processor": [_RuleOutAtFirstStep(no_answer, width)], "output_logits": True,
                     "return_dict_in_generate": True}
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=prompter.stop_ids, pad_token_id=pad_id, **extra)
        if no_answer is not None:
            first = torch.softmax(out.logits[0].float(), dim=-1)[:, no_answer].sum(-1)
            for row, i in enumerate(idx):
                confidences[i] = float(1.0 - first[row])
            out = out.sequences
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            for n, t in enumerate(new):
                if t in prompter.stop_ids:
                    new = new[:n]
                    break
            answers[i] = prompter.tokenizer.decode(new, skip_special_tokens=True).strip()
    model.train(was_training)
    return answers


class _RuleOutAtFirstStep:
    """A logits processor for `generate`: tokens ruled out at the first new position."""

    def __init__(self, token_ids: list[int], prompt_width: int):
        self.token_ids, self.prompt_width = token_ids, prompt_width

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_width:
            scores = scores.clone()  # generate's raw logits (output_logits) are this tensor: keep them
            scores[:, self.token_ids] = float("-inf")
        return scores
