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

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from edgerag.models import PLAIN_GREEDY, generation_setting, write_sentence_transformers_config
from edgerag.runtime.prompt import RAG_CONCAT, PromptTemplate, build_prompt_ids

from . import loop
from .loop import atomic_write_text, is_main
from .teacher import right_pad

TEMPLATE = PromptTemplate(**RAG_CONCAT)
# DPR embeds a passage as the pair (title, text): [CLS] title [SEP] text [SEP]. The runtime's
# encoder takes one string, so both sides write the pair that way.
DPR_PASSAGE_FORMAT = "{title} [SEP] {text}"
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


def _layers(spec, depth: int, name: str) -> list[int]:
    from .recipe import RecipeError, parse_layers

    layers = parse_layers(spec, depth, name)
    if isinstance(layers, str):
        raise RecipeError(f"{name}: 'auto:N' is not available for hf-rag students; list the layers or give a count")
    return layers


# ---------------------------------------------------------------- retrieval in the run

def search_rows(encoder_folder, questions, k: int, index_embeddings) -> list[list[int]]:
    """Corpus rows of each question's top-k passages, by a DPR question encoder folder."""
    import numpy as np

    from edgerag.models import load_encoder

    from .retrieval import PassageIndex, embed

    encoder, tok, pooling, max_length = load_encoder(encoder_folder)
    vectors = np.load(index_embeddings)
    q = embed(encoder, tok, [x.question for x in questions], pooling, max_length, normalize=False)
    return PassageIndex(range(len(vectors)), vectors).search(q, k)


def _rag_paths(run):
    t = run.teacher_dir
    base = run.stage_dir("teacher") / "rag" if run.recipe.teacher_finetune.enabled else t / "rag"
    return {"rag": t / "rag", "base": base, "passage_encoder": t / "passage_encoder"}


def _examples(run, generator, tokenizer, questions, k, max_tokens, gold_probability, seed_offset, encoder_folder):
    rows = search_rows(encoder_folder, questions, k, run.index_embeddings)
    corpus = run.corpus()
    return make_rag_examples(questions, rows, corpus, tokenizer, generator, k, max_tokens,
                             run.recipe.prompt.max_answer_tokens, gold_probability,
                             random.Random(run.recipe.seed + seed_offset), {p.id: i for i, p in enumerate(corpus)})


def _passage_vectors(run):
    import numpy as np
    import torch

    return torch.from_numpy(np.load(run.index_embeddings))


# ---------------------------------------------------------------- stages

def stage_teacher(run) -> dict:
    from transformers import AutoTokenizer, DPRContextEncoder

    from edgerag.models import resolve

    from .student import count_params

    t, paths = run.recipe.teacher, _rag_paths(run)
    model, tok = load_rag(t.rag)
    ctx_path = resolve(t.context_encoder).path
    ctx = DPRContextEncoder.from_pretrained(ctx_path)
    save_dpr_encoder(dpr_bert(ctx), AutoTokenizer.from_pretrained(ctx_path), paths["passage_encoder"], PASSAGE_MAX_LENGTH)
    if is_main():
        loop.save_pretrained_atomic(model, tok, paths["base"])
    if not run.recipe.teacher_finetune.enabled:
        save_dpr_encoder(dpr_bert(model.question_encoder), tok.question_encoder, run.teacher_encoder, QUESTION_MAX_LENGTH)
    info = {"rag": t.rag, "context_encoder": t.context_encoder, "architecture": type(model).__name__,
            "question_encoder_params": count_params(model.question_encoder),
            "generator_params": count_params(model.generator), "context_encoder_params": count_params(ctx)}
    atomic_write_text(run.teacher_info, json.dumps(_folder_info(run, **info), indent=2))
    return info


def _folder_info(run, **extra) -> dict:
    p = run.recipe.prompt
    return {"family": "encoder-decoder", "max_prompt_tokens": p.max_prompt_tokens, "max_answer_tokens": p.max_answer_tokens,
            "passage_encoder": "passage_encoder", "passage_format": DPR_PASSAGE_FORMAT, **extra}


