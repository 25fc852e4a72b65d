"""The `edgerag` command.

Device subcommands (`ask`, `serve`, `verify`, `add`, `remove`, `sync`, `eval` of a bundle) run on
the base install. Workstation subcommands (`export`, `distill`, `eval` of a model folder, `bench`)
need the `[train]` extra and say so in one line when it is missing. Every subcommand is defined here, from modules that
import nothing heavy, so `edgerag --help` lists all of them on any install.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys

WORKSTATION_MODULES = ("torch", "transformers", "optimum", "onnx")
EXTRAS = {"train": WORKSTATION_MODULES + ("accelerate", "gguf", "safetensors", "tqdm", "onnx_ir"),
          "bench": ("psutil", "matplotlib"),
          "serve": ("starlette", "uvicorn")}


class MissingExtra(Exception):
    pass


def require_workstation(command: str) -> None:
    missing = [m for m in WORKSTATION_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"`edgerag {command}` needs the workstation extra ({', '.join(missing)} missing): "
                           "pip install 'edgerag[train]' (with torch==2.13.0 for the CPU wheel)")


def cmd_ask(args) -> int:
    from edgerag.runtime import Pipeline

    pipeline = Pipeline.load(args.bundle, threads=args.threads, check=not args.no_verify, prompt_lookup=args.prompt_lookup,
                             answers=args.answers, abstain_threshold=args.abstain_threshold, budget=args.budget)
    if args.question is not None:
        questions = [args.question]
    else:
        questions = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for question in questions:
        if args.json:
            answer = pipeline.ask(question, k=args.k, max_new_tokens=args.max_new_tokens)
            print(json.dumps(answer.to_record()), flush=True)
            continue
        stream = pipeline.stream(question, k=args.k, max_new_tokens=args.max_new_tokens)
        while True:
            try:
                print(next(stream), end="", flush=True)
            except StopIteration as done:
                answer = done.value
                break
        if answer.abstained:
            print(f"(no answer: the passages do not seem to hold one; confidence {answer.confidence:.3f}, "
                  f"threshold {pipeline.abstain_threshold:.3f})", end="")
        print()
        for c in answer.citations:
            print(f"  source: {c['title']} ({c['passage_id']}): {c['sentence']}")
        if answer.answer and not answer.supported:
            print("  source: none: the answer appears nowhere in what the generator read")
        for rank, p in enumerate(answer.passages, start=1):
            print(f"  [{rank}] {p['title']} ({p['id']}, score {p['score']:.3f})")
        t = answer.timings
        print(f"  encode {t['encode_ms']:.1f} ms · search {t['search_ms']:.2f} ms · prefill {t.get('prefill_ms', 0):.0f} ms"
              f" ({answer.prompt_tokens} tokens) · decode {t.get('decode_ms', 0):.0f} ms ({answer.new_tokens} tokens,"
              f" {t.get('decode_steps', 0)} steps after the prefill's, {answer.tokens_per_second:.1f} tok/s)"
              f" · total {t['total_ms']:.0f} ms")
    return 0


def cmd_serve(args) -> int:
    from edgerag.runtime.serve import ServeOptions, serve

    options = ServeOptions(**{k: getattr(args, k) for k in ("host", "port", "threads", "concurrency", "max_queue",
                                                           "api_key", "timeout_s", "prompt_lookup", "answers",
                                                           "abstain_threshold")})
    serve(args.bundle, options)
    return 0


def cmd_verify(args) -> int:
    from edgerag.runtime.manifest import verify

    manifest = verify(args.bundle)
    print(f"{args.bundle}: {len(manifest.files)} files verified, {manifest.megabytes:.1f} MB")
    return 0


def cmd_documents(args) -> int:
    """edgerag add / remove / sync: the bundle's documents, changed on the device."""
    from edgerag.runtime.corpus import ChangeOptions, add_documents, remove_documents, sync_documents

    options = ChangeOptions(max_tokens=args.max_tokens, overlap_sentences=args.overlap_sentences,
                            compact_share=args.compact_share)
    if args.command == "add":
        change = add_documents(args.bundle, args.paths, options)
    elif args.command == "remove":
        change = remove_documents(args.bundle, args.sources, options)
    else:
        change = sync_documents(args.bundle, args.folder, options)
    for line in change.lines():
        print(line)
    # skipping some files is not a failure; skipping all of them, with nothing in the bundle already, is
    kept = change.changed or (change.unchanged and args.command != "remove")
    return 1 if change.skipped and not kept else 0


