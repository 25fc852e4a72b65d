"""The `edgerag` command.

Device subcommands (`ask`, `verify`, `eval` of a bundle) run on the base install. Workstation
subcommands (`export`, `distill`, `eval` of a model folder, `bench`) need the `[train]` extra
and say so in one line when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

WORKSTATION_MODULES = ("torch", "transformers", "optimum", "onnx")
EXTRAS = {"train": WORKSTATION_MODULES + ("accelerate", "gguf", "safetensors", "tqdm", "onnx_ir"),
          "bench": ("psutil", "matplotlib")}


class MissingExtra(Exception):
    pass


def require_workstation(command: str) -> None:
    missing = [m for m in WORKSTATION_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"`edgerag {command}` needs the workstation extra ({', '.join(missing)} missing): "
                           "pip install 'edgerag[train]' (with torch==2.13.0 for the CPU wheel)")


def cmd_ask(args) -> int:
    from runtime import Pipeline

    pipeline = Pipeline.load(args.bundle, threads=args.threads, check=not args.no_verify)
    if args.question is not None:
        questions = [args.question]
    else:
        questions = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for question in questions:
        if args.json:
            answer = pipeline.ask(question, k=args.k, max_new_tokens=args.max_new_tokens)
            print(json.dumps(_record(answer)), flush=True)
            continue
        stream = pipeline.stream(question, k=args.k, max_new_tokens=args.max_new_tokens)
        while True:
            try:
                print(next(stream), end="", flush=True)
            except StopIteration as done:
                answer = done.value
                break
        print()
        for rank, p in enumerate(answer.passages, start=1):
            print(f"  [{rank}] {p['title']} ({p['id']}, score {p['score']:.3f})")
        t = answer.timings
        print(f"  encode {t['encode_ms']:.1f} ms · search {t['search_ms']:.2f} ms · prefill {t.get('prefill_ms', 0):.0f} ms"
              f" ({answer.prompt_tokens} tokens) · decode {t.get('decode_ms', 0):.0f} ms ({answer.new_tokens} tokens,"
              f" {answer.tokens_per_second:.1f} tok/s) · total {t['total_ms']:.0f} ms")
    return 0


def _record(answer) -> dict:
    return {"question": answer.question, "answer": answer.answer, "passages": answer.passages,
            "timings": {k: round(v, 3) for k, v in answer.timings.items()},
            "prompt_tokens": answer.prompt_tokens, "new_tokens": answer.new_tokens,
            "tokens_per_second": round(answer.tokens_per_second, 2)}


def cmd_verify(args) -> int:
    from runtime.manifest import bundle_megabytes, verify

    manifest = verify(args.bundle)
    print(f"{args.bundle}: {len(manifest['files'])} files verified, {bundle_megabytes(manifest):.1f} MB")
    return 0


def cmd_export(args) -> int:
    require_workstation("export")
    from export.bundle import ExportOptions, export_bundle, student_folder_models
    from train.evaluate import passage_encoder_folder

    if args.model_folder:
        if args.query_encoder or args.generator:
            raise ValueError("give either a model folder or --query-encoder/--generator, not both")
        query_encoder, generator = student_folder_models(args.model_folder)
        folder_passages = passage_encoder_folder(args.model_folder)
        args.passage_encoder = args.passage_encoder or (str(folder_passages) if folder_passages else None)
    else:
        if not (args.query_encoder and args.generator):
            raise ValueError("export needs a model folder (with query_encoder/ and generator/) "
                             "or both --query-encoder and --generator")
        query_encoder, generator = args.query_encoder, args.generator
    options = ExportOptions(quantize=args.quantize, quantize_encoder=args.quantize_encoder,
                            block_size=args.block_size, accuracy_level=args.accuracy_level, k=args.k,
                            max_new_tokens=args.max_new_tokens, max_context=args.max_context,
                            hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef=args.ef,
                            overwrite=args.overwrite, graph=args.graph)
    out = export_bundle(query_encoder, generator, args.passages, args.out, args.passage_encoder, options)
    from runtime.manifest import bundle_megabytes, read_manifest

    manifest = read_manifest(out)
    size = bundle_megabytes(manifest)
    print(f"bundle written to {out} ({size:.1f} MB, {manifest['passages']['count']} passages)")
    print(json.dumps(manifest["parity"], indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgerag", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer questions from a bundle (device)")
    ask.add_argument("bundle")
    ask.add_argument("question", nargs="?", help="omit to read one question per line from stdin")
    ask.add_argument("--json", action="store_true", help="one JSON record per question")
    ask.add_argument("-k", type=int, default=None, help="passages to retrieve (default: the bundle's)")
    ask.add_argument("--max-new-tokens", type=int, default=None)
    ask.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ask.add_argument("--no-verify", action="store_true", help="skip the checksum check at load")
    ask.set_defaults(func=cmd_ask)

    check = sub.add_parser("verify", help="check a bundle's files against its manifest (device)")
    check.add_argument("bundle")
    check.set_defaults(func=cmd_verify)

    from export import DEFAULTS, QUANTIZATIONS  # the package's top level imports nothing heavy

    exp = sub.add_parser("export", help="query encoder + generator + passages -> bundle (workstation)")
    exp.add_argument("model_folder", nargs="?", help="a run's student/ or teacher/ folder")
    exp.add_argument("--query-encoder", help="folder, hub id or .gguf")
    exp.add_argument("--generator", help="folder, hub id or .gguf")
    exp.add_argument("--passage-encoder", help="embed passages with this encoder (default: the query encoder)")
    exp.add_argument("--passages", required=True, help="JSONL (id, title, text) or SQuAD JSON, optionally .gz")
    exp.add_argument("--out", required=True)
    exp.add_argument("--quantize", choices=("auto",) + QUANTIZATIONS, default=DEFAULTS["quantize"],
                     help="generator quantization (default: auto = int8sq for the fused Llama graph, int8wo otherwise)")
    exp.add_argument("--quantize-encoder", choices=[q for q in QUANTIZATIONS if q != "int8sq"],
                     default=DEFAULTS["quantize_encoder"])
    exp.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size")
    exp.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy level (4: int8 compute)")
    exp.add_argument("-k", type=int, default=3, help="default passages per question")
    exp.add_argument("--max-new-tokens", type=int, default=32)
    exp.add_argument("--max-context", type=int, default=2048)
    exp.add_argument("--hnsw-m", type=int, default=32)
    exp.add_argument("--ef-construction", type=int, default=200)
    exp.add_argument("--ef", type=int, default=64)
    exp.add_argument("--graph", choices=("auto", "fused", "optimum"), default="auto",
                     help="generator graph: onnxruntime's fused operators for Llama-family models (auto: where the model allows), or Optimum's trace")
    exp.add_argument("--overwrite", action="store_true")
    exp.set_defaults(func=cmd_export)

    try:
        from train.pipeline import add_cli
    except ImportError:
        add_cli = None
    if add_cli is not None:
        add_cli(sub)
    try:
        from benchmarks.bench import add_cli as add_bench
    except ImportError:
        add_bench = None
    if add_bench is not None:
        add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except MissingExtra as e:
        print(f"edgerag: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = next((x for x, modules in EXTRAS.items() if (e.name or "").split(".")[0] in modules), None)
        if extra is None:
            raise
        print(f"edgerag: `edgerag {args.command}` needs the {extra} extra ({e.name} missing): "
              f"pip install 'edgerag[{extra}]'", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line for users; EDGERAG_DEBUG=1 shows the traceback
        import os

        if os.environ.get("EDGERAG_DEBUG"):
            raise
        known = ("BundleError", "PromptError", "DataError", "RecipeError", "FileNotFoundError",
                 "FileExistsError", "ValueError", "NotImplementedError")
        if type(e).__name__ not in known:
            raise
        print(f"edgerag: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