def stage_index(run) -> dict:
    from edgerag.models import load_encoder

    from .retrieval import PassageIndex, embed

    encoder, tok, pooling, max_length = load_encoder(_rag_paths(run)["passage_encoder"])
    corpus = run.corpus()
    vectors = embed(encoder, tok, [run.passage_string(p) for p in corpus], pooling, max_length,
                    progress="index corpus (DPR)", normalize=False)
    PassageIndex(corpus, vectors).save(run.index_dir)
    return {"passages": len(corpus), "dim": int(vectors.shape[1])}


def _unwrap(model):
    return getattr(model, "module", model)


def stage_teacher_finetune(run) -> dict:
    """RAG's fine-tuning: the question encoder and the generator learn, on the marginal likelihood of
    the gold answer over the top-k passages; the passage encoder and the index stay fixed. Passages
    are retrieved once, by the checkpoint's question encoder; doc scores follow it as it learns."""
    from .pipeline import train_config

    cfg, paths = run.recipe.teacher_finetune, _rag_paths(run)
    model, tok = load_rag(paths["base"])
    with_encoder = paths["base"].parent / "question_encoder"
    save_dpr_encoder(dpr_bert(model.question_encoder), tok.question_encoder, with_encoder, QUESTION_MAX_LENGTH)
    questions = run.questions("train")[:cfg.examples]
    examples = _examples(run, model.generator, tok.generator, questions, cfg.k, cfg.max_prompt_tokens,
                         cfg.gold_probability, 1, with_encoder)
    vectors, pad_id = _passage_vectors(run), model.config.generator.pad_token_id

    def loss_fn(m, batch):
        m = _unwrap(m)
        logprobs = marginal_logprobs(m.generator, dpr_bert(m.question_encoder), tok.question_encoder, batch, vectors, pad_id)
        return nll(logprobs, target_labels(batch)), {}

    model.to(loop.device())
    log = loop.train(model, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir("teacher_finetune"),
                     desc="teacher fine-tune (RAG)")
    model.cpu()
    if is_main():
        loop.save_pretrained_atomic(model, tok, paths["rag"])
    save_dpr_encoder(dpr_bert(model.question_encoder), tok.question_encoder, run.teacher_encoder, QUESTION_MAX_LENGTH)
    return {"examples": len(examples), "steps": len(log), "first_loss": log[0]["loss"] if log else None,
            "last_loss": log[-1]["loss"] if log else None}


def stage_student_init(run) -> dict:
    s = run.recipe.student
    model, tok = load_rag(_rag_paths(run)["rag"])
    generator = model.generator
    info = {"generator": cut_bart(generator,
                                  _layers(s.generator_encoder_layers, generator.config.encoder_layers, "student.generator_encoder_layers"),
                                  _layers(s.layers, generator.config.decoder_layers, "student.layers"))}
    if is_main():
        loop.save_pretrained_atomic(generator, tok.generator, run.student_init_generator)
    from .student import shrink_encoder

    question = dpr_bert(model.question_encoder)
    info["query_encoder"] = shrink_encoder(question, _layers(s.encoder_layers, question.config.num_hidden_layers,
                                                             "student.encoder_layers"))
    save_dpr_encoder(question, tok.question_encoder, run.student_init_encoder, QUESTION_MAX_LENGTH)
    g, e = info["generator"], info["query_encoder"]
    print(f"[student] generator {g['params']:,} params ({100 * g['params'] / g['teacher_params']:.0f}% of the teacher's), "
          f"question encoder {e['params']:,} ({100 * e['params'] / e['teacher_params']:.0f}%)")
    return info


def stage_student_folder(run) -> dict:
    """RUN/student/edgerag.json and the teacher's DPR passage encoder beside the student (passages
    keep the teacher's vectors)."""
    loop.copy_tree_atomic(_rag_paths(run)["passage_encoder"], run.student_passage_encoder)
    made = {k: v for k, v in json.loads(run.student_init_info.read_text()).items() if k not in ("seconds", "fingerprint")}
    atomic_write_text(run.student_info, json.dumps(_folder_info(run, reading=run.recipe.student.reading, student=made,
                                                                teacher=run.recipe.teacher.rag,
                                                                k=run.recipe.distill_generator.k), indent=2))
    return {"reading": run.recipe.student.reading}


