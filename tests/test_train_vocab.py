"""Vocabulary trimming: a smaller embedding and tokenizer that read the corpus exactly as before."""

import json

import pytest

torch = pytest.importorskip("torch")

from edgerag.train.distill import KDExample, Respelling, remap_kd_examples  # noqa: E402
from edgerag.models import load_generator  # noqa: E402
from edgerag.train.teacher import Example  # noqa: E402
from edgerag.train.tiny import make_tiny_generator  # noqa: E402
from edgerag.train.vocab import id_map, trim_vocabulary  # noqa: E402

SEEN = ["The Broncos defeated the Panthers to win Super Bowl 50.",
        "Normans came from Normandy, a region in France.",
        "Question: Who won Super Bowl 50?"]
UNSEEN = ["Photosynthesis converts sunlight into chemical energy in chloroplasts.",
          "Quantum chromodynamics describes the strong interaction."]


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen") / "generator"
    make_tiny_generator(folder, (SEEN + UNSEEN) * 20, vocab_size=420)
    return folder


def tokens(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_trimmed_model_and_tokenizer_read_the_kept_texts_exactly(tiny_generator, tmp_path):
    teacher, t_tok = load_generator(tiny_generator)
    student, s_tok = load_generator(tiny_generator)
    info = trim_vocabulary(student, s_tok, SEEN)
    assert info["vocab_size"] < info["vocab_size_before"] == len(t_tok)
    assert student.config.vocab_size == info["vocab_size"] == len(s_tok)
    assert student.get_output_embeddings().weight.shape[0] == info["vocab_size"]

    # saved and reloaded with no code of ours
    student.save_pretrained(tmp_path / "s")
    s_tok.save_pretrained(tmp_path / "s")
    assert not (tmp_path / "s" / "tokenizer.model").exists()
    student, s_tok = load_generator(tmp_path / "s")

    mapping = id_map(t_tok, s_tok)
    for text in SEEN:
        assert tokens(s_tok, text) == tokens(t_tok, text)
        t_ids = t_tok(text, add_special_tokens=False)["input_ids"]
        s_ids = s_tok(text, add_special_tokens=False)["input_ids"]
        assert s_ids == [mapping[i] for i in t_ids]
        with torch.no_grad():
            t_logits = teacher(input_ids=torch.tensor([t_ids])).logits[0]
            s_logits = student(input_ids=torch.tensor([s_ids])).logits[0]
        kept = torch.tensor(sorted(mapping))  # teacher ids in the student's order (the order is kept)
        assert torch.allclose(s_logits, t_logits[:, kept], atol=1e-5)
    for text in UNSEEN:  # dropped tokens: spelled with smaller pieces, still the same text
        ids = s_tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > len(t_tok(text, add_special_tokens=False)["input_ids"])
        assert s_tok.decode(ids) == text
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(student.config, name) == mapping[getattr(teacher.config, name)]
        assert s_tok.convert_ids_to_tokens(getattr(student.config, name)) == \
            t_tok.convert_ids_to_tokens(getattr(teacher.config, name))


def test_same_vocabulary_needs_no_map(tiny_generator):
    _, tok = load_generator(tiny_generator)
    _, other = load_generator(tiny_generator)
    assert id_map(tok, other) is None


def test_kd_examples_move_to_the_student_ids(tiny_generator):
    _, t_tok = load_generator(tiny_generator)
    student, s_tok = load_generator(tiny_generator)
    trim_vocabulary(student, s_tok, SEEN[:2])
    mapping = id_map(t_tok, s_tok)
    seen = t_tok(SEEN[0], add_special_tokens=False)["input_ids"]
    unseen = t_tok(UNSEEN[0], add_special_tokens=False)["input_ids"]
    dropped = next(i for i in unseen if i not in mapping)
    cache = {"logp": torch.log(torch.tensor([[0.5, 0.3, 0.1]])), "ids": torch.tensor([[seen[0], dropped, seen[1]]], dtype=torch.int32)}
    examples = [KDExample(Example("a", seen[:-1], seen[-1:]), cache),
                KDExample(Example("b", seen, unseen[:1] if unseen[0] not in mapping else [dropped]), cache)]
    out = remap_kd_examples(examples, mapping)
    assert [kd.example.question_id for kd in out] == ["a"]  # b's answer needs a token the student lacks
    kd = out[0]
    assert kd.example.prompt == [mapping[i] for i in seen[:-1]] and kd.example.target == [mapping[seen[-1]]]
    assert kd.cache["ids"].tolist() == [[mapping[seen[0]], 0, mapping[seen[1]]]]
    assert kd.cache["logp"][0, 1] < -1e3 and torch.allclose(kd.cache["logp"][0, [0, 2]], cache["logp"][0, [0, 2]])


def test_a_prompt_with_a_token_the_student_lacks_is_spelled_in_the_students_tokens(tiny_generator):
    _, t_tok = load_generator(tiny_generator)
    student, s_tok = load_generator(tiny_generator)
    trim_vocabulary(student, s_tok, SEEN)
    mapping = id_map(t_tok, s_tok)
    prompt = t_tok(SEEN[2] + "\n" + UNSEEN[0], add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
    answer = t_tok(" Broncos", add_special_tokens=False)["input_ids"]
    assert any(i not in mapping for i in prompt) and all(i in mapping for i in answer)
    cache = {"logp": torch.zeros((len(answer), 1)), "ids": torch.tensor([[answer[0]]] * len(answer), dtype=torch.int32)}
    example = KDExample(Example("a", prompt, answer), cache)
    assert remap_kd_examples([example], mapping) == []  # without a way to spell it: left out, as before
    [kd] = remap_kd_examples([example], mapping, Respelling(t_tok, s_tok))
    assert kd.example.prompt == s_tok(SEEN[2] + "\n" + UNSEEN[0], add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id]
    assert s_tok.decode(kd.example.prompt) == t_tok.decode(prompt)
    assert kd.example.target == [mapping[i] for i in answer]   # the answer, which the cache lines up with, is as it was


def test_the_vocabulary_keeps_what_a_compressed_context_starts_with(tiny_generator):
    """A compressed context may start a passage's text at any sentence: "Normans came ...", where the
    passage itself has " Normans". Its tokens are kept, so the student reads it as the teacher does."""
    from edgerag.runtime.compress import split_pieces
    from edgerag.runtime.prompt import CHATML_COMPACT
    from edgerag.train.decoder_only_stages import passage_texts

    _, t_tok = load_generator(tiny_generator)
    student, s_tok = load_generator(tiny_generator)
    title, text = "Normandy", "The people called Normans ruled. Normans came from Normandy, a region in France."
    piece = split_pieces(text)[1]
    assert tokens(t_tok, piece)[0] == "Normans" and "Normans" not in tokens(t_tok, text)  # a token of its own
    trim_vocabulary(student, s_tok, passage_texts(title, text))
    for read in (piece, CHATML_COMPACT["passage"].format(title=title)):
        assert tokens(s_tok, read) == tokens(t_tok, read)


def test_trimming_refuses_a_non_bpe_tokenizer(tiny_generator):
    from tokenizers import Tokenizer, models

    student, tok = load_generator(tiny_generator)
    tok._tokenizer = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="BPE"):
        trim_vocabulary(student, tok, ["a"])
    assert json.loads(tok.backend_tokenizer.to_str())["model"]["type"] == "WordLevel"
