"""Trim a generator's vocabulary to the tokens its texts use: a smaller embedding and LM head.

SmolLM2's tied embedding is 49,152 x 576 = 28M parameters whatever the depth, and the LM head is a
large share of each decoded token. A RAG model only ever reads its corpus, its questions and the
prompt template, and writes answers taken from passages, so most of those rows are never used.

The trimmed model is an ordinary Hugging Face model with a smaller `vocab_size`, and its tokenizer
an ordinary byte-level BPE with a smaller vocabulary: export and the device need nothing new.

How the tokenizer stays exact: a token is kept with every token its merges are built from, and a
merge is kept only if it builds a kept token. Every text whose tokens were all kept then tokenizes
exactly as before (a merge that fired on it built a kept token or one of its parts). A text with a
token that was dropped, such as a new question with a rare word, still tokenizes: BPE stops one
merge earlier and spells the word with smaller kept pieces, down to single bytes, which are always
kept.
"""

from __future__ import annotations

import json


def used_token_ids(tokenizer, texts) -> set[int]:
    """Ids of every token in the tokenizations of `texts` (no special tokens added)."""
    ids: set[int] = set()
    texts = list(texts)
    for start in range(0, len(texts), 1024):
        for row in tokenizer(texts[start:start + 1024], add_special_tokens=False)["input_ids"]:
            ids.update(row)
    return ids


def _merge_parts(model_json: dict) -> dict[str, list[str]]:
    """Token -> the tokens of every merge that builds it (usually one merge)."""
    parts: dict[str, list[str]] = {}
    for merge in model_json["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        parts.setdefault(left + right, []).extend((left, right))
    return parts


def kept_tokens(tokenizer_json: dict, used_ids: set[int]) -> set[str]:
    """Token strings to keep: those used, every token they are merged from, all single characters
    (the byte alphabet that spells anything), byte-fallback tokens and every added/special token."""
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"vocabulary trimming supports BPE tokenizers; this one is {model.get('type')!r}")
    id_to_token = {i: t for t, i in model["vocab"].items()}
    parts = _merge_parts(model)
    keep = {t for t in model["vocab"] if len(t) == 1}
    if model.get("byte_fallback"):  # <0x41>-style byte tokens spell what the merges cannot
        keep |= {t for t in model["vocab"] if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
    keep |= {a["content"] for a in tokenizer_json.get("added_tokens", []) if a["content"] in model["vocab"]}
    stack = [id_to_token[i] for i in used_ids if i in id_to_token]
    while stack:
        token = stack.pop()
        if token in keep and token not in parts:
            continue
        if token not in keep:
            keep.add(token)
        stack.extend(parts.pop(token, ()))
    return keep


def trimmed_tokenizer_json(tokenizer_json: dict, keep: set[str]) -> tuple[dict, dict[int, int]]:
    """(new tokenizer.json, old id -> new id). New ids keep the old order, so low ids such as the
    special tokens keep their numbers when everything below them is kept."""
    tj = json.loads(json.dumps(tokenizer_json))
    model = tj["model"]
    old_ids = sorted(i for t, i in model["vocab"].items() if t in keep)
    old_to_new = {old: new for new, old in enumerate(old_ids)}
    model["vocab"] = {t: old_to_new[i] for t, i in model["vocab"].items() if t in keep}
    merges = []
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if left + right in keep and left in keep and right in keep:
            merges.append(merge)
    model["merges"] = merges
    for added in tj.get("added_tokens", []):
        if added["id"] not in old_to_new:
            raise ValueError(f"added token {added['content']!r} is outside the BPE vocabulary; cannot renumber it")
        added["id"] = old_to_new[added["id"]]
    _renumber_post_processor(tj.get("post_processor"), old_to_new)
    return tj, old_to_new


def _renumber_post_processor(node, old_to_new) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list) and all(isinstance(i, int) for i in value):
                node[key] = [old_to_new[i] for i in value]
            else:
                _renumber_post_processor(value, old_to_new)
    elif isinstance(node, list):
        for item in node:
            _renumber_post_processor(item, old_to_new)


def trim_vocabulary(model, tokenizer, texts) -> dict:
    """Cut `model`'s embedding (and an untied LM head) and `tokenizer` to the tokens `texts` use.
    Both change in place; returns what was done, for the report."""
    import torch
    import torch.nn as nn
    from tokenizers import Tokenizer

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("vocabulary trimming needs a fast (tokenizer.json) tokenizer")
    before = model.get_input_embeddings().weight.shape[0]
    used = used_token_ids(tokenizer, texts)
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    keep = kept_tokens(tokenizer_json, used)
    new_json, old_to_new = trimmed_tokenizer_json(tokenizer_json, keep)
    rows = torch.tensor(sorted(old_to_new), dtype=torch.long)

    embedding = model.get_input_embeddings()
    new_embedding = nn.Embedding(len(rows), embedding.weight.shape[1], dtype=embedding.weight.dtype)
    new_embedding.weight.data.copy_(embedding.weight.data[rows])
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
    model.set_input_embeddings(new_embedding)
    if head is not None:
        if tied:
            head.weight = new_embedding.weight
        else:
            head.weight = nn.Parameter(head.weight.data[rows].clone())
            if head.bias is not None:
                head.bias = nn.Parameter(head.bias.data[rows].clone())
        head.out_features = len(rows)
    model.config.vocab_size = len(rows)
    for config in (model.config, getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id"):
            value = getattr(config, name, None) if config is not None else None
            if isinstance(value, int):
                setattr(config, name, old_to_new[value])
            elif isinstance(value, list):
                setattr(config, name, [old_to_new[v] for v in value])

    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(new_json))
    tokenizer.vocab_file = None  # a slow-tokenizer file would describe the old vocabulary
    return {"vocab_size_before": before, "vocab_size": len(rows), "tokens_used": len(used)}


def id_map(teacher_tokenizer, student_tokenizer) -> dict[int, int] | None:
    """Teacher id -> student id where the vocabularies differ (tokens matched by string); None where
    they are the same, so callers can skip the mapping."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return None
    return {i: student_vocab[t] for t, i in teacher_vocab.items() if t in student_vocab}
