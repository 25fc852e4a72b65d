"""A bundle's files damaged on a copy (a byte flipped, cut short) and a manifest of a newer format:
each must be refused, naming the file."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path


def damage(bundle: Path) -> dict:
    """Each file of a bundle copy with one byte flipped, then cut short: every one refused, naming the file;
    and a manifest of a newer format version."""
    from edgerag.runtime import BundleError, Pipeline, read_manifest
    from edgerag.runtime.manifest import MANIFEST, dump_manifest

    names = list(read_manifest(bundle).files) + [MANIFEST]
    refused, missed = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for how in ("flip", "truncate"):
                copy = Path(tmp) / f"{name}-{how}"
                shutil.copytree(bundle, copy)
                path = copy / name
                data = bytearray(path.read_bytes())
                if how == "flip":
                    data[len(data) // 2] ^= 0x01
                else:
                    data = data[:len(data) // 2]
                path.write_bytes(bytes(data))
                try:
                    Pipeline.load(copy)
                    missed.append(f"{name} ({how})")
                except BundleError as e:
                    if name in str(e) or (name == MANIFEST and "manifest" in str(e)):
                        refused += 1
                    else:
                        missed.append(f"{name} ({how}): {e}")
                shutil.rmtree(copy)
        copy = Path(tmp) / "newer"
        shutil.copytree(bundle, copy)
        data = json.loads((copy / MANIFEST).read_text())
        data["format_version"] += 1
        (copy / MANIFEST).write_bytes(dump_manifest(data))
        try:
            Pipeline.load(copy)
            newer = "loaded"
        except BundleError as e:
            newer = str(e)
    return {"damaged_copies": 2 * len(names), "refused_naming_the_file": refused, "missed": missed,
            "newer_version": newer}