def _student_input(example: RagExample, reading: str) -> list[list[int]]:
    return [example.concatenated] if reading == "concatenated" else example.contexts


def stage_teacher_logits(run) -> dict:
    """The teacher's RAG-token marginal on the KD examples (top-k log-probs at temperature T per answer
    position); with gradient matching, also the teacher's projected input gradient on the input the
    student will read (the generator reading the student's context: both gradients at one point)."""
    import torch

    from .gradient import project, projection, token_space_map

    cfg, reading = run.recipe.distill_generator, run.recipe.student.reading
    model, tok = load_rag(_rag_paths(run)["rag"])
    model.to(loop.device())
    questions = run.questions("train")[:cfg.examples]
    examples = _examples(run, model.generator, tok.generator, questions, cfg.k, cfg.max_prompt_tokens,
                         cfg.gold_probability, 2, run.teacher_encoder)
    vectors, pad_id = _passage_vectors(run), model.config.generator.pad_token_id
    question = dpr_bert(model.question_encoder)
    token_map = None
    if cfg.gradient_weight > 0:
        token_map = token_space_map(model.generator, projection(model.config.generator.vocab_size,
                                                                cfg.gradient_projections, run.recipe.seed)).detach()
    from tqdm.auto import tqdm

    cache = []
    for e in tqdm(examples, desc="teacher marginal"):
        with torch.no_grad():
            doc_scores = doc_scores_for(question, tok.question_encoder, [e], vectors)
            marginal = rag_marginal(answer_logits(model.generator, e.contexts, [e.decoder] * len(e.rows), pad_id),
                                    doc_scores, len(e.rows))[0]
            values, ids = torch.log_softmax(marginal / cfg.temperature, -1).topk(cfg.top_k, -1)
        item = {"logp": values.cpu(), "ids": ids.to(torch.int32).cpu()}
        if token_map is not None:
            rows = _student_input(e, reading)
            grad, mask = _answer_gradient(model.generator, rows, e, doc_scores, pad_id)
            item["gradient"] = project(grad, mask, token_map).detach().cpu()
        cache.append(item)
    if is_main():
        loop.atomic_torch_save({"examples": [dataclasses.asdict(e) for e in examples], "cache": cache}, run.kd_cache)
    return {"examples": len(examples), "top_k": cfg.top_k, "temperature": cfg.temperature,
            "gradient_projections": cfg.gradient_projections if token_map is not None else 0}


def _answer_gradient(generator, rows: list[list[int]], e: RagExample, doc_scores, pad_id: int):
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


