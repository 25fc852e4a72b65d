"""The other runtimes the bundle is measured against, prepared once into a cache directory.

  optimum-ort   Optimum's ORTModelForCausalLM on the bundle's own generator.onnx. Our graph keeps
                Optimum's inputs and outputs, with logits of the last position only, and Optimum's
                generate reads only `logits[:, -1]`, so the graph is used as is: the folder holds
                symlinks to it and its weights beside the generator's config.json.
  ortgenai-*    onnxruntime-genai with its own model builder (int4 or fp32) from the same Hugging
                Face generator. The builder needs a newer transformers than optimum-onnx allows, so
                it runs in a separate venv that sees this venv's packages (torch, onnxruntime, numpy)
                through a .pth file and shadows transformers with its own.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


class Skip(Exception):
    """A system that cannot run here, with the reason (recorded in results.json, never faked)."""


def _key(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:12]


def generator_config(source: str):
    """The generator's transformers config, with an architectures entry the builders recognize."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from edgerag.models import resolve

    src = resolve(source)
    config = AutoConfig.from_pretrained(src.path, **src.kwargs())
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if arch:
        config.architectures = [arch]  # a GGUF config says e.g. LlamaModel
    return config


def optimum_folder(bundle: Path, generator_source: str, cache: Path) -> Path:
    from edgerag.runtime import read_manifest

    manifest = read_manifest(bundle)
    gen = manifest.generator
    # the graph and its weights: two students of one shape can have byte-identical graphs
    digest = hashlib.sha256("".join(manifest.files[n].sha256 for n in (gen.onnx, gen.weights) if n).encode()).hexdigest()[:12]
    out = cache / f"optimum-{digest}"
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    # symlinks to the graph and to its weights: onnxruntime finds the weights beside the link and
    # accepts them because their real path is beside the graph's (hard links would make onnx refuse
    # the bundle's own weights file, which it reads as a possible hard-link attack)
    for source, name in ((gen.onnx, "model.onnx"), (gen.weights, gen.weights)):
        if not source:
            continue
        target = out / name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to((bundle / source).resolve())
    generator_config(generator_source).save_pretrained(out)  # last: config.json says the folder is complete
    return out


def hf_generator_folder(source: str, cache: Path) -> Path:
    """A plain Hugging Face folder (safetensors + config + tokenizer) of the generator, for the builder."""
    from edgerag.models import resolve

    src = resolve(source)
    if not src.gguf_file and (Path(src.path) / "config.json").exists() and (Path(src.path) / "tokenizer.json").exists():
        return Path(src.path)
    out = cache / f"hf-{_key(src)}"
    if (out / "config.json").exists():
        return out
    from edgerag.models import load_generator

    model, tokenizer = load_generator(source)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def genai_python(venv: Path, log) -> Path:
    """The onnxruntime-genai venv's python, created on first use (needs PyPI once)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import onnxruntime_genai"],
                                          capture_output=True).returncode == 0:
        _see_parent_packages(python)
        return python
    base = Path(getattr(sys, "_base_executable", sys.executable))
    log(f"creating the onnxruntime-genai venv in {venv}")
    r = subprocess.run([str(base), "-m", "venv", str(venv)], capture_output=True, text=True)
    if r.returncode:
        raise Skip(f"could not create a venv for onnxruntime-genai: {r.stderr.strip()[-300:]}")
    _see_parent_packages(python)
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "onnxruntime-genai", "transformers>=5"],
                       capture_output=True, text=True)
    if r.returncode:
        raise Skip(f"pip install onnxruntime-genai failed: {r.stderr.strip()[-400:]}")
    return python


def _see_parent_packages(python: Path) -> None:
    """Let the genai venv import this venv's packages (torch, onnxruntime, numpy, edgerag itself).

    They come after the venv's own site-packages, so transformers comes from there. addsitedir, not
    a plain path line, so that the .pth files here run too: an editable edgerag is found through one.
    """
    import site
    import sysconfig

    here = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    there = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    lines = "".join(f"import site; site.addsitedir({path!r})\n" for path in dict.fromkeys(here))
    Path(there, "zz_edgerag_parent.pth").write_text(lines)


def ortgenai_folder(source: str, precision: str, cache: Path, log) -> tuple[Path, Path]:
    """(the genai venv's python, a model-builder output folder) for the generator at `precision`."""
    python = genai_python(cache / "ortgenai-venv", log)
    hf = hf_generator_folder(source, cache)
    out = cache / f"ortgenai-{precision}-{_key(hf.resolve(), precision)}"
    if (out / "genai_config.json").exists():
        return python, out
    log(f"building the onnxruntime-genai {precision} model into {out}")
    logfile = cache / f"{out.name}.log"
    with open(logfile, "w") as f:
        r = subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf),
                            "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache / "ortgenai-build")],
                           stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode or not (out / "genai_config.json").exists():
        tail = logfile.read_text().strip().splitlines()[-1:] or ["no output"]
        raise Skip(f"onnxruntime-genai model builder failed ({precision}): {tail[0][:300]} (log: {logfile})")
    return python, out
