"""The RAG prompt, shared by training (teacher fine-tuning, distillation) and the device, and the
checks of what a caller asks with it (question, counts).

A prompt is built from pieces that are tokenized one by one and concatenated as token ids:

    prefix + passage(rank 1) + passage(rank 2) + ... + question

Tokenizing the pieces separately makes truncation exact and identical on both sides.

Truncation rule, when the prompt would not fit in `max_prompt_tokens`:
  1. passages first: cut tokens from the end of the lowest-ranked passage, and drop a passage
     whose text is gone entirely (its header with it), moving up the ranking;
  2. then the question: keep its first tokens;
  3. the fixed template pieces are never cut. A context too small to hold them is an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The answer a generator that learned to abstain writes where its context does not hold one: plain
# text, so that any tokenizer spells it (runtime.generation.Abstention reads its first token).
NO_ANSWER = "unanswerable"

CHATML = {
    "prefix": "<|im_start|>system\nAnswer the question with a short answer taken from the context.<|im_end|>\n"
              "<|im_start|>user\nContext:\n",
    "passage": "[{rank}] {title}: ",
    "passage_end": "\n",
    "question": "\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\n",
    "answer_end": "<|im_end|>",
}

PLAIN = {
    "prefix": "Answer the question with a short answer taken from the context.\nContext:\n",
    "passage": "[{rank}] {title}: ",
    "passage_end": "\n",
    "question": "\nQuestion: {question}\nAnswer:",
    "answer_end": "\n",
}

# Students that read a compressed context (runtime/compress.py) drop the system message and the rank
# numbers: their 25-odd tokens would be a quarter of a compressed prompt. Both sides read the template
# from the student's settings, so the student is trained on the prompt the device builds.
CHATML_COMPACT = {
    "prefix": "<|im_start|>user\n",
    "passage": "{title}: ",
    "passage_end": "\n",
    "question": "Question: {question}<|im_end|>\n<|im_start|>assistant\n",
    "answer_end": "<|im_end|>",
}

PLAIN_COMPACT = {
    "prefix": "",
    "passage": "{title}: ",
    "passage_end": "\n",
    "question": "Question: {question}\nAnswer:",
    "answer_end": "\n",
}

# Encoder-decoder (BART) students read RAG's own context format, "title / text // question",
# with every retrieved passage before the question; BART's tokenizer wraps a text in <s> ... </s>.
RAG_CONCAT = {
    "prefix": "<s>",
    "passage": "{title} / ",
    "passage_end": " // ",
    "question": "{question}</s>",
    "answer_end": "</s>",
}


@dataclass(frozen=True)
class PromptTemplate:
    prefix: str
    passage: str
    passage_end: str
    question: str
    answer_end: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptTemplate":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @classmethod
    def for_vocab(cls, token_to_id, compact: bool = False) -> "PromptTemplate":
        """ChatML where the tokenizer knows <|im_start|>, a plain template otherwise (their compact
        forms for a compressed context)."""
        chat = token_to_id("<|im_start|>") is not None
        return cls(**{(True, False): CHATML, (False, False): PLAIN,
                      (True, True): CHATML_COMPACT, (False, True): PLAIN_COMPACT}[chat, compact])


class PromptError(ValueError):
    pass


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


def no_answer_token_ids(encode) -> list[int]:
    """The tokens a generator may begin NO_ANSWER with (lower or capital, after a space or not): what the
    device's confidence reads and, when it answers, rules out (runtime.generation.Abstention)."""
    variants = (NO_ANSWER, NO_ANSWER.capitalize(), " " + NO_ANSWER, " " + NO_ANSWER.capitalize())
    return sorted({encode(text)[0] for text in variants})


def check_threshold(value) -> float | None:
    """None (the bundle's setting) or a number in [0, 1], else a ValueError naming the range."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"abstain_threshold must be a number from 0 to 1 (0: never abstain), not {value!r}")
    return float(value)


class TokenIds:
    """A `tokenizers.Tokenizer` as the `encode(text) -> list[int]` that build_prompt_ids and
    runtime.compress take: the text's ids without special tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def build_prompt_ids(encode, template: PromptTemplate, question: str, passages, max_prompt_tokens: int) -> list[int]:
    """Token ids of the prompt, truncated by the rule in this module's docstring.

    `encode(text) -> list[int]` must not add special tokens; `passages` are (title, text) pairs
    in rank order.
    """
    question = question.strip()
    if not question:
        raise PromptError("the question is empty")
    prefix = encode(template.prefix)
    before_q, _, after_q = template.question.partition("{question}")
    q_open, q_ids, q_close = encode(before_q), encode(question), encode(after_q)
    end = encode(template.passage_end)
    blocks = [(encode(template.passage.format(rank=rank, title=title)), encode(text))
              for rank, (title, text) in enumerate(passages, start=1)]

    fixed = len(prefix) + len(q_open) + len(q_close)
    if fixed + 1 > max_prompt_tokens:
        raise PromptError(f"the context ({max_prompt_tokens} tokens) cannot hold the prompt template ({fixed} tokens)")
    overflow = fixed + len(q_ids) + sum(len(h) + len(t) + len(end) for h, t in blocks) - max_prompt_tokens
    while overflow > 0 and blocks:
        header, text = blocks[-1]
        if len(text) > overflow:
            blocks[-1] = (header, text[:len(text) - overflow])
            overflow = 0
        else:
            blocks.pop()
            overflow -= len(header) + len(text) + len(end)
    if overflow > 0:
        q_ids = q_ids[:len(q_ids) - overflow]
    ids = list(prefix)
    for header, text in blocks:
        ids += header + text + end
    return ids + q_open + q_ids + q_close