def stage_distill_generator(run) -> dict:
    """The student's generator learns the teacher's marginal: alpha * CE(gold) + (1 - alpha) * T^2 *
    KL(teacher marginal || student), plus gradient_weight * gradient matching where set."""
    import torch
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from edgerag.models import load_encoder

    from .distill import disable_dropout, kl_to_topk
    from .gradient import input_embeddings, matching_loss, project, projection, token_space_map
    from .pipeline import save_generator, train_config

    cfg, reading = run.recipe.distill_generator, run.recipe.student.reading
    # gradient matching backpropagates through a gradient: SDPA's CPU kernel has no double backward
    student = BartForConditionalGeneration.from_pretrained(
        run.student_init_generator, **({"attn_implementation": "eager"} if cfg.gradient_weight > 0 else {}))
    tok = AutoTokenizer.from_pretrained(run.student_init_generator)
    saved = torch.load(run.kd_cache, weights_only=False)
    examples = [(RagExample(**e), c) for e, c in zip(saved["examples"], saved["cache"])]
    pad_id, T = student.config.pad_token_id, cfg.temperature
    doc_scores = {}
    if reading == "marginalized":  # the student's own retrieval scores, from its distilled question encoder
        encoder, q_tok, _, _ = load_encoder(run.student_encoder)
        vectors = _passage_vectors(run)
        with torch.no_grad():
            for e, _ in examples:
                doc_scores[e.question_id] = doc_scores_for(encoder, q_tok, [e], vectors)
    P = projection(student.config.vocab_size, cfg.gradient_projections, run.recipe.seed) if cfg.gradient_weight > 0 else None

    def loss_fn(m, batch):
        m = _unwrap(m)
        ce, kl, grads, targets, n = 0.0, 0.0, [], [], 0
        token_map = token_space_map(m, P) if P is not None else None
        for e, cache in batch:
            rows = _student_input(e, reading)
            embeds = None
            if token_map is not None:  # one forward pass serves the loss and the input gradient
                ids, mask = right_pad(rows, pad_id)
                embeds = input_embeddings(m, ids.to(next(m.parameters()).device), create_graph=True)
            logits = answer_logits(m, rows, [e.decoder] * len(rows), pad_id, inputs_embeds=embeds)
            if reading == "concatenated":
                logprobs = torch.log_softmax(logits.float(), -1)[0]
            else:
                logprobs = rag_marginal(logits, doc_scores[e.question_id].to(logits.device), len(rows))[0]
            labels = torch.tensor(e.target, device=logprobs.device)
            answer_loglik = logprobs[torch.arange(len(labels)), labels].sum()
            ce = ce - answer_loglik
            kl = kl + kl_to_topk(torch.log_softmax(logprobs / T, -1), cache)
            n += len(labels)
            if token_map is not None:
                grad, = torch.autograd.grad(answer_loglik, embeds, create_graph=True)
                grads.append(project(grad, mask, token_map))
                targets.append(cache["gradient"])
        ce, kl = ce / n, kl / n * T ** 2
        loss = cfg.alpha * ce + (1 - cfg.alpha) * kl
        parts = {"ce": ce.detach(), "kl": kl.detach()}
        if grads:
            matching = matching_loss(grads, targets)
            loss = loss + cfg.gradient_weight * matching
            parts["gradient"] = matching.detach()
        return loss, parts

    disable_dropout(student)
    student.to(loop.device())
    log = loop.train(student, examples, loss_fn, train_config(cfg, run.recipe), run.stage_dir("distill_generator"),
                     desc="distill generator (RAG marginal)")
    save_generator(student.cpu(), tok, run.student_generator)
    return {"examples": len(examples), "steps": len(log), "reading": reading,
            "first": log[0] if log else None, "last": log[-1] if log else None}


# ---------------------------------------------------------------- evaluation

def evaluate_rag(run, side: str, answers_out: Path) -> dict:
    """The run's teacher or student on its eval questions and corpus (the teacher's DPR index)."""
    import numpy as np

    r = run.recipe
    folder = run.teacher_dir if side == "teacher" else run.student_dir
    return evaluate_rag_folder(folder, run.questions("eval"), run.corpus(), r.eval.k, np.load(run.index_embeddings),
                               r.prompt.max_prompt_tokens, r.prompt.max_answer_tokens, r.eval.batch_size, answers_out)


