"""The Hugging Face RAG family: a `RagTokenForGeneration` (or `RagSequenceForGeneration`) teacher with
a DPR context encoder for its passages, distilled into an encoder-decoder student.

  teacher     the RAG checkpoint (DPR question encoder + BART), loaded with from_pretrained from a
              folder or a hub id, and the DPR context encoder that RAG checkpoints ship without.
  retrieval   edgerag's own hnswlib index of the DPR passage vectors (inner product, not normalized,
              as DPR scores them); no RagRetriever, so neither `datasets` nor faiss. The toolkit
              passes context_input_ids, context_attention_mask and doc_scores to the RAG model.
  contexts    RAG's own format, one per retrieved passage: "<s>title / text // question</s>".
  teacher p   the RAG-token marginal over the top-n passages (`rag_marginal`, the same computation as
              RagTokenForGeneration.marginalize); it also serves a RagSequence checkpoint.
  student     a BART with fewer decoder layers (DistilBART's shrink: keep the encoder, cut the
              decoder), and a DPR question encoder with fewer layers; passages keep the teacher's
              DPR vectors. It reads either the top-k passages concatenated in one context
              ("concatenated", what the device runs) or one passage at a time, marginalized like
              the teacher ("marginalized").
  KD          token-level KL from the teacher's marginal to the student's distribution on the
              answer tokens, with cross-entropy on the gold answer; optionally matching the
              teacher's input gradient as well (train/gradient.py).

Decoder inputs follow generation, not RAG's training shortcut: [decoder_start (, forced_bos)] +
answer, predicting answer + </s>. So what is trained is what generate() and the device decode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from edgerag.model_files import write_sentence_transformers_config
from edgerag.models import PLAIN_GREEDY, generation_setting
from edgerag.runtime.prompt import RAG_CONCAT, PromptTemplate, build_prompt_ids

from . import loop
from .loop import is_main
from .teacher import right_pad

TEMPLATE = PromptTemplate(**RAG_CONCAT)
QUESTION_MAX_LENGTH = 64
PASSAGE_MAX_LENGTH = 256


# ---------------------------------------------------------------- loading

def load_rag(name):
    """(model, tokenizer) of a RAG checkpoint: RagTokenForGeneration or RagSequenceForGeneration,
    as its config says."""
    from transformers import RagConfig, RagSequenceForGeneration, RagTokenForGeneration, RagTokenizer

    from edgerag.models import resolve

    path = resolve(name).path
    config = RagConfig.from_pretrained(path)
    kinds = {"RagTokenForGeneration": RagTokenForGeneration, "RagSequenceForGeneration": RagSequenceForGeneration}
    architecture = next((a for a in config.architectures or [] if a in kinds), "RagTokenForGeneration")
    model = kinds[architecture].from_pretrained(path)
    model.eval()
    return model, RagTokenizer.from_pretrained(path)


def dpr_bert(encoder):
    """The BertModel inside a DPR question or context encoder. Its CLS vector is DPR's embedding
    where the encoder has no projection (as in facebook/dpr-*-single-nq-base and rag-token-nq)."""
    inner = getattr(encoder, "question_encoder", None) or getattr(encoder, "ctx_encoder", None)
    if inner is None:
        raise TypeError(f"not a DPR encoder: {type(encoder).__name__}")
    if inner.projection_dim > 0:
        raise ValueError("DPR encoders with a projection (projection_dim > 0) are not supported")
    return inner.bert_model


def save_dpr_encoder(bert, tokenizer, folder: Path, max_length: int) -> None:
    """A DPR encoder as a sentence-transformers folder of a plain BERT: CLS pooling, no normalization.
    (A DPRConfig would make AutoModel build a DPR wrapper, whose output has no last_hidden_state.)"""
    from transformers import BertConfig, BertModel

    if bert.config.model_type != "bert":
        values = {k: v for k, v in bert.config.to_dict().items() if k not in ("model_type", "projection_dim", "architectures")}
        plain = BertModel(BertConfig(**values), add_pooling_layer=False)
        plain.load_state_dict(bert.state_dict())
        bert = plain
    if is_main():
        loop.save_pretrained_atomic(bert, tokenizer, folder)
        write_sentence_transformers_config(folder, "cls", max_length, bert.config.hidden_size, normalize=False)


def decoder_prefix(generator) -> list[int]:
    """What the decoder reads before the answer's first token, as generate() starts it: the start
    token, then a forced BOS where the model has one (bart-large does). `generator` is a seq2seq
    model or a bare config."""
    forced = generation_setting(generator, "forced_bos_token_id")
    return [generation_setting(generator, "decoder_start_token_id")] + ([forced] if forced is not None else [])


# ---------------------------------------------------------------- contexts and the marginal

def encode_with(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def context_ids(encode, question: str, passages, max_tokens: int) -> list[int]:
    """One encoder input: the passages (title, text) in rank order, then the question, in RAG's
    format; passages are cut first where it is too long (runtime.prompt's rule)."""
    return build_prompt_ids(encode, TEMPLATE, question, passages, max_tokens)


def rag_marginal(seq_logits, doc_scores, n_docs: int):
    """log p(y_i | x, y_<i) = logsumexp_z [log softmax(doc_scores)_z + log p(y_i | x, z, y_<i)].

    seq_logits [batch * n_docs, target, vocab] (the generator's logits, one row per passage, as
    RAG orders them), doc_scores [batch, n_docs] -> [batch, target, vocab] log-probabilities."""
    import torch

    seq_logprobs = torch.log_softmax(seq_logits.float(), dim=-1)
    seq_logprobs = seq_logprobs.view(-1, n_docs, *seq_logprobs.shape[1:])
    doc_logprobs = torch.log_softmax(doc_scores.float(), dim=1)[:, :, None, None]
    return torch.logsumexp(seq_logprobs + doc_logprobs, dim=1)


def question_vectors(question_bert, tokenizer, questions: list[str]):
    enc = tokenizer(questions, padding=True, truncation=True, max_length=QUESTION_MAX_LENGTH, return_tensors="pt")
    enc = {k: v.to(question_bert.device) for k, v in enc.items()}
    return question_bert(**enc).last_hidden_state[:, 0]


@dataclass
class RagExample:
    """One question with its passages: `contexts` holds one encoder input per passage (the teacher's
    and the marginalized student's), `concatenated` the student's single one; `rows` the passages'
    corpus rows (for doc scores); `decoder` and `target` the answer, as decoder input and labels."""
    question_id: str
    question: str
    rows: list[int]
    contexts: list[list[int]]
    concatenated: list[int]
    decoder: list[int]
    target: list[int]


def make_rag_examples(questions, ranked_rows, corpus, tokenizer, generator, n_docs: int,
                      max_tokens: int, max_answer_tokens: int, gold_probability: float, rng: random.Random,
                      row_of: dict[str, int]) -> list[RagExample]:
    """Where retrieval missed the gold passage, it takes a retrieved slot at random with probability
    `gold_probability` (its doc score then comes from its own vector), as the default family does."""
    encode = encode_with(tokenizer)
    prefix = decoder_prefix(generator)
    examples = []
    for q, rows in zip(questions, ranked_rows):
        rows = list(rows[:n_docs])
        gold = row_of.get(q.passage_id)
        if gold is not None and gold not in rows and rows and rng.random() < gold_probability:
            rows[rng.randrange(len(rows))] = gold
        passages = [(corpus[r].title, corpus[r].text) for r in rows]
        answer = encode(q.answers[0].strip())[:max_answer_tokens]
        examples.append(RagExample(
            q.id, q.question, rows, [context_ids(encode, q.question, [p], max_tokens) for p in passages],
            context_ids(encode, q.question, passages, max_tokens), prefix + answer,
            answer + [generator.config.eos_token_id]))
    return examples


def doc_scores_for(question_bert, tokenizer, examples: list[RagExample], passage_vectors):
    """[batch, n_docs] inner products of each question's vector with its passages' vectors."""
    import torch

    q = question_vectors(question_bert, tokenizer, [e.question for e in examples])
    docs = torch.stack([passage_vectors[torch.tensor(e.rows)] for e in examples]).to(q.device)
    return torch.bmm(docs, q[:, :, None]).squeeze(-1)


def answer_logits(generator, rows: list[list[int]], decoders: list[list[int]], pad_id: int, inputs_embeds=None):
    """Generator logits at the positions that predict each target token (answer + </s>), [len(rows),
    target, vocab]; decoder inputs right-padded. A forced BOS after the start token is read, not
    predicted: its position is dropped."""
    ids, mask = right_pad(rows, pad_id)
    dec, _ = right_pad(decoders, pad_id)
    device = next(generator.parameters()).device
    kwargs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids.to(device)}
    logits = generator(attention_mask=mask.to(device), decoder_input_ids=dec.to(device), **kwargs).logits
    return logits[:, len(decoder_prefix(generator)) - 1:]


