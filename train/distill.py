"""Distillation losses: the student query encoder toward the teacher's embedding space, and the
student generator toward the teacher's next-token distributions on the answer.

Generator KD reads teacher logits from a cache made once (top-k log-probabilities per answer
position at temperature T), so extra epochs never re-run the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .retrieval import embed_batch
from .teacher import Example, target_logits


# ---------------------------------------------------------------- query encoder

def disable_dropout(model) -> None:
    """Distillation matches a deterministic teacher output; dropout would only add noise to the target gap."""
    import torch.nn as nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


@dataclass
class QueryExample:
    text: str
    target: object          # teacher's normalized query embedding (tensor [dim])
    passage: int            # row of the gold passage in the passage-embedding matrix; -1 for a passage text


def encoder_loss_fn(tokenizer, pooling: str, max_length: int, passage_embeddings, mse_weight=1.0, cosine_weight=0.0,
                    contrastive_weight=0.1, temperature=0.05, normalize: bool = True):
    """loss(model, batch): squared distance to the teacher's query embedding (+ 1 - cosine), plus an
    InfoNCE term that ranks the gold passage (teacher's passage embedding) above the other gold
    passages of the batch. The passages stay fixed: the student must fit the teacher's index."""
    import torch
    import torch.nn.functional as F

    def loss_fn(model, batch: list[QueryExample]):
        student = embed_batch(model, tokenizer, [e.text for e in batch], pooling, max_length, normalize)
        target = torch.stack([e.target for e in batch]).to(student.device)
        mse = ((student - target) ** 2).sum(-1).mean()
        cosine = (1 - F.cosine_similarity(student, target, dim=-1)).mean()
        queries = [i for i, e in enumerate(batch) if e.passage >= 0]  # passage texts have no gold passage
        contrastive = student.new_zeros(())
        if queries and contrastive_weight:
            rows = sorted({batch[i].passage for i in queries})
            passages = passage_embeddings[rows].to(student.device)
            labels = torch.tensor([rows.index(batch[i].passage) for i in queries], device=student.device)
            contrastive = F.cross_entropy(student[queries] @ passages.T / temperature, labels)
        loss = mse_weight * mse + cosine_weight * cosine + contrastive_weight * contrastive
        return loss, {"mse": mse.detach(), "contrastive": contrastive.detach()}

    return loss_fn


# ---------------------------------------------------------------- generator

def teacher_cache(teacher, examples: list[Example], pad_id: int, temperature: float, top_k: int, hidden: bool = False,
                  batch_size: int = 4, progress: str | None = None, gradient_projection=None,
                  precision: str = "fp32", checkpoint: Path | None = None, checkpoint_every: int = 25) -> list[dict]:
    """Per example, in the order given: top-k teacher log-probs at temperature T and their token ids, at
    each position that predicts a target token (and the final hidden state there, for hidden-state
    alignment; and with `gradient_projection`, the teacher's projected input gradient, train/gradient.py).
    The teacher reads the examples in batches of similar lengths (little padding), under `precision`.

    `checkpoint`: a file that holds what is cached so far, saved every `checkpoint_every` batches; a
    later call with the same examples and settings starts from it (a killed stage loses at most that
    many batches). One made for other examples or settings is ignored and replaced."""
    import torch
    from tqdm.auto import tqdm

    from . import loop
    from .gradient import token_space_map
    from .teacher import example_length

    out = [None] * len(examples)
    key = _cache_key(teacher, examples, temperature, top_k, hidden, gradient_projection,
                     loop.resolve_precision(precision)) if checkpoint else None
    desc = progress or "teacher cache"
    saved = _read_cache_checkpoint(checkpoint, key, desc) if checkpoint else None
    if saved is not None:
        out = saved
        print(f"[{desc}] resumed: {sum(x is not None for x in out)} of {len(out)} examples cached before, "
              f"from {checkpoint}")
    teacher.eval()
    token_map = token_space_map(teacher, gradient_projection).detach() if gradient_projection is not None else None
    by_length = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
    batches = [by_length[start:start + batch_size] for start in range(0, len(examples), batch_size)]
    todo = [rows for rows in batches if any(out[i] is None for i in rows)]
    device_type = next(teacher.parameters()).device.type
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), desc=progress, disable=progress is None)
    for done, rows in enumerate(todo, 1):
        chunk = [examples[i] for i in rows]
        gradients = None
        with loop.autocast(precision, device_type):
            if token_map is not None:
                logits, _, h, gradients = logits_and_gradients(teacher, chunk, pad_id, hidden, token_map, create_graph=False)
                logits = logits.detach()
            else:
                with torch.no_grad():
                    logits, _, h = target_logits(teacher, chunk, pad_id, hidden)
        # the whole batch at once: per-row softmaxes in torch's worker threads fragmented the heap (160
        # passages of 128 tokens left RSS at 3.8 GB against 1.1 GB; 2,000 ran out of 24 GB)
        top_logp, top_ids = torch.log_softmax(logits.float() / temperature, dim=-1).topk(top_k, dim=-1)
        del logits
        for row, e in enumerate(chunk):
            keep = slice(top_logp.shape[1] - len(e.target), None)
            # clone: a slice would keep the whole batch's top k alive
            item = {"logp": top_logp[row, keep].cpu().clone(), "ids": top_ids[row, keep].to(torch.int32).cpu()}
            if hidden:
                # clone: a view would keep (and save) the whole batch's hidden states
                item["hidden"] = h[row, h.shape[1] - len(e.target):].float().cpu().clone()
            if gradients is not None:
                item["gradient"] = gradients[row].detach().float().cpu().clone()
            out[rows[row]] = item
        bar.update()
        if checkpoint is not None and done % checkpoint_every == 0 and done < len(todo):
            loop.atomic_torch_save({"key": key, "cache": out}, checkpoint)
            if INTERRUPT_AFTER_BATCH is not None and done >= INTERRUPT_AFTER_BATCH:
                raise loop.Interrupted(f"test hook: stopped after batch {done}")
    bar.close()
    return out


