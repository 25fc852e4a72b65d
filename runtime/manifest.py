"""The bundle's manifest: what a bundle directory holds and how to check it.

Shared by the exporter (which writes it) and the runtime (which reads it). A bundle is a
directory with `manifest.json` and the files the manifest lists, each with its SHA-256 and
size. The runtime verifies every file before it loads any of them.

Format version 1, the keys that matter:
  generator.family     "decoder-only" (one ONNX graph with a KV cache, prefill and decode);
                       an "encoder-decoder" family (BART/T5) would add its own file keys under
                       `generator` and a generation loop of its own, without changing the rest.
  prompt               the template pieces (see runtime.prompt) and stop token ids.
  query_encoder        ONNX graph whose output is the pooled, L2-normalized embedding.
  index / passages     hnswlib index (inner product) and the sqlite passage store.
  files                {name: {"sha256", "bytes"}} for every other file in the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SUPPORTED_FAMILIES = ("decoder-only",)


class BundleError(Exception):
    """A bundle that cannot be used: missing, tampered, or of an unknown format."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def bundle_megabytes(manifest: dict) -> float:
    """Size of every file the manifest lists (manifest.json itself aside), in MB."""
    return sum(f["bytes"] for f in manifest["files"].values()) / 1e6


def dump_manifest(manifest: dict) -> bytes:
    """The exact bytes of manifest.json: the body, plus the SHA-256 of the body as its last key.

    The manifest cannot list its own checksum in `files`, so it carries a digest of itself; the
    serialization is deterministic, so a reader can rebuild the bytes and catch any changed byte.
    """
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, indent=2, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return (text[:-2] + f',\n  "manifest_sha256": "{digest}"\n}}\n').encode()


def read_manifest(bundle: str | Path) -> dict:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle}")
    if not path.exists():
        raise BundleError(f"missing file {MANIFEST} in bundle {bundle}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{MANIFEST} in {bundle} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST} in {bundle} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"unknown bundle format version {version!r} in {path} (this edgerag reads version {FORMAT_VERSION}); "
            "re-export the bundle or upgrade edgerag"
        )
    if not isinstance(manifest, dict) or dump_manifest(manifest) != path.read_bytes():
        raise BundleError(f"checksum mismatch for {MANIFEST} in bundle {bundle}: the manifest was changed or damaged")
    family = manifest.get("generator", {}).get("family")
    if family not in SUPPORTED_FAMILIES:
        raise BundleError(f"generator family {family!r} in {path} is not supported by this runtime "
                          f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
    return manifest


def verify(bundle: str | Path, manifest: dict | None = None) -> dict:
    """Check every listed file's size and SHA-256; raise BundleError naming the first bad one."""
    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle)
    files = manifest.get("files")
    if not files:
        raise BundleError(f"{MANIFEST} in {bundle} lists no files")
    for name, record in files.items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"missing file {name} in bundle {bundle}")
        if os.path.getsize(path) != record["bytes"]:
            raise BundleError(f"file {name} in bundle {bundle} has {os.path.getsize(path)} bytes, "
                              f"the manifest says {record['bytes']}: the bundle is damaged or was changed")
        if sha256_file(path) != record["sha256"]:
            raise BundleError(f"checksum mismatch for {name} in bundle {bundle}: the file was changed or damaged")
    return manifest