def marginal_logprobs(generator, question_bert, q_tokenizer, examples: list[RagExample], passage_vectors, pad_id: int):
    """[batch, target, vocab] RAG-token marginal log-probs of a batch (every example has n passages)."""
    n = len(examples[0].rows)
    rows = [c for e in examples for c in e.contexts]
    decoders = [e.decoder for e in examples for _ in range(n)]
    seq_logits = answer_logits(generator, rows, decoders, pad_id)
    return rag_marginal(seq_logits, doc_scores_for(question_bert, q_tokenizer, examples, passage_vectors), n)


def target_labels(examples: list[RagExample]):
    """[batch, target] labels, -100 past each example's end."""
    import torch

    width = max(len(e.target) for e in examples)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        labels[i, :len(e.target)] = torch.tensor(e.target)
    return labels


def nll(logprobs, labels):
    import torch.nn.functional as F

    return F.nll_loss(logprobs.reshape(-1, logprobs.size(-1)), labels.to(logprobs.device).reshape(-1), ignore_index=-100)


def answer_gradient(generator, rows: list[list[int]], e: RagExample, doc_scores, pad_id: int):
    """(d log p(answer) / d input embeddings [rows, length, width], mask): one context, or the
    marginal over several (the teacher's side; the student's comes from its loss's own forward pass)."""
    import torch

    from .gradient import input_gradient

    ids, mask = right_pad(rows, pad_id)
    device = next(generator.parameters()).device
    labels = torch.tensor(e.target, device=device)

    def forward(embeds):
        logits = answer_logits(generator, rows, [e.decoder] * len(rows), pad_id, inputs_embeds=embeds)
        if len(rows) == 1:
            logprobs = torch.log_softmax(logits.float(), -1)
        else:
            logprobs = rag_marginal(logits, doc_scores.to(device), len(rows))
        ll = logprobs[0, torch.arange(len(labels), device=device), labels].sum()
        return ll.expand(len(rows)) / len(rows)  # input_gradient sums the rows: one likelihood in all

    _, grad = input_gradient(generator, forward, ids.to(device), create_graph=False)
    return grad, mask


