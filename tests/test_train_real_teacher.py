"""The real packaged teacher (MiniLM-L6 + SmolLM2-135M from its GGUF) through the evaluation code.

About a minute, most of it de-quantizing the GGUF and converting its tokenizer.
"""

import json

import pytest

torch = pytest.importorskip("torch")

from train.data import data_path, read_squad  # noqa: E402
from train.evaluate import evaluate_folder, read_info  # noqa: E402
from train.sources import DEFAULT_GENERATOR, DEFAULT_QUERY_ENCODER, load_encoder, load_generator, write_sentence_transformers_config  # noqa: E402
from train.teacher import Prompter  # noqa: E402
from train.tiny import write_squad_subset  # noqa: E402


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
    return folder


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
