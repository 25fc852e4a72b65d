"""The manifest is a typed, versioned contract: read, validated and written through runtime.manifest."""

import json
import shutil

import pytest

from edgerag.runtime import BundleError, Pipeline
from edgerag.runtime.manifest import MANIFEST, Manifest, dump_manifest, read_manifest

# The keys of format version 1, as every bundle before the typed manifest was written: a bundle
# exported then must still load, so the typed manifest writes and reads exactly this layout.
VERSION_1_KEYS = {
    "": {"format", "format_version", "created_unix", "versions", "sources", "query_encoder", "generator", "prompt",
         "generation", "index", "passages", "parity", "export_seconds", "files", "manifest_sha256"},
    "query_encoder": {"onnx", "tokenizer", "pooling", "normalized", "max_length", "dim", "quantization", "parameters",
                      "graph_optimization"},
    "generator": {"family", "onnx", "tokenizer", "model_type", "num_layers", "hidden_size", "vocab_size", "parameters",
                  "max_context", "logits", "graph", "quantization", "graph_optimization"},
    "prompt": {"template", "stop_token_ids", "truncation"},
    "generation": {"strategy", "k", "max_new_tokens"},
    "index": {"file", "library", "space", "dim", "count", "M", "ef_construction", "ef", "passage_format"},
    "passages": {"file", "count", "table"},
}


def _rewrite(bundle, tmp_path, change):
    """A copy of the bundle whose manifest.json is changed by `change(dict)` and re-signed."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / MANIFEST).read_text())
    change(data)
    (copy / MANIFEST).write_bytes(dump_manifest(data))
    return copy


def test_written_manifest_keeps_the_version_1_layout(tiny_bundle):
    data = json.loads((tiny_bundle / MANIFEST).read_text())
    for section, keys in VERSION_1_KEYS.items():
        assert set(data[section] if section else data) >= keys, section


def test_a_bundle_written_before_the_typed_manifest_still_loads(tiny_bundle, tmp_path):
    """Keys added since (with defaults) are absent from older bundles; such a bundle loads and answers."""
    def old_layout(data):
        for section, keys in VERSION_1_KEYS.items():
            holder = data[section] if section else data
            for key in set(holder) - keys:
                del holder[key]
    copy = _rewrite(tiny_bundle, tmp_path, old_layout)
    pipeline = Pipeline.load(copy)
    assert pipeline.manifest.generation.repetition_window == 16
    assert pipeline.ask("Which team won Super Bowl 50?", max_new_tokens=3).passages


def test_typed_round_trip_is_byte_exact(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    assert isinstance(manifest, Manifest)
    assert manifest.to_bytes() == (tiny_bundle / MANIFEST).read_bytes()
    assert manifest.megabytes == sum(f.stat().st_size for f in tiny_bundle.iterdir() if f.name != MANIFEST) / 1e6


@pytest.mark.parametrize("section,key", [("generator", "onnx"), ("index", "ef"), ("", "prompt")])
def test_missing_key_is_named(tiny_bundle, tmp_path, section, key):
    copy = _rewrite(tiny_bundle, tmp_path, lambda d: (d[section] if section else d).pop(key))
    with pytest.raises(BundleError, match=f"missing key '{section + '.' if section else ''}{key}'"):
        Pipeline.load(copy)


def test_wrong_type_is_named(tiny_bundle, tmp_path):
    copy = _rewrite(tiny_bundle, tmp_path, lambda d: d["index"].update(count="many"))
    with pytest.raises(BundleError, match="index.count must be int"):
        read_manifest(copy)


def test_newer_format_version_is_refused_with_what_to_do(tiny_bundle, tmp_path):
    copy = _rewrite(tiny_bundle, tmp_path, lambda d: d.update(format_version=2))
    with pytest.raises(BundleError, match=r"version 2 .*reads version 1.*re-export"):
        Pipeline.load(copy)


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd", "sub/generator.onnx", ".."])
def test_file_names_cannot_leave_the_bundle(tiny_bundle, tmp_path, name):
    def change(d):
        d["files"][name] = d["files"].pop("generator.onnx")
    copy = _rewrite(tiny_bundle, tmp_path, change)
    with pytest.raises(BundleError, match="not a plain file name"):
        read_manifest(copy)


def test_symlink_out_of_the_bundle_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    outside = tmp_path / "elsewhere.onnx"
    (copy / "generator.onnx").rename(outside)
    (copy / "generator.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        Pipeline.load(copy)


def test_unknown_keys_are_ignored(tiny_bundle, tmp_path):
    copy = _rewrite(tiny_bundle, tmp_path, lambda d: d["generator"].update(added_later={"a": 1}))
    assert read_manifest(copy).generator.onnx == "generator.onnx"
