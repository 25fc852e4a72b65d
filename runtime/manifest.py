"""The bundle's manifest: the typed, versioned contract between the exporter and the device.

A bundle is a directory with `manifest.json` and the files the manifest lists, each with its
SHA-256 and size. The exporter writes the manifest through `Manifest.write`, every reader gets
it from `read_manifest` (or `Pipeline.load`) as the dataclasses below and uses attributes; no
other code indexes its JSON. The runtime verifies every file before it returns a loaded bundle (and
every file but the graphs' weights before it parses any: see Pipeline.load).

Format version 1 (every bundle edgerag has written so far):
  query_encoder   ONNX graph whose output is the pooled, L2-normalized embedding; its tokenizer.
  generator       family "decoder-only": one ONNX graph with a KV cache for prefill and decode.
                  family "encoder-decoder" (BART students of RAG checkpoints): `onnx` is the encoder
                  graph (it emits the cross-attention K/V), `decoder_onnx` the decoder graph that
                  serves the first and the cached steps; max_context counts encoder tokens.
                  A new family adds its own generation loop in runtime.loading.GENERATORS.
  prompt          the template pieces (see runtime.prompt) and stop token ids.
  generation      defaults: passages per question (k), new tokens, and the repetition_window
                  over which a looping answer is cut (added within version 1; older bundles get 16),
                  and answers: "spans" (each a span of the context read) or "free" (older bundles).
  index/passages  hnswlib index (inner product) and the sqlite passage store; an index label is
                  the passage's store row. Within version 1, a corpus changed on the device
                  (runtime.corpus) gets index.labels (labels used so far) and index.deleted (slots of
                  removed passages still in the file), and the store's passages a source and their
                  character offsets in it, with a table of documents.
  passage_encoder optional (added within version 1): the graph that embeds passages, where it is not
                  the query encoder; absent, the query encoder embeds them.
  compression     optional (added within version 1): a student that reads a compressed context
                  (runtime.compress). `file` holds every passage's piece vectors as raw little-endian
                  arrays: offsets [passages + 1] (int64, index row order), a scale per piece (float32),
                  the vectors [pieces, index.dim] (int8); with the budget, the passages whose pieces
                  compete, and the selector's weights.
                  A bundle without it answers from the full top-k passages.
  abstention      optional (added within version 1): a generator that learned to answer NO_ANSWER
                  (runtime.prompt) where its context holds no answer. `token_ids` are the tokens that
                  answer may begin with; an answer's confidence is 1 minus their probability at the first step
                  (`confidence` "no_answer", what bundles without the key mean), or that times the geometric
                  mean of the probabilities of the answer's tokens, its end included ("answer"). Below
                  `threshold` (fitted at export on held-in questions) the bundle abstains.
                  A bundle without it always answers.
  files           {name: {"sha256", "bytes"}} for every other file in the bundle.
  sources, parity, versions, created_unix, export_seconds: how it was made, for people.
Keys a reader does not know are ignored, so a newer exporter may add some within a version; a
change that an older reader would misread raises FORMAT_VERSION, and such a bundle is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from edgerag.runtime.prompt import PromptTemplate

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SUPPORTED_FAMILIES = ("decoder-only", "encoder-decoder")
ANSWER_KINDS = ("spans", "free")


class BundleError(Exception):
    """A bundle that cannot be used: missing, tampered, or of an unknown format."""


@dataclass
class FileRecord:
    sha256: str
    bytes: int


class _Quantized:
    quantization: dict

    @property
    def quantization_method(self) -> str:
        return self.quantization.get("method", "none")


@dataclass
class QueryEncoderSpec(_Quantized):
    onnx: str
    tokenizer: str
    pooling: str
    max_length: int
    dim: int
    normalized: bool = True
    parameters: int | None = None
    quantization: dict = field(default_factory=dict)
    graph_optimization: str = "none"
    weights: str = ""                       # the graph's weights, outside it (memory-mapped); "": inside


# generator graphs whose attention (GroupQueryAttention) appends to a KV cache buffer in place
KV_IN_PLACE_GRAPHS = ("fused-llama",)
# a generator input, with a default of 1, that asks for the logits of that many last positions;
# graphs that have it are described as LOGITS_LAST_POSITIONS
LOGITS_TO_KEEP = "logits_to_keep"
LOGITS_LAST_POSITIONS = "last positions (logits_to_keep)"


@dataclass
class GeneratorSpec(_Quantized):
    family: str
    onnx: str
    tokenizer: str
    max_context: int
    model_type: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    parameters: int | None = None
    logits: str = "last-position"
    graph: str = ""
    quantization: dict = field(default_factory=dict)
    graph_optimization: str = "none"
    decoder_onnx: str = ""                  # encoder-decoder: the decoder graph
    decoder_start_token_id: int = -1        # encoder-decoder: the decoder's first input
    forced_bos_token_id: int | None = None  # encoder-decoder: fed after it, where the model forces one
    decoder_positions: int = 0              # encoder-decoder: decoder positions, start tokens and answer (0: unknown)
    weights: str = ""                       # the graph's weights, outside it (memory-mapped); "": inside


@dataclass
class PromptSpec:
    template: PromptTemplate
    stop_token_ids: list[int]
    truncation: str = "passages first, lowest-ranked first; then the question's tail"


@dataclass
class GenerationSpec:
    k: int
    max_new_tokens: int
    strategy: str = "greedy"
    repetition_window: int = 16       # cut an answer whose last N tokens repeat one block (0: never)
    answers: str = "free"             # "spans": an answer is a span of the context read (runtime.generation.SpanConstraint)


@dataclass
class IndexSpec:
    file: str
    dim: int
    count: int
    M: int
    ef_construction: int
    ef: int                           # hnswlib does not save the query-time ef
    labels: int = 0                   # labels (passage store rows) used so far: below it (0: count)
    deleted: int = 0                  # slots of removed passages, marked deleted, in the index file
    library: str = "hnswlib"
    space: str = "ip"
    passage_format: str = "{title}: {text}"


@dataclass
class PassagesSpec:
    file: str
    count: int
    table: str = "passages"


@dataclass
class CompressionSpec:
    file: str
    passages: int
    budget: int
    selector: dict
    pieces: int
    max_piece_words: int = 48

    def settings(self):
        from edgerag.runtime.compress import Compression

        return Compression.from_dict({"passages": self.passages, "budget": self.budget, "selector": self.selector,
                                      "max_piece_words": self.max_piece_words})


@dataclass
class AbstentionSpec:
    no_answer: str                    # the text the generator learned to write (runtime.prompt.NO_ANSWER)
    token_ids: list[int]              # the tokens it may begin with (runtime.prompt.no_answer_token_ids)
    threshold: float                  # abstain where the confidence is below it, in [0, 1]
    fitted: dict = field(default_factory=dict)  # how the threshold was chosen: questions, figures
    # "no_answer": 1 - P(NO_ANSWER) at the first step; "answer": that, times the geometric mean of the
    # probabilities of the answer's tokens (its end included), known once the answer is written
    confidence: str = "no_answer"


CONFIDENCE_KINDS = ("no_answer", "answer")


@dataclass
class Manifest:
    query_encoder: QueryEncoderSpec
    generator: GeneratorSpec
    prompt: PromptSpec
    generation: GenerationSpec
    index: IndexSpec
    passages: PassagesSpec
    compression: CompressionSpec | None = None
    passage_encoder: QueryEncoderSpec | None = None   # where passages are embedded otherwise than questions
    abstention: AbstentionSpec | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created_unix: int = 0
    export_seconds: float = 0.0
    format: str = "edgerag-bundle"
    format_version: int = FORMAT_VERSION

    @property
    def megabytes(self) -> float:
        """Size of every file the manifest lists (manifest.json itself aside), in MB."""
        return sum(f.bytes for f in self.files.values()) / 1e6

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST) -> "Manifest":
        """Build and check the typed manifest; a missing key or a wrong type is a BundleError naming it."""
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise BundleError(
                f"unknown bundle format version {version!r} in {where} (this edgerag reads version {FORMAT_VERSION}); "
                "re-export the bundle with this edgerag, or upgrade edgerag to read it")
        manifest = _build(cls, data, "", where)
        if manifest.generator.family not in SUPPORTED_FAMILIES:
            raise BundleError(f"generator family {manifest.generator.family!r} in {where} is not supported by this "
                              f"runtime (supported: {', '.join(SUPPORTED_FAMILIES)})")
        if manifest.generator.family == "encoder-decoder" and (not manifest.generator.decoder_onnx
                                                               or manifest.generator.decoder_start_token_id < 0):
            raise BundleError(f"{where}: an encoder-decoder generator needs generator.decoder_onnx and "
                              "generator.decoder_start_token_id")
        for name in manifest.files:
            # a listed file must sit in the bundle folder itself: no paths, no way out of it
            if not _plain_name(name):
                raise BundleError(f"{where} lists the file {name!r}, which is not a plain file name in the bundle")
        for key, name in manifest.named_files().items():
            if name not in manifest.files:
                raise BundleError(f"{where}: {key} is {name!r}, which is not among the bundle's listed files")
        at_least = {"query_encoder.max_length": (manifest.query_encoder.max_length, 1),
                    "query_encoder.dim": (manifest.query_encoder.dim, 1),
                    "generator.max_context": (manifest.generator.max_context, 2),
                    "generation.k": (manifest.generation.k, 1),
                    "generation.max_new_tokens": (manifest.generation.max_new_tokens, 1),
                    "generation.repetition_window": (manifest.generation.repetition_window, 0),
                    "index.dim": (manifest.index.dim, 1), "index.count": (manifest.index.count, 0),
                    "index.M": (manifest.index.M, 2), "index.ef_construction": (manifest.index.ef_construction, 1),
                    "index.ef": (manifest.index.ef, 1), "index.labels": (manifest.index.labels, 0),
                    "index.deleted": (manifest.index.deleted, 0), "passages.count": (manifest.passages.count, 0)}
        for key, (value, low) in at_least.items():
            if value < low:
                raise BundleError(f"{where}: {key} is {value}; it must be at least {low}")
        if manifest.generation.answers not in ANSWER_KINDS:
            raise BundleError(f"{where}: generation.answers is {manifest.generation.answers!r}; it must be one of "
                              f"{', '.join(ANSWER_KINDS)}")
        a = manifest.abstention
        if a is not None:
            if a.confidence not in CONFIDENCE_KINDS:
                raise BundleError(f"{where}: abstention.confidence is {a.confidence!r}; it must be one of "
                                  f"{', '.join(CONFIDENCE_KINDS)}")
            if not 0.0 <= a.threshold <= 1.0:
                raise BundleError(f"{where}: abstention.threshold is {a.threshold}; it must be in [0, 1]")
            vocab = manifest.generator.vocab_size
            if not a.token_ids or any(t < 0 or (vocab and t >= vocab) for t in a.token_ids):
                raise BundleError(f"{where}: abstention.token_ids is {a.token_ids}; it must list tokens of the "
                                  f"generator's vocabulary (0 to {manifest.generator.vocab_size - 1})")
        c = manifest.compression
        if c is not None:
            for key, value in (("passages", c.passages), ("budget", c.budget), ("max_piece_words", c.max_piece_words)):
                if value < 1:
                    raise BundleError(f"{where}: compression.{key} is {value}; it must be at least 1")
            try:
                c.settings()
            except (KeyError, TypeError, ValueError) as e:
                raise BundleError(f"{where}: compression.selector must hold numbers dense and lexical ({e})") from None
        if manifest.index.labels and manifest.index.labels < manifest.index.count:
            raise BundleError(f"{where}: index.labels ({manifest.index.labels}) is below index.count "
                              f"({manifest.index.count})")
        p = manifest.passage_encoder
        if p is not None and p.dim != manifest.query_encoder.dim:
            raise BundleError(f"{where}: passage_encoder.dim ({p.dim}) differs from query_encoder.dim "
                              f"({manifest.query_encoder.dim})")
        if manifest.index.dim != manifest.query_encoder.dim:
            raise BundleError(f"{where}: index.dim ({manifest.index.dim}) differs from query_encoder.dim "
                              f"({manifest.query_encoder.dim})")
        return manifest

    def named_files(self) -> dict[str, str]:
        """{manifest key: file name} of every file the runtime opens."""
        named = {"query_encoder.onnx": self.query_encoder.onnx, "query_encoder.tokenizer": self.query_encoder.tokenizer,
                 "generator.onnx": self.generator.onnx, "generator.tokenizer": self.generator.tokenizer,
                 "index.file": self.index.file, "passages.file": self.passages.file}
        if self.generator.family == "encoder-decoder":
            named["generator.decoder_onnx"] = self.generator.decoder_onnx
        if self.compression is not None:
            named["compression.file"] = self.compression.file
        if self.query_encoder.weights:
            named["query_encoder.weights"] = self.query_encoder.weights
        if self.passage_encoder is not None:
            named["passage_encoder.onnx"] = self.passage_encoder.onnx
            named["passage_encoder.tokenizer"] = self.passage_encoder.tokenizer
            if self.passage_encoder.weights:
                named["passage_encoder.weights"] = self.passage_encoder.weights
        if self.generator.weights:
            named["generator.weights"] = self.generator.weights
        return named

    def to_bytes(self) -> bytes:
        return dump_manifest(self.to_dict())

    def write(self, bundle: str | Path) -> None:
        """manifest.json into `bundle`, written whole and then renamed into place."""
        path = Path(bundle) / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(self.to_bytes())
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the bytes it names
        tmp.replace(path)


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..", MANIFEST) and Path(name).name == name and "\\" not in name


def _build(cls, data, prefix: str, where: str):
    if not isinstance(data, dict):
        raise BundleError(f"{where}: {prefix.rstrip('.') or 'the manifest'} is not a JSON object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BundleError(f"{where}: missing key {name!r}")
            continue
        values[f.name] = _convert(hints[f.name], data[f.name], name, where)
    return cls(**values)


def _convert(hint, value, name: str, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is PromptTemplate:
        if not isinstance(value, dict) or set(PromptTemplate.__dataclass_fields__) - set(value):
            raise BundleError(f"{where}: {name} must hold the prompt template's pieces "
                              f"({', '.join(PromptTemplate.__dataclass_fields__)})")
        return PromptTemplate.from_dict(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name + ".", where)
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"{where}: {name} must be a JSON object, not {type(value).__name__}")
        return {k: _convert(args[1], v, f"{name}.{k}", where) for k, v in value.items()} if args else value
    if origin is list:
        if not isinstance(value, list):
            raise BundleError(f"{where}: {name} must be a list, not {type(value).__name__}")
        return [_convert(args[0], v, f"{name}[{i}]", where) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise BundleError(f"{where}: {name} must be {hint.__name__}, not {type(value).__name__} ({value!r})")
    return value


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    buffer = bytearray(chunk)  # one buffer for the whole file: no new block per read left in the heap
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while read := f.readinto(buffer):
            h.update(view[:read])
    return h.hexdigest()


def file_record(path: str | Path) -> FileRecord:
    return FileRecord(sha256=sha256_file(path), bytes=os.path.getsize(path))


def dump_manifest(manifest: dict) -> bytes:
    """The exact bytes of manifest.json: the body, plus the SHA-256 of the body as its last key.

    The manifest cannot list its own checksum in `files`, so it carries a digest of itself; the
    serialization is deterministic, so a reader can rebuild the bytes and catch any changed byte.
    """
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, indent=2, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return (text[:-2] + f',\n  "manifest_sha256": "{digest}"\n}}\n').encode()


def read_manifest(bundle: str | Path) -> Manifest:
    """The typed manifest of a bundle, after checking the manifest's own digest (not the other files)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle}")
    if not path.exists():
        raise BundleError(f"missing file {MANIFEST} in bundle {bundle}")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{MANIFEST} in {bundle} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{MANIFEST} in {bundle} is not a JSON object")
    if data.get("format_version") == FORMAT_VERSION and dump_manifest(data) != raw:
        raise BundleError(f"checksum mismatch for {MANIFEST} in bundle {bundle}: the manifest was changed or damaged")
    return Manifest.from_dict(data, str(path))


