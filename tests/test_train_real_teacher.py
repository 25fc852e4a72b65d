"""The real packaged teacher (MiniLM-L6 + SmolLM2-135M from its GGUF) through the evaluation code.

About a minute, most of it de-quantizing the GGUF and converting its tokenizer.
"""

import json

import pytest

torch = pytest.importorskip("torch")

from edgerag.data import data_path, read_squad  # noqa: E402
from edgerag.models import read_info  # noqa: E402
from edgerag.train.folder_eval import evaluate_folder  # noqa: E402
from edgerag.model_files import DEFAULT_GENERATOR, DEFAULT_QUERY_ENCODER, write_sentence_transformers_config  # noqa: E402
from edgerag.models import load_encoder, load_generator  # noqa: E402
from edgerag.train.teacher import Prompter  # noqa: E402
from edgerag.train.tiny import write_squad_subset  # noqa: E402


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    encoder, tok, pooling, max_length = load_encoder(DEFAULT_QUERY_ENCODER)
    encoder.save_pretrained(folder / "query_encoder")
    tok.save_pretrained(folder / "query_encoder")
    write_sentence_transformers_config(folder / "query_encoder", pooling, max_length, encoder.config.hidden_size)
    generator, gen_tok = load_generator(DEFAULT_GENERATOR)
    # The prompt must be ChatML for SmolLM2, and encoding must not add the GGUF tokenizer's BOS.
    prompter = Prompter(gen_tok, 512)
    assert prompter.template.answer_end == "<|im_end|>"
    assert prompter.encode("Hello")[0] != gen_tok.bos_token_id
    generator.save_pretrained(folder / "generator")
    gen_tok.save_pretrained(folder / "generator")
    # the GGUF's tokenizer must not drag a copy of the whole .gguf along as tokenizer.model
    assert not (folder / "generator" / "tokenizer.model").exists()
    return folder


@pytest.mark.slow  # about 100 s with its fixture: the real SmolLM2 loaded, fine-tuned a step and evaluated
def test_real_teacher_retrieves_and_answers(teacher_folder, tmp_path):
    subset = write_squad_subset(data_path("xquad-en.json.gz"), tmp_path / "x.json.gz", articles=2, paragraphs=5, questions=1)
    passages, questions, _ = read_squad(subset)
    questions = questions[:6]
    result = evaluate_folder(teacher_folder, questions, passages, k=2, answers_out=tmp_path / "answers.jsonl")
    rows = [json.loads(l) for l in (tmp_path / "answers.jsonl").read_text().splitlines()]
    print(json.dumps(rows, indent=1)[:3000], result)
    assert read_info(teacher_folder) == {}
    # MiniLM ranks the gold paragraph first among ten for most of these questions
    assert result["recall@5"] >= 80.0
    assert result["recall@1"] >= 50.0
    # answers are stopped at <|im_end|> and are short text, not the prompt echoed back
    for r in rows:
        assert "<|im_end|>" not in r["answer_gold"] and len(r["answer_gold"]) < 200
    assert result["f1_gold"] > 0.0
    assert result["generator_params"] == 134_515_008
    assert result["encoder_params"] == 22_713_216


def test_real_smollm2_vocabulary_trim(teacher_folder):
    """SmolLM2's tokenizer and tied embedding cut to a few passages' tokens: those passages read the same."""
    from edgerag.train.vocab import id_map, trim_vocabulary

    passages, questions, _ = read_squad(data_path("xquad-en.json.gz"))
    texts = [p.text for p in passages[:20]]
    teacher, t_tok = load_generator(teacher_folder / "generator")
    student, s_tok = load_generator(teacher_folder / "generator")
    info = trim_vocabulary(student, s_tok, texts + [Prompter(t_tok, 512).template.prefix])
    assert info["vocab_size"] < 49_152 / 4 and student.config.vocab_size == len(s_tok) == info["vocab_size"]
    mapping = id_map(t_tok, s_tok)
    for text in texts:
        t_ids = t_tok(text, add_special_tokens=False)["input_ids"]
        assert s_tok(text, add_special_tokens=False)["input_ids"] == [mapping[i] for i in t_ids]
    with torch.no_grad():
        ids = t_tok(texts[0], add_special_tokens=False)["input_ids"][:64]
        t_logits = teacher(input_ids=torch.tensor([ids])).logits[0]
        s_logits = student(input_ids=torch.tensor([[mapping[i] for i in ids]])).logits[0]
    assert torch.allclose(s_logits, t_logits[:, torch.tensor(sorted(mapping))], atol=1e-4)
    for q in questions[-5:]:  # questions from other articles: spelled with the kept pieces, same text
        assert s_tok.decode(s_tok(q.question, add_special_tokens=False)["input_ids"]) == q.question