# A test hook standing in for a killed process: raise after the checkpoint of this batch.
INTERRUPT_AFTER_BATCH: int | None = None


def _cache_key(teacher, examples: list[Example], temperature, top_k, hidden, gradient_projection, precision) -> str:
    """What a teacher cache depends on: the teacher's weights, its examples and settings."""
    import hashlib

    import torch

    digest = hashlib.sha256(repr((temperature, top_k, hidden, precision)).encode())
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    for e in examples:
        digest.update(repr((e.question_id, list(e.prompt), list(e.target))).encode())
    if gradient_projection is not None:
        digest.update(gradient_projection.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _read_cache_checkpoint(path: Path, key: str, desc: str) -> list | None:
    """The cache saved so far under `key`, or None (no file, one that does not read, or another key's)."""
    from .loop import read_checkpoint

    saved = read_checkpoint(path, desc, keys=("key", "cache"))
    if saved is None:
        return None
    if saved["key"] != key:
        print(f"[{desc}] checkpoint {path} was made for other examples or settings; starting again")
        return None
    return saved["cache"]


def logits_and_gradients(model, examples: list[Example], pad_id: int, hidden: bool, token_map, create_graph: bool):
    """target_logits (logits, labels, hidden states), and from the same forward pass each example's
    projected input gradient of its answer's log-likelihood, [prompt + target, m] (train/gradient.py)."""
    import torch

    from .gradient import input_embeddings, project
    from .teacher import collate

    inner = getattr(model, "module", model)  # DDP's wrapper has no embedding table of its own
    ids, mask, _, _ = collate(examples, pad_id, next(inner.parameters()).device)
    embeds = input_embeddings(inner, ids, create_graph)
    with torch.enable_grad():
        logits, labels, h = target_logits(model, examples, pad_id, hidden, inputs_embeds=embeds)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        answer_loglik = logprobs.masked_fill(labels < 0, 0.0).sum()  # rows do not interact: one backward for all
        grad, = torch.autograd.grad(answer_loglik, embeds, create_graph=create_graph)
    projected = project(grad, mask, token_map)
    return logits, labels, h, [projected[row, ids.shape[1] - len(e.prompt) - len(e.target):] for row, e in enumerate(examples)]


@dataclass
class KDExample:
    example: Example
    cache: dict


def remap_kd_examples(examples: list[KDExample], mapping: dict[int, int],
                      respell: Callable[[list[int]], list[int]] | None = None) -> list[KDExample]:
    """Examples in the teacher's token ids -> the student's (a trimmed vocabulary). A prompt with a
    token the student lacks is spelled again by `respell` (teacher ids -> the student's tokenization of
    their text: how the device will read that prompt); without it, or where the answer needs such a
    token, the example is left out. A cached teacher token the student lacks keeps its slot with a
    log-probability of -1e4: its mass joins "everything else" in the KL."""
    import torch

    table = torch.full((max(mapping) + 1,), -1, dtype=torch.long)
    table[torch.tensor(list(mapping))] = torch.tensor(list(mapping.values()))
    out = []
    for kd in examples:
        e = kd.example
        prompt, target = [mapping.get(i) for i in e.prompt], [mapping.get(i) for i in e.target]
        if None in target:
            continue
        if None in prompt:
            if respell is None:
                continue
            prompt = respell(e.prompt)
        teacher_ids = kd.cache["ids"].long()
        inside = teacher_ids < len(table)
        student_ids = torch.where(inside, table[teacher_ids.clamp(max=len(table) - 1)], -1)
        missing = student_ids < 0
        cache = {**kd.cache, "ids": student_ids.clamp(min=0).to(torch.int32),
                 "logp": kd.cache["logp"].masked_fill(missing, -1e4)}
        out.append(KDExample(Example(e.question_id, prompt, target), cache))
    return out


class Respelling:
    """Teacher ids -> the student tokenizer's ids for the same text (special tokens kept as such);
    `count`: how many it has spelled."""

    def __init__(self, teacher_tokenizer, student_tokenizer):
        self.teacher, self.student = teacher_tokenizer.backend_tokenizer, student_tokenizer.backend_tokenizer
        self.count = 0

    def __call__(self, ids: list[int]) -> list[int]:
        self.count += 1
        text = self.teacher.decode(ids, skip_special_tokens=False)
        return self.student.encode(text, add_special_tokens=False).ids


def generator_loss_fn(pad_id: int, temperature: float, alpha: float, hidden_weight: float = 0.0,
                      gradient_weight: float = 0.0, gradient_projection=None):
    """alpha * CE(target) + (1 - alpha) * T^2 * KL(teacher || student) (+ hidden-state MSE) (+ gradient
    matching against the cached teacher input gradients, train/gradient.py).

    The KL is taken over k + 1 outcomes: the teacher's top-k tokens and "everything else", with the
    student's probabilities of the same k tokens and of the rest. That is exact for the coarsened
    distributions (a lower bound of the full KL) and, unlike renormalizing over the top k, does not
    push the student to pile the teacher's tail mass onto the top k.
    """
    import torch
    import torch.nn.functional as F

    def loss_fn(model, batch: list[KDExample]):
        examples = [b.example for b in batch]
        if gradient_weight > 0:
            from .gradient import token_space_map

            token_map = token_space_map(getattr(model, "module", model), gradient_projection)
            logits, labels, h, grads = logits_and_gradients(model, examples, pad_id, hidden_weight > 0, token_map,
                                                            create_graph=True)
        else:
            logits, labels, h = target_logits(model, examples, pad_id, hidden_weight > 0)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)
        kl_sum, hid_sum, n = 0.0, 0.0, 0
        # one softmax for the batch (rows right-aligned): per-row ones fragment the heap (see teacher_cache)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        for row, b in enumerate(batch):
            t = len(b.example.target)
            kl_sum = kl_sum + kl_to_topk(logp[row, logp.shape[1] - t:], b.cache)
            if hidden_weight > 0:
                hid_sum = hid_sum + ((h[row, h.shape[1] - t:].float() - b.cache["hidden"].to(h.device)) ** 2).mean(-1).sum()
            n += t
        kl = kl_sum / n * temperature ** 2
        loss = alpha * ce + (1 - alpha) * kl
        parts = {"ce": ce.detach(), "kl": kl.detach()}
        if hidden_weight > 0:
            hid = hid_sum / n
            loss = loss + hidden_weight * hid
            parts["hidden"] = hid.detach()
        if gradient_weight > 0:
            from .gradient import matching_loss

            matching = matching_loss(grads, [b.cache["gradient"] for b in batch])
            loss = loss + gradient_weight * matching
            parts["gradient"] = matching.detach()
        return loss, parts

    return loss_fn