def evaluate_rag_folder(folder, questions, corpus, k: int = 3, passage_vectors=None, max_prompt_tokens: int | None = None,
                        max_answer_tokens: int | None = None, batch_size: int = 8, answers_out: Path | None = None) -> dict:
    """A hf-rag teacher folder (rag/ + query_encoder/ + passage_encoder/: the RAG model's own generation)
    or an encoder-decoder student folder (its reading), by edgerag.evaluation's rules: open-domain
    and gold-passage EM/F1, recall@k; plus prompt_tokens (encoder tokens read per question: every
    context, for a reader of one passage at a time) and answer_in_context (the share of questions
    whose contexts, as read, hold a gold answer string). `passage_vectors` (rows aligned with
    `corpus`) saves embedding the corpus with the folder's passage encoder."""
    import time

    import numpy as np
    import torch
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from edgerag.evaluation import RECALL_DEPTH, context_figures, score, write_answers
    from edgerag.models import load_encoder, read_info

    from .retrieval import PassageIndex, embed
    from .student import count_params

    folder, info = Path(folder), read_info(folder)
    max_prompt_tokens = max_prompt_tokens or info.get("max_prompt_tokens", 512)
    max_answer_tokens = max_answer_tokens or info.get("max_answer_tokens", 24)
    question_bert, q_tok, pooling, q_max = load_encoder(folder / "query_encoder")
    if (folder / "rag").is_dir():
        model, rag_tok = load_rag(folder / "rag")
        generator, tok, reading = model.generator, rag_tok.generator, "teacher"
    else:
        generator = BartForConditionalGeneration.from_pretrained(folder / "generator").eval()
        tok, reading = AutoTokenizer.from_pretrained(folder / "generator"), info.get("reading", "concatenated")
    if passage_vectors is None:
        p_enc, p_tok, p_pool, p_max = load_encoder(folder / info.get("passage_encoder", "passage_encoder"))
        fmt = info.get("passage_format", DPR_PASSAGE_FORMAT)
        passage_vectors = embed(p_enc, p_tok, [fmt.format(title=p.title, text=p.text) for p in corpus], p_pool, p_max,
                                progress="embed corpus (DPR)", normalize=False)
    vectors = torch.from_numpy(np.asarray(passage_vectors, dtype=np.float32))
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    q_vectors = embed(question_bert, q_tok, [q.question for q in questions], pooling, q_max, normalize=False)
    ranked = PassageIndex(range(len(corpus)), vectors.numpy()).search(q_vectors, max(k, RECALL_DEPTH))
    k = min(k, len(corpus))
    open_examples = make_rag_examples(questions, [rows[:k] for rows in ranked], corpus, tok, generator, k,
                                      max_prompt_tokens, max_answer_tokens, 0.0, random.Random(0), {})
    pad_id = generator.config.pad_token_id

    def answers(examples, doc_scores):
        out = []
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            scores = doc_scores(batch)
            if reading == "teacher":
                ids = rag_generate(model, batch, scores, pad_id, max_answer_tokens)
            elif reading == "marginalized":
                ids = marginal_generate(generator, batch, scores, pad_id, max_answer_tokens)
            else:
                ids = concatenated_generate(generator, [e.concatenated for e in batch], pad_id, max_answer_tokens)
            out += [tok.decode(a, skip_special_tokens=True).strip() for a in ids]
        return out

    def retrieved_scores(batch):
        with torch.no_grad():
            return doc_scores_for(question_bert, q_tok, batch, vectors)

    open_answers = answers(open_examples, retrieved_scores)
    seconds = (time.perf_counter() - start) / max(len(questions), 1)
    # with the gold passage alone (one passage: its doc score does not matter)
    gold_corpus = [_passage(q) for q in questions]
    gold_examples = make_rag_examples(questions, [[i] for i in range(len(questions))], gold_corpus, tok, generator,
                                      1, max_prompt_tokens, max_answer_tokens, 0.0, random.Random(0), {})
    gold_answers = answers(gold_examples, lambda batch: torch.zeros(len(batch), 1))
    ranked_ids = [[corpus[i].id for i in rows] for rows in ranked]
    result = score(questions, open_answers, ranked_ids, gold_answers)
    read = [_student_input(e, "marginalized" if reading == "teacher" else reading) for e in open_examples]
    result.update(context_figures(questions, [tok.decode(sum(rows, []), skip_special_tokens=True) for rows in read],
                                  [sum(len(x) for x in rows) for rows in read]))
    result.update({"reading": reading, "generator_params": count_params(generator),
                   "encoder_params": count_params(question_bert), "seconds_per_question": round(seconds, 4)})
    if answers_out is not None:
        write_answers(answers_out, questions, open_answers, gold_answers, ranked_ids)
    return result


def _passage(question):
    from edgerag.data import Passage

    return Passage(question.passage_id, question.title, question.context)


def stage_eval_teacher(run) -> dict:
    result = evaluate_rag(run, "teacher", run.stage_dir("eval_teacher") / "teacher_answers.jsonl")
    atomic_write_text(run.teacher_result, json.dumps(result, indent=2))
    return {"f1": result["f1"], "f1_gold": result["f1_gold"]}


def stage_eval(run) -> dict:
    from edgerag.evaluation import format_table

    r = run.recipe
    results = {"teacher": json.loads(run.teacher_result.read_text()),
               "student": evaluate_rag(run, "student", run.stage_dir("eval") / "student_answers.jsonl")}
    report = {"dataset": r.data.eval, "n_questions": len(run.questions("eval")), "k": r.eval.k, **results}
    atomic_write_text(run.eval_report, json.dumps(report, indent=2))
    print(format_table(results))
    return {"eval": str(run.eval_report)}