def cmd_export(args) -> int:
    require_workstation("export")
    from edgerag.export import ExportOptions
    from edgerag.export.bundle import export_bundle
    from edgerag.models import calibration_questions, folder_models, passage_encoder_folder, read_calibration, read_info
    from edgerag.runtime.manifest import read_manifest

    # a bad line fails here, before any model loads (a run's teacher learned to abstain too, and has no file of its own)
    given_calibration = read_calibration(args.calibration) if args.calibration else None
    if args.model_folder:
        if args.query_encoder or args.generator:
            raise ValueError("give either a model folder or --query-encoder/--generator, not both")
        query_encoder, generator = folder_models(args.model_folder)
        folder_passages = passage_encoder_folder(args.model_folder)
        args.passage_encoder = args.passage_encoder or (str(folder_passages) if folder_passages else None)
        info = read_info(args.model_folder)
        # an encoder-decoder student says how its passages were embedded and how long a context it read
        passage_format = info.get("passage_format")
        max_prompt_tokens = info.get("max_prompt_tokens") if info.get("family") == "encoder-decoder" else None
        compression = info.get("compression")  # a student that reads a compressed context
        calibration = calibration_questions(args.model_folder)  # a student that learned to abstain
    else:
        if not (args.query_encoder and args.generator):
            raise ValueError("export needs a model folder (with query_encoder/ and generator/) "
                             "or both --query-encoder and --generator")
        query_encoder, generator = args.query_encoder, args.generator
        passage_format = max_prompt_tokens = compression = calibration = None
        info = {}
    calibration = given_calibration or calibration
    options = ExportOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExportOptions)
                               if f.metadata.get("cli", True)})
    if args.model_folder and "k" in info and options.k == ExportOptions.k:
        options.k = info["k"]  # the passages per question the student was trained to read, unless --k says otherwise
    if args.model_folder and info.get("reading") == "marginalized" and options.k != 1:
        raise ValueError(f"{args.model_folder} reads one passage at a time, marginalized (student.reading); the device "
                         "concatenates its passages, which for one passage is exactly that student's input: pass --k 1")
    out = export_bundle(query_encoder, generator, args.passages, args.out, args.passage_encoder, options,
                        passage_format, max_prompt_tokens, compression, calibration)
    manifest = read_manifest(out)
    print(f"bundle written to {out} ({manifest.megabytes:.1f} MB, {manifest.passages.count} passages)")
    print(json.dumps(manifest.parity, indent=2))
    return 0


def cmd_distill(args) -> int:
    require_workstation("distill")
    from edgerag.train.driver import distill

    distill(args.recipe, args.out, resume=args.resume, seed_from=args.seed_from, stop_after=args.stop_after)
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from edgerag.evaluation import evaluate_model
    from edgerag.metrics import format_table
    from edgerag.runtime.manifest import MANIFEST

    if not (Path(args.model) / MANIFEST).exists():
        require_workstation("eval")  # a model folder runs in torch; a bundle needs the base install only
    if args.answers and not (Path(args.model) / MANIFEST).exists():
        raise ValueError("--answers applies to a bundle; a model folder answers with its own tokens")
    if not 0.0 <= args.unanswerable < 1.0:
        raise ValueError(f"--unanswerable is a share of the questions, from 0 to below 1, not {args.unanswerable}")
    if args.budget is not None and not (Path(args.model) / MANIFEST).exists():
        raise ValueError("--budget applies to a bundle (a model folder reads the compression its recipe set)")
    if (args.unanswerable or args.abstain_threshold is not None) and not (Path(args.model) / MANIFEST).exists():
        raise ValueError("--unanswerable and --abstain-threshold apply to a bundle (a run's eval stage scores its "
                         "teacher and student on unanswerable questions: [eval] unanswerable in the recipe)")
    from edgerag.runtime.prompt import check_threshold

    check_threshold(args.abstain_threshold)
    result = evaluate_model(args.model, args.questions, args.corpus, args.n, args.k, answers=args.answers,
                            unanswerable=args.unanswerable, abstain_threshold=args.abstain_threshold, budget=args.budget)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(format_table({Path(args.model).name or "model": result}))
    return 0


