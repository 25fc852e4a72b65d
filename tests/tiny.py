"""Tiny random models with real tokenizers, built in seconds, for the fast test suite.

The generator is a 2-layer Llama (grouped KV heads, tied embeddings, like SmolLM2) and the
encoder a 2-layer BERT with a sentence-transformers pooling config. Their tokenizers are
trained here on the test corpus with the `tokenizers` library.
"""

from __future__ import annotations

import json
from pathlib import Path

TOPICS = [
    ("Super Bowl 50", "Super Bowl 50 was an American football game. The Denver Broncos defeated the Carolina Panthers 24 to 10 at Levi's Stadium in Santa Clara."),
    ("Nikola Tesla", "Nikola Tesla was a Serbian American inventor and engineer best known for the alternating current electricity supply system."),
    ("Amazon rainforest", "The Amazon rainforest covers most of the Amazon basin of South America, seven million square kilometres of which five are covered by forest."),
    ("Warsaw", "Warsaw is the capital and largest city of Poland. It stands on the Vistula River in east central Poland."),
    ("Oxygen", "Oxygen is a chemical element with symbol O and atomic number 8. It is a member of the chalcogen group on the periodic table."),
    ("Normans", "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France."),
    ("Steam engine", "A steam engine is a heat engine that performs mechanical work using steam as its working fluid."),
    ("Black Death", "The Black Death was the deadliest pandemic recorded in human history, killing up to two hundred million people in Eurasia."),
    ("Victoria", "Victoria is a state in the south east of Australia. Melbourne is its capital and most populous city."),
    ("Jacksonville", "Jacksonville is the most populous city in Florida, and the largest city by area in the contiguous United States."),
    ("Geology", "Geology is an earth science concerned with the solid Earth, the rocks of which it is composed, and the processes by which they change."),
    ("Pharmacy", "Pharmacy is the science and technique of preparing, dispensing, and reviewing drugs and providing additional clinical services."),
]

QUESTIONS = [
    ("Which team won Super Bowl 50?", "Denver Broncos", 0),
    ("What system is Tesla known for?", "alternating current", 1),
    ("What is the capital of Poland?", "Warsaw", 3),
    ("What is the atomic number of oxygen?", "8", 4),
]


def write_corpus(folder: Path) -> tuple[Path, Path]:
    """(passages.jsonl, questions in SQuAD JSON) for the topics above."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "passages.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"t{i}", "title": t, "text": x}) + "\n" for i, (t, x) in enumerate(TOPICS)))
    articles = []
    for i, (title, text) in enumerate(TOPICS):
        qas = [{"id": f"q{n}", "question": q, "answers": [{"text": a, "answer_start": text.find(a)}]}
               for n, (q, a, p) in enumerate(QUESTIONS) if p == i]
        articles.append({"title": title, "paragraphs": [{"context": text, "qas": qas}]})
    squad = folder / "squad.json"
    squad.write_text(json.dumps({"version": "1.1", "data": articles}))
    return jsonl, squad


def _corpus_lines() -> list[str]:
    return [f"{t}: {x}" for t, x in TOPICS] + [q for q, _, _ in QUESTIONS] + ["Context: Question: Answer the question"]


def build_generator(folder: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus_lines() * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id)
    model = LlamaForCausalLM(config)
    # random init gives near-uniform logits, so greedy ties would make parity tests flaky
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def build_encoder(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0, pooling: str = "mean") -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from train.sources import write_sentence_transformers_config

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus_lines(), trainers.WordPieceTrainer(
        vocab_size=500, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2,
                        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128)
    model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    write_sentence_transformers_config(folder, pooling, 64, hidden)
    return folder