# ---------------------------------------------------------------- the stage table

def stages():
    """The stages of a hf-rag run, named as the default family's are (train.pipeline.STAGES)."""
    from .pipeline import STAGES, Stage, _local, _values

    default = {s.name: s for s in STAGES}
    finetune = lambda r: r.teacher_finetune.enabled  # noqa: E731

    def teacher_outputs(run):
        paths = _rag_paths(run)
        return [paths["passage_encoder"], run.teacher_info] + ([] if run.recipe.teacher_finetune.enabled
                                                               else [paths["rag"], run.teacher_encoder])

    kd = lambda r: {"seed": r.seed, "reading": r.student.reading, "max_answer_tokens": r.prompt.max_answer_tokens,  # noqa: E731
                    **{k: getattr(r.distill_generator, k) for k in ("examples", "k", "gold_probability", "max_prompt_tokens",
                                                                    "temperature", "top_k", "gradient_projections")},
                    "gradient": r.distill_generator.gradient_weight > 0}
    return [
        default["data"],
        Stage("teacher", stage_teacher,
              inputs=lambda run: _local(run.recipe.teacher.rag, run.recipe.teacher.context_encoder),
              outputs=teacher_outputs,
              settings=lambda r: {"teacher": _values(r.teacher), "prompt": _values(r.prompt), "finetune": finetune(r)}),
        Stage("index", stage_index,
              inputs=lambda run: [_rag_paths(run)["passage_encoder"], run.corpus_file],
              outputs=lambda run: [run.index_dir], settings=lambda r: {}),
        Stage("teacher_finetune", stage_teacher_finetune,
              inputs=lambda run: [_rag_paths(run)["base"], run.index_embeddings, run.corpus_file, run.train_file],
              outputs=lambda run: [_rag_paths(run)["rag"], run.teacher_encoder],
              settings=lambda r: {"seed": r.seed, "teacher_finetune": _values(r.teacher_finetune),
                                  "max_answer_tokens": r.prompt.max_answer_tokens},
              enabled=finetune),  # one process: the RAG losses reach into submodules, past DDP's wrapper
        Stage("student_init", stage_student_init,
              inputs=lambda run: [_rag_paths(run)["rag"]], outputs=lambda run: [],
              settings=lambda r: {"student": _values(r.student, "reading")}),
        default["distill_encoder"],
        Stage("student_folder", stage_student_folder,
              inputs=lambda run: [run.student_init_info, _rag_paths(run)["passage_encoder"]],
              outputs=lambda run: [run.student_info, run.student_passage_encoder],
              settings=lambda r: {"reading": r.student.reading, "prompt": _values(r.prompt), "teacher": r.teacher.rag}),
        Stage("teacher_logits", stage_teacher_logits,
              inputs=lambda run: [_rag_paths(run)["rag"], run.teacher_encoder, run.index_embeddings, run.corpus_file,
                                  run.train_file],
              outputs=lambda run: [], settings=kd),
        Stage("distill_generator", stage_distill_generator,
              inputs=lambda run: [run.kd_cache, run.student_init_generator,
                                  *([run.student_encoder] if run.recipe.student.reading == "marginalized" else [])],
              outputs=lambda run: [run.student_generator],
              settings=lambda r: {"seed": r.seed, "distill_generator": _values(r.distill_generator)}),
        Stage("eval_teacher", stage_eval_teacher,
              inputs=lambda run: [_rag_paths(run)["rag"], run.teacher_encoder, run.index_embeddings, run.eval_file,
                                  run.corpus_file],
              outputs=lambda run: [], settings=lambda r: {"eval": _values(r.eval, "questions"), "prompt": _values(r.prompt)}),
        Stage("eval", stage_eval,
              inputs=lambda run: [run.student_encoder, run.student_generator, run.student_info, run.teacher_result,
                                  run.eval_file, run.corpus_file, run.index_embeddings],
              outputs=lambda run: [run.eval_report],
              settings=lambda r: {"eval": _values(r.eval, "questions"), "prompt": _values(r.prompt), "dataset": r.data.eval,
                                  "reading": r.student.reading}),
    ]
