"""Tiny random teacher models and data files, for tests and for smoke-testing a recipe in seconds.

`make_tiny_generator` trains a small byte-level BPE tokenizer (with the ChatML special tokens, so the
prompt template is the real one) and a 4-layer Llama; `make_tiny_encoder` is a 2-layer BERT with
the packaged MiniLM tokenizer. Both are saved as Hugging Face folders the pipeline loads by path.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_generator(folder, texts, vocab_size: int = 400, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_encoder(folder, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from .sources import DEFAULT_QUERY_ENCODER, resolve, write_sentence_transformers_config

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_QUERY_ENCODER).path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                        initializer_range=0.2)  # larger than BERT's 0.02, so random embeddings are not all alike
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_sentence_transformers_config(folder, "mean", 128, hidden)
    return folder


def write_squad_subset(source, target, articles: int = 2, paragraphs: int = 3, questions: int = 3) -> Path:
    """The first few articles/paragraphs/questions of a SQuAD file, as a gzipped SQuAD file."""
    with gzip.open(source, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    data = []
    for article in doc["data"][:articles]:
        paras = [{"context": p["context"], "qas": p["qas"][:questions]} for p in article["paragraphs"][:paragraphs]]
        data.append({"title": article["title"], "paragraphs": paras})
    target = Path(target)
    with gzip.open(target, "wt", encoding="utf-8") as f:
        json.dump({"version": "subset", "data": data}, f)
    return target


TINY_RECIPE = """seed = 0
[data]
train = "{folder}/train.json.gz"
eval = "{folder}/eval.json.gz"
[teacher]
query_encoder = "{folder}/encoder"
generator = "{folder}/generator"
[teacher_finetune]
examples = 16
k = 2
batch_size = 4
lr = 1e-3
max_prompt_tokens = 256
[student]
layers = [0, 3]
intermediate_size = 64
kv_heads = 1
encoder_layers = 1
calibration_passages = 4
[distill_encoder]
queries = 24
passages = 8
batch_size = 8
lr = 1e-3
[distill_general]
passages = 12
chunk_tokens = 48
epochs = 3
batch_size = 4
lr = 1e-3
hidden_weight = 0.1
[distill_generator]
examples = 16
batch_size = 4
lr = 1e-3
max_prompt_tokens = 256
hidden_weight = 0.1
seq_kd = true
[eval]
k = 2
batch_size = 8
[prompt]
max_answer_tokens = 8
[run]
checkpoint_every = 2
threads = 1
"""


def make_tiny_project(folder, data_dir=None) -> dict:
    """Tiny train/eval files (cut from the real ones), a tiny teacher, and a recipe that uses them."""
    from .data import DEFAULT_DATA_DIR, read_squad

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    train = write_squad_subset(data_dir / "squad-v1.1-train.json.gz", folder / "train.json.gz", 3, 4, 3)
    write_squad_subset(data_dir / "xquad-en.json.gz", folder / "eval.json.gz", 2, 3, 2)
    passages, questions, _ = read_squad(train)
    texts = ([p.text for p in passages] + [q.question for q in questions] + [a for q in questions for a in q.answers]
             + ["Answer the question with a short answer taken from the context.\nContext:\nQuestion:"])
    # Text the project never uses, so the tokenizer has tokens a trimmed vocabulary can drop.
    unused, _, _ = read_squad(write_squad_subset(data_dir / "squad-v1.1-train.json.gz", folder / "unused.json.gz", 8, 4, 1))
    texts += [p.text for p in unused[12:]]
    make_tiny_generator(folder / "generator", texts, vocab_size=600)
    make_tiny_encoder(folder / "encoder")
    recipe = folder / "recipe.toml"
    recipe.write_text(TINY_RECIPE.format(folder=folder.as_posix()))
    return {"folder": folder, "recipe": recipe, "train": train, "eval": folder / "eval.json.gz",
            "generator": folder / "generator", "encoder": folder / "encoder"}
