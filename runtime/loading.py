"""Pipeline.load's work below the Pipeline: a bundle's files opened as the pipeline's parts, their
checksums verified beside the loading, and a library's error while a file loads named by file.
A generator family's loading is in GENERATORS."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

import hnswlib
from tokenizers import Tokenizer

from edgerag.runtime.compress import Compression, PieceVectors
from edgerag.runtime.decoder_only import DecoderOnlyGenerator
from edgerag.runtime.encoder_decoder import EncoderDecoderGenerator
from edgerag.runtime.corpus import corpus_files
from edgerag.runtime.manifest import KV_IN_PLACE_GRAPHS, BundleError, Manifest, check_in_bundle, read_manifest, verify
from edgerag.runtime.memory import return_freed_memory
from edgerag.runtime.prompt import PromptTemplate
from edgerag.runtime.retrieval import PassageStore, QueryEncoder
from edgerag.runtime.session import make_session


T = TypeVar("T")


class BundleParts(NamedTuple):
    """A bundle's opened parts: the fields of a Pipeline after its path and manifest, in their order."""
    encoder: QueryEncoder
    index: hnswlib.Index
    store: PassageStore
    generator: DecoderOnlyGenerator | EncoderDecoderGenerator | None
    tokenizer: Tokenizer
    template: PromptTemplate
    size: int
    compression: Compression | None
    pieces: PieceVectors | None


def weight_files(manifest: Manifest) -> set[str]:
    """The graphs' weight files (outside the graphs, memory-mapped), by name in the bundle."""
    return {n for n in (manifest.query_encoder.weights, manifest.generator.weights) if n}