# ---------------------------------------------------------------- greedy answers

def rag_generate(model, examples: list[RagExample], doc_scores, pad_id: int, max_new_tokens: int,
                 logits_processor=None) -> list[list[int]]:
    """The RAG model's own generation (RagTokenForGeneration.generate) from our contexts and doc
    scores, greedy; the answer's token ids, without the decoder prefix and the end token."""
    import torch

    n = len(examples[0].rows)
    ids, mask = right_pad([c for e in examples for c in e.contexts], pad_id)
    prefix = decoder_prefix(model.generator)
    with torch.inference_mode():
        out = model.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores, n_docs=n,
                             max_length=len(prefix) + max_new_tokens, logits_processor=logits_processor, **PLAIN_GREEDY)
    return [_answer_ids(row.tolist(), model.generator) for row in out]


def marginal_generate(generator, examples: list[RagExample], doc_scores, pad_id: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding on the RAG-token marginal, one token at a time for a batch (the marginalized
    student's reading; it agrees with RagTokenForGeneration.generate, a test checks)."""
    import torch

    n = len(examples[0].rows)
    prefix = examples[0].decoder[:len(examples[0].decoder) - len(examples[0].target) + 1]
    rows = [c for e in examples for c in e.contexts]
    ids, mask = right_pad(rows, pad_id)
    eos = generator.config.eos_token_id
    answers = [[] for _ in examples]
    done = [False] * len(examples)
    with torch.inference_mode():
        encoder_out = generator.get_encoder()(input_ids=ids, attention_mask=mask)
        for _ in range(max_new_tokens):
            dec = torch.tensor([prefix + a for a in answers for _ in range(n)])
            logits = generator(encoder_outputs=encoder_out, attention_mask=mask, decoder_input_ids=dec).logits[:, -1:]
            tokens = rag_marginal(logits, doc_scores, n)[:, -1].argmax(-1).tolist()
            for i, t in enumerate(tokens):
                done[i] = done[i] or t == eos
                answers[i].append(eos if done[i] else t)  # a finished row keeps step with the rest; cut below
            if all(done):
                break
    return [a[:a.index(eos)] if eos in a else a for a in answers]


def concatenated_generate(generator, contexts: list[list[int]], pad_id: int, max_new_tokens: int,
                          logits_processor=None) -> list[list[int]]:
    import torch

    ids, mask = right_pad(contexts, pad_id)
    with torch.inference_mode():
        # HF counts a forced BOS as a new token; the device does not
        out = generator.generate(input_ids=ids, attention_mask=mask, **PLAIN_GREEDY, logits_processor=logits_processor,
                                 max_new_tokens=max_new_tokens + len(decoder_prefix(generator)) - 1)
    return [_answer_ids(row.tolist(), generator) for row in out]


def _answer_ids(row: list[int], generator) -> list[int]:
    """A generated row without its decoder prefix and from the end token on."""
    config = generator.config
    prefix = decoder_prefix(generator)
    if row[:len(prefix)] == prefix:
        row = row[len(prefix):]
    elif row[:1] == prefix[:1]:
        row = row[1:]
    for stop in (config.eos_token_id, config.pad_token_id):
        if stop in row:
            row = row[:row.index(stop)]
    return row


# ---------------------------------------------------------------- the student

def cut_bart(model, encoder_layers: list[int], decoder_layers: list[int]) -> dict:
    """Keep the listed encoder and decoder layers of a BART, in place (DistilBART's shrink)."""
    import torch.nn as nn

    from .student import count_params

    before = count_params(model)
    for stack, keep, key in ((model.model.encoder, encoder_layers, "encoder_layers"),
                             (model.model.decoder, decoder_layers, "decoder_layers")):
        stack.layers = nn.ModuleList([stack.layers[i] for i in keep])
        for new, layer in enumerate(stack.layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new
        setattr(model.config, key, len(keep))
    return {"teacher_params": before, "encoder_layers": list(encoder_layers), "decoder_layers": list(decoder_layers),
            "params": count_params(model)}


def student_input(example: RagExample, reading: str) -> list[list[int]]:
    """The encoder inputs a student of this `reading` reads: the one concatenated context, or one per passage."""
    return [example.concatenated] if reading == "concatenated" else example.contexts