def kl_to_topk(student_logprobs, cache: dict):
    """KL(teacher || student) summed over positions, over the teacher's cached top-k tokens and
    "everything else" (see generator_loss_fn). student_logprobs: [positions, vocab], at the cache's
    temperature; cache: {"logp", "ids"} [positions, k]."""
    log_q = student_logprobs.gather(-1, cache["ids"].long().to(student_logprobs.device))
    log_p = cache["logp"].to(student_logprobs.device)
    return (log_p.exp() * (log_p - log_q)).sum() + _rest_kl(log_p, log_q)


def _rest_kl(log_p, log_q):
    """p_rest * log(p_rest / q_rest), summed over positions, for the mass outside the top k."""
    import torch

    p_rest = (1 - log_p.exp().sum(-1)).clamp(min=1e-6)
    q_rest = (1 - log_q.exp().sum(-1)).clamp(min=1e-6)
    return (p_rest * (torch.log(p_rest) - torch.log(q_rest))).sum()


def kl_teacher_student(teacher, student, examples: list[Example], pad_id: int, temperature: float = 1.0) -> float:
    """Mean full-vocabulary KL(teacher || student) over answer positions: the distillation's target."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            lt = torch.log_softmax(target_logits(teacher, [e], pad_id)[0][0].float() / temperature, -1)
            ls = torch.log_softmax(target_logits(student, [e], pad_id)[0][0].float() / temperature, -1)
            total += float((lt.exp() * (lt - ls)).sum())
            n += len(e.target)
    return total / max(n, 1)
