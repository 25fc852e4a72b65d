"""Where a bundle's resident memory comes from: RSS after each part of loading it, one part at a time.

    python -m edgerag.benchmarks.load_memory BUNDLE [--threads 2]

Loads, in a fresh process, what `Pipeline.load` loads, in its order, and prints the resident memory
(anonymous and file-backed) and the high-water mark after each part, then after a first answer.
`edgerag bench` reports the whole pipeline's RSS by stage; this says which part holds what.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgerag.benchmarks.worker import status_mb


def memory() -> dict:
    fields = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    return {name: status_mb(field) for field, name in fields.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--question", default="Which NFL team represented the AFC at Super Bowl 50?")
    args = parser.parse_args(argv)
    rows = [("start", memory())]

    from tokenizers import Tokenizer

    from edgerag.runtime import Pipeline, read_manifest
    from edgerag.runtime import make_session, return_freed_memory

    rows.append(("imports", memory()))
    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    parts = {}
    parts["query encoder"] = make_session(bundle / manifest.query_encoder.onnx, args.threads)
    rows.append(("+ query encoder session", memory()))
    parts["tokenizer"] = Tokenizer.from_file(str(bundle / manifest.generator.tokenizer))
    rows.append(("+ generator tokenizer", memory()))
    return_freed_memory()
    rows.append(("  freed heap returned", memory()))
    parts["generator"] = make_session(bundle / manifest.generator.onnx, args.threads)
    rows.append(("+ generator session", memory()))
    parts.clear()
    return_freed_memory()
    rows.append(("all released", memory()))
    pipeline = Pipeline.load(bundle, threads=args.threads)
    rows.append(("Pipeline.load (verified)", memory()))
    pipeline.ask(args.question)
    rows.append(("first answer", memory()))
    print(f"| step | RSS MB | anonymous | file-backed | peak so far |\n|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['rss']:.0f} | {m['anon']:.0f} | {m['file']:.0f} | {m['peak']:.0f} |")
    print(json.dumps(dict(rows)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