def check_in_bundle(bundle: Path, name: str) -> Path:
    """The path of a bundle file that exists and, if it is a link, points inside the bundle."""
    path = Path(bundle) / name
    if not path.is_file():
        raise BundleError(f"missing file {name} in bundle {bundle}")
    if path.is_symlink() and path.resolve().parent != Path(bundle).resolve():
        raise BundleError(f"file {name} in bundle {bundle} is a link to {path.resolve()}, outside the bundle")
    return path


def verify(bundle: str | Path, manifest: Manifest | None = None, names: set[str] | None = None,
           sizes_only: bool = False) -> Manifest:
    """Check every listed file's size and SHA-256 (only those in `names`, only the sizes); raise
    BundleError naming the first bad one."""
    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle)
    if not manifest.files:
        raise BundleError(f"{MANIFEST} in {bundle} lists no files")
    for name, record in manifest.files.items():
        if names is not None and name not in names:
            continue
        path = check_in_bundle(bundle, name)
        if os.path.getsize(path) != record.bytes:
            raise BundleError(f"file {name} in bundle {bundle} has {os.path.getsize(path)} bytes, "
                              f"the manifest says {record.bytes}: the bundle is damaged or was changed")
        if not sizes_only and sha256_file(path) != record.sha256:
            raise BundleError(f"checksum mismatch for {name} in bundle {bundle}: the file was changed or damaged")
    return manifest