def add_options(parser: argparse.ArgumentParser, options_class) -> None:
    """One flag per field of an options dataclass (--block-size for block_size), its default and help from the field."""
    for f in dataclasses.fields(options_class):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: %(default)s)"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", default=f.default, help=f.metadata.get("help"))
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"), help=help_text)


BUDGET_HELP = ("a bundle's compressed context: tokens of piece text read (default: the bundle's, which its student "
               "was distilled on)")


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
    ask.add_argument("--prompt-lookup", type=int, default=None,
                     help="tokens drafted per decode step from the prompt (prompt lookup; default: the runtime's, 0: none)")
    ask.add_argument("--no-verify", action="store_true", help="skip the checksum check at load")
    ask.add_argument("--answers", choices=("spans", "free"), default=None,
                     help="spans: every answer a span of the context read; free: the generator's own tokens "
                          "(default: the bundle's setting)")
    ask.add_argument("--abstain-threshold", type=float, default=None,
                     help="abstain where an answer's confidence is below it, 0 to 1 (default: the bundle's; 0: never)")
    ask.add_argument("--budget", type=int, default=None, help=BUDGET_HELP)
    ask.set_defaults(func=cmd_ask)

    srv = sub.add_parser("serve", help="answer over HTTP: /v1/ask, OpenAI's /v1/chat/completions (device; extra [serve])")
    srv.add_argument("bundle")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only; any other needs --api-key)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    srv.add_argument("--prompt-lookup", type=int, default=None,
                     help="tokens drafted per decode step from the prompt (prompt lookup; default: the runtime's, 0: none)")
    srv.add_argument("--concurrency", type=int, default=1, help="answers computed at once (default: %(default)s)")
    srv.add_argument("--max-queue", type=int, default=8, help="requests waiting beyond those; more get 503 (default: %(default)s)")
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    srv.add_argument("--timeout", dest="timeout_s", type=float, default=60.0, help="each request's deadline in seconds")
    srv.add_argument("--answers", choices=("spans", "free"), default=None,
                     help="spans: every answer a span of the context read; free: the generator's own tokens "
                          "(default: the bundle's setting)")
    srv.add_argument("--abstain-threshold", type=float, default=None,
                     help="abstain where an answer's confidence is below it, 0 to 1 (default: the bundle's; 0: never)")
    srv.set_defaults(func=cmd_serve)

    check = sub.add_parser("verify", help="check a bundle's files against its manifest (device)")
    check.add_argument("bundle")
    check.set_defaults(func=cmd_verify)

    for name, what in (("add", "add files and folders of .txt, .md, .html, .pdf to a bundle (device)"),
                       ("remove", "remove a bundle's documents by source (device)"),
                       ("sync", "make a bundle's documents those of a folder: add, replace, remove (device)")):
        docs = sub.add_parser(name, help=what)
        docs.add_argument("bundle")
        if name == "add":
            docs.add_argument("paths", nargs="+", help="files and folders; a document's source is its path in the "
                              "folder given, or its name for a file given itself")
        elif name == "remove":
            docs.add_argument("sources", nargs="+", help="sources as `add` printed them; a folder removes all under it")
        else:
            docs.add_argument("folder")
        docs.add_argument("--max-tokens", type=int, default=None,
                          help="a passage's most tokens (default: 192, less where the passage encoder reads fewer)")
        docs.add_argument("--overlap-sentences", type=int, default=1,
                          help="sentences a passage repeats from the one before, where they fit in half its budget "
                               "(default: %(default)s)")
        docs.add_argument("--compact-share", type=float, default=0.25,
                          help="rebuild the index once removed passages' slots pass this share (default: %(default)s)")
        docs.set_defaults(func=cmd_documents)

    from edgerag.export import ExportOptions  # the package's top level imports nothing heavy

    exp = sub.add_parser("export", help="query encoder + generator + passages -> bundle (workstation)")
    exp.add_argument("model_folder", nargs="?", help="a run's student/ or teacher/ folder")
    exp.add_argument("--query-encoder", help="folder, hub id or .gguf")
    exp.add_argument("--generator", help="folder, hub id or .gguf")
    exp.add_argument("--passage-encoder", help="embed passages with this encoder (default: the folder's, or the query encoder)")
    exp.add_argument("--passages", required=True, nargs="+",
                     help="JSONL (id, title, text) or SQuAD JSON, optionally .gz; or files and folders of documents "
                          "(.txt, .md, .html, .pdf), cut into passages")
    exp.add_argument("--out", required=True)
    exp.add_argument("--calibration", metavar="JSONL",
                     help="held-in questions to fit an abstention threshold on, for a generator that learned to abstain "
                          "but whose folder names none: a run's fine-tuned teacher, with the run's "
                          "student/calibration.jsonl (default: the folder's own, if any)")
    add_options(exp, ExportOptions)
    exp.set_defaults(func=cmd_export)

    d = sub.add_parser("distill", help="distill the teacher into a student: RUN/student, RUN/eval.json (workstation)")
    d.add_argument("recipe", help="recipe TOML (see recipes/)")
    d.add_argument("--out", required=True, help="run folder")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    d.add_argument("--stop-after", metavar="STAGE", help="stop once this stage is done (e.g. teacher_finetune, to time "
                   "or check one stage; --resume goes on from there)")
    d.add_argument("--seed-from", metavar="RUN", help="reuse this run's finished stages whose inputs and settings match "
                   "(its teacher, index, fine-tuning, cached teacher logits, ...)")
    d.set_defaults(func=cmd_distill)

    e = sub.add_parser("eval", help="evaluate a bundle (device) or a teacher/student folder (workstation)")
    e.add_argument("model", help="a bundle (manifest.json), or a folder with query_encoder/ and generator/")
    e.add_argument("--questions", required=True, help="SQuAD-format questions (e.g. xquad-en.json.gz)")
    e.add_argument("--corpus", default=None, help="retrieval corpus (SQuAD or JSONL); default: the questions' passages")
    e.add_argument("--n", type=int, default=None, help="evaluate a seeded sample of N questions")
    e.add_argument("--k", type=int, default=None,
                   help="passages retrieved per question (default: the model's own; 3 for a model that does not say)")
    e.add_argument("--out", required=True, help="where to write the metrics JSON")
    e.add_argument("--answers", choices=("spans", "free"), default=None,
                   help="a bundle's answers: spans of the context read, or free (default: the bundle's setting)")
    e.add_argument("--unanswerable", type=float, default=0.0, metavar="SHARE",
                   help="pair this share of the questions with passages that cannot answer them, and report "
                        "SQuAD 2.0's figures (abstention) and the answers' citations (default: 0)")
    e.add_argument("--abstain-threshold", type=float, default=None,
                   help="a bundle's abstention threshold, 0 to 1 (default: the bundle's)")
    e.add_argument("--budget", type=int, default=None, help=BUDGET_HELP)
    e.set_defaults(func=cmd_eval)

    from edgerag.benchmarks.bench import add_cli as add_bench  # its top level imports nothing heavy

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
        known = {"BundleError", "PromptError", "DataError", "RecipeError", "RunError", "FileNotFoundError",
                 "FileExistsError", "IsADirectoryError", "NotADirectoryError", "PermissionError", "ValueError",
                 "NotImplementedError"}
        if not any(c.__name__ in known for c in type(e).__mro__):  # by name: their modules may not be importable
            raise
        print(f"edgerag: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