def open_parts(bundle: Path, manifest: Manifest, threads: int | None, reuse_prefix: str | bool,
               retrieval_only: bool, prompt_lookup: int | None, check: bool = True) -> BundleParts:
    """The bundle's parts, opened. With `check`, every file's checksum is verified: the weight files'
    beside the loading, every other file's before it is parsed."""
    weights = weight_files(manifest)
    if not check:
        return _open(bundle, manifest, threads, reuse_prefix, retrieval_only, prompt_lookup)
    # The graphs' weight files (most of a bundle's bytes) are hashed in a thread while onnxruntime
    # builds the sessions: both release the GIL, so the two overlap on two cores. Every other file
    # is checked before it is parsed (hnswlib trusts its input); the weights' sizes are checked
    # first too, so a damaged weight file can only hold wrong values until its hash says so. No
    # parts are returned before every file has passed.
    verify(bundle, manifest, set(manifest.files) - weights)
    verify(bundle, manifest, weights, sizes_only=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        weights_checked = pool.submit(verify, bundle, manifest, weights)
        try:
            parts = _open(bundle, manifest, threads, reuse_prefix, retrieval_only, prompt_lookup)
        except Exception:
            weights_checked.result()  # damaged weights are reported as damaged, not as the library's error
            raise
        weights_checked.result()
    return parts


def _open(bundle: Path, manifest: Manifest, threads: int | None, reuse_prefix: str | bool,
          retrieval_only: bool, prompt_lookup: int | None = None) -> BundleParts:
    enc, gen, idx = manifest.query_encoder, manifest.generator, manifest.index
    with _reading(bundle, enc.onnx, enc.tokenizer, *filter(None, [enc.weights])):
        # the encoder runs once per question: spinning threads would then slow the generator's
        # prefill (the compressed demo bundle's p50 162 -> 105 ms on 2 cores; docs/bundle.md, "Memory and start-up")
        encoder = QueryEncoder(make_session(bundle / enc.onnx, threads, spinning=False),
                               Tokenizer.from_file(str(bundle / enc.tokenizer)), enc.max_length)
    index, store, pieces = open_corpus(bundle, manifest)
    compression = manifest.compression.settings() if manifest.compression is not None else None
    template = manifest.prompt.template
    with _reading(bundle, gen.tokenizer):
        tokenizer = Tokenizer.from_file(str(bundle / gen.tokenizer))
    return_freed_memory()
    generator = None
    if not retrieval_only:
        with _reading(bundle, gen.onnx, *filter(None, [gen.decoder_onnx, gen.weights])):
            # read_manifest has refused families without a generation loop here
            generator = GENERATORS[gen.family](bundle, manifest, threads, reuse_prefix,
                                               tokenizer.encode(template.prefix, add_special_tokens=False).ids,
                                               prompt_lookup)
        return_freed_memory()
    return BundleParts(encoder, index, store, generator, tokenizer, template, idx.count, compression, pieces)


def _decoder_only(bundle: Path, manifest: Manifest, threads, reuse_prefix, prefix_ids,
                  prompt_lookup) -> DecoderOnlyGenerator:
    return DecoderOnlyGenerator(make_session(bundle / manifest.generator.onnx, threads),
                                manifest.prompt.stop_token_ids, reuse_prefix, prefix_ids,
                                kv_in_place=manifest.generator.graph in KV_IN_PLACE_GRAPHS,
                                max_positions=manifest.generator.max_context, prompt_lookup=prompt_lookup)


def _encoder_decoder(bundle: Path, manifest: Manifest, threads, reuse_prefix, prefix_ids,
                     prompt_lookup) -> EncoderDecoderGenerator:
    # reuse_prefix has nothing to reuse here: the encoder reads the whole prompt at once, and the
    # decoder's cache starts empty for every answer; its decoder graph drafts nothing (prompt_lookup)
    gen = manifest.generator
    return EncoderDecoderGenerator(make_session(bundle / gen.onnx, threads), make_session(bundle / gen.decoder_onnx, threads),
                                   manifest.prompt.stop_token_ids, gen.decoder_start_token_id, gen.forced_bos_token_id)


# family -> (bundle, manifest, threads, reuse_prefix, prefix ids, prompt_lookup) -> its generator
GENERATORS = {"decoder-only": _decoder_only, "encoder-decoder": _encoder_decoder}


def open_current(bundle: Path, open_with: Callable[[Manifest], T]) -> tuple[Manifest, T]:
    """(manifest, open_with(manifest)) for the bundle as it is; read again where a corpus change
    (runtime.corpus) replaced the files the manifest named between reading it and opening them."""
    for attempt in range(3):
        manifest = read_manifest(bundle)
        try:
            for name in manifest.named_files().values():  # unverified bundles too: a clear error, not a library's
                check_in_bundle(bundle, name)
            return manifest, open_with(manifest)
        except BundleError:
            if attempt == 2 or read_manifest(bundle).to_bytes() == manifest.to_bytes():
                raise
    raise AssertionError("unreachable")


def open_corpus(bundle: Path, manifest: Manifest, check: bool = False) -> tuple[hnswlib.Index, PassageStore, PieceVectors | None]:
    """The corpus files the manifest names, opened: the index, the passage store, the piece vectors
    (with `check`, their checksums verified first)."""
    idx = manifest.index
    if check:
        verify(bundle, manifest, corpus_files(manifest))
    with _reading(bundle, idx.file):
        index = hnswlib.Index(space=idx.space, dim=idx.dim)
        index.load_index(str(bundle / idx.file), max_elements=idx.count + idx.deleted)
    if index.get_current_count() != idx.count + idx.deleted:
        raise BundleError(f"{idx.file} in bundle {bundle} holds {index.get_current_count()} vectors, "
                          f"the manifest says {idx.count} and {idx.deleted} deleted")
    index.set_ef(idx.ef)
    with _reading(bundle, manifest.passages.file):
        store = PassageStore(bundle / manifest.passages.file)
        stored = store.count()
    if stored != manifest.passages.count or manifest.passages.count != idx.count:
        raise BundleError(f"{manifest.passages.file} in bundle {bundle} holds {stored} passages for "
                          f"{idx.count} index vectors, the manifest says {manifest.passages.count}")
    pieces = None
    if manifest.compression is not None:
        with _reading(bundle, manifest.compression.file):
            pieces = PieceVectors.load(bundle / manifest.compression.file, idx.labels or idx.count,
                                       manifest.compression.pieces, idx.dim)
    return index, store, pieces


class _reading:
    """Turns a library's error while a bundle file loads into a BundleError naming the file."""

    def __init__(self, bundle: Path, *names: str):
        self.bundle, self.names = bundle, names

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None and not isinstance(error, BundleError) and isinstance(error, Exception):
            raise BundleError(f"{' or '.join(self.names)} in bundle {self.bundle} does not load: "
                              f"{type(error).__name__}: {error}") from None
        return False

