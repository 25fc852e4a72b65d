"""Query encoder + generator + passages -> a bundle directory for the device.

Stages: read passages, export and quantize the query encoder, embed the passages, build the
hnswlib index and the sqlite passage store, export and quantize the generator, measure parity
against PyTorch, write the manifest. Everything is written into a temporary directory beside
the target and renamed into place at the end, so a bundle directory either is complete or does
not exist.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import edgerag
from tokenizers import Tokenizer
from transformers import AutoConfig

from edgerag.data import Passage, data_path, is_squad, read_passages, read_squad
from edgerag.export import QUANTIZATIONS, SMOOTHED, ExportOptions, onnx_export, resolve_quantization
from edgerag.export.quantize import quantize
from edgerag.model_files import normalizes
from edgerag.models import PLAIN_GREEDY, load_encoder, load_generator, resolve
from edgerag.runtime.compress import Compression, PieceVectors, split_pieces
from edgerag.runtime.corpus import create_store, document_rows, passage_rows
from edgerag.runtime.documents import SUFFIXES as DOCUMENT_SUFFIXES, Document, cut_passages, read_documents
from edgerag.runtime.manifest import (KV_IN_PLACE_GRAPHS, LOGITS_LAST_POSITIONS, AbstentionSpec, CompressionSpec, GenerationSpec, GeneratorSpec,
                                      IndexSpec, Manifest, PassagesSpec, PromptSpec, QueryEncoderSpec, file_record)
from edgerag.runtime import DecoderOnlyGenerator, QueryEncoder, make_session
from edgerag.runtime.prompt import NO_ANSWER, PromptTemplate, build_prompt_ids, no_answer_token_ids

# the graphs' weights, outside the graphs: onnxruntime memory-maps them (see optimize_offline)
GENERATOR_WEIGHTS = "generator.onnx.data"
PASSAGE_FORMAT = IndexSpec.passage_format  # how a passage is embedded; the device embeds added passages alike


def embed_passages(model, tokenizer, pooling: str, max_length: int, texts: list[str], batch_size: int,
                   normalize: bool = True) -> np.ndarray:
    import torch

    # batches of similar lengths pad little (pieces run from a few words to a sentence); the rows come back in order
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="embed passages", unit="batch"):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = (torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled).float().numpy()
    return out


def write_passage_store(path: Path, passages: list, documents: list | None = None) -> None:
    """The sqlite store (runtime.corpus's schema). Passages read from files (runtime.documents) keep
    their source and character offsets, and their documents are listed, so that `edgerag sync` knows them."""
    rows = passage_rows(passages) if documents else [(row, p.id, p.title, p.text, None, None, None)
                                                     for row, p in enumerate(passages)]
    create_store(path, rows, document_rows(documents, passages) if documents else ())
    db = sqlite3.connect(path)
    db.execute("VACUUM")
    db.close()


def read_corpus(paths: list[str | Path]) -> tuple[list[Document] | None, list[Passage], list, int]:
    """(documents or None, passages, questions, skipped files) of --passages: SQuAD JSON or a JSONL corpus
    (one path), or files and folders of documents, whose passages are cut once the encoder is known."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and not paths[0].is_dir() and paths[0].suffix.lower() not in DOCUMENT_SUFFIXES:
        path = data_path(str(paths[0]))
        passages, questions, _ = read_squad(path) if is_squad(path) else (read_passages(path), [], 0)
        return None, passages, questions, 0
    documents, skipped = read_documents(paths)
    for s in skipped:
        print(f"skipped {s.path}: {s.reason}")
    if not documents:
        raise ValueError(f"no document could be read from {', '.join(map(str, paths))}")
    return documents, [], [], len(skipped)


def build_index(vectors: np.ndarray, path: Path, m: int, ef_construction: int) -> None:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), ef_construction=ef_construction, M=m, random_seed=0)
    # one thread: threads racing to insert make a different graph each time, so two exports of the same
    # student would differ in this file alone (the embeddings, not the insertion, are the export's time)
    index.add_items(vectors, np.arange(len(vectors)), num_threads=1)
    index.save_index(str(path))


def optimize_offline(src: Path, dst: Path, weights: str = "") -> tuple[str, str]:
    """Save onnxruntime's portable (EXTENDED level) graph optimizations, so the device does not redo them.

    Loading the SmolLM2 generator took 1.4 s as exported and 0.75 s optimized (docs/results-history.md). Hardware
    specific rewrites (level ALL) still happen at load. Where folding would store a weight twice
    (a tied embedding read through a Transpose), the graph is shipped as exported.

    weights: a file name beside `dst` for the weights, outside the graph. onnxruntime memory-maps such
    a file instead of copying the weights out of a parsed graph: the compressed demo bundle's peak RSS
    in `edgerag bench` went from 330 to 312 MB (docs/bundle.md, "Memory and start-up").

    Returns (what was optimized, the weights file written: `weights`, or "" where no tensor was large
    enough to leave the graph).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    if weights:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    written = dst.stat().st_size + ((dst.parent / weights).stat().st_size if weights else 0)
    if written > 1.05 * src.stat().st_size:
        if weights:
            import onnx

            (dst.parent / weights).unlink()
            onnx.save_model(onnx.load(str(src)), str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=weights, size_threshold=1024)
        else:
            shutil.copy(src, dst)
        optimized = "none"
    else:
        optimized = f"extended, onnxruntime {ort.__version__}"
    return optimized, (weights if weights and (dst.parent / weights).exists() else "")


def stop_token_ids(tokenizer, template: PromptTemplate) -> list[int]:
    ids = set()
    end = tokenizer(template.answer_end, add_special_tokens=False)["input_ids"]
    if len(end) == 1:
        ids.add(end[0])
    vocab = tokenizer.get_vocab()
    for token in ("<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>"):
        if token in vocab:
            ids.add(vocab[token])
    return sorted(ids)


def sample_prompts(questions: list, passages: list[Passage], n: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """(question, [(title, text)]) pairs for parity checks: the file's own questions where it has them."""
    if questions:
        step = max(len(questions) // n, 1)
        return [(q.question, [(q.title, q.context)]) for q in questions[::step][:n]]
    return [(f"What is {p.title or 'this passage'} about?", [(p.title, p.text)]) for p in passages[:n]]


def greedy_torch(model, prompt: list[int], max_new_tokens: int, stop: list[int]) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=stop[0])[0, len(prompt):].tolist()
    for i, t in enumerate(out):
        if t in stop:
            return out[:i]
    return out


def last_logits_torch(model, prompt: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0, -1].numpy()


def encode_with(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def smoothed_generator_graph(model, builder: str, encode, template, questions, passages, opts: ExportOptions):
    """(fused graph of a SmoothQuant-smoothed copy of `model`, description) for int8sq and int8swo."""
    from edgerag.export.llama_graph import build_llama_graph
    from edgerag.export.smoothquant import DEFAULT_ALPHA, calibration_prompts, smooth_llama

    if builder != "fused-llama":
        raise ValueError(f"--quantize {opts.quantize} needs the fused Llama graph; this generator was exported by {builder}")
    prompts = calibration_prompts(questions, passages, opts.calibration_prompts)
    budget = opts.max_context - opts.max_new_tokens
    ids = [build_prompt_ids(encode, template, q, ps, budget) for q, ps in prompts]
    smoothed = smooth_llama(model, ids, DEFAULT_ALPHA)
    return build_llama_graph(smoothed), {"smoothquant_alpha": DEFAULT_ALPHA, "calibration_prompts": len(ids)}


def measure_generator_parity(model, tokenizer, template, stop, prompts, onnx_paths: dict, opts: ExportOptions,
                             kv_in_place: bool = False) -> dict:
    """Largest |Δ logits| and greedy agreement of each ONNX variant against PyTorch fp32, plus its speed,
    decoded as the runtime will (kv_in_place: see DecoderOnlyGenerator)."""
    encode = encode_with(tokenizer)
    budget = opts.max_context - opts.max_new_tokens
    prompt_ids = [build_prompt_ids(encode, template, q, ps, budget) for q, ps in prompts]
    reference_logits = [last_logits_torch(model, p) for p in prompt_ids]
    reference = [greedy_torch(model, p, opts.max_new_tokens, stop)
                 for p in tqdm(prompt_ids, desc="greedy answers (PyTorch)", unit="q")]
    figures = {"n_prompts": len(prompt_ids),
               "mean_prompt_tokens": float(np.mean([len(p) for p in prompt_ids])) if prompt_ids else 0.0}
    for name, path in onnx_paths.items():
        generator = DecoderOnlyGenerator(make_session(path, None), stop, reuse_prefix=False, kv_in_place=kv_in_place)
        delta = max(float(np.abs(generator.last_logits(p) - r).max())
                    for p, r in zip(prompt_ids, reference_logits))
        same, prefill, decode, decode_tokens = 0, [], 0.0, 0
        for p, ref in tqdm(list(zip(prompt_ids, reference)), desc=f"greedy answers (ONNX {name})", unit="q"):
            generation = generator.greedy(p, opts.max_new_tokens)
            same += generation.tokens == ref
            prefill.append(generation.prefill_ms)
            decode += generation.decode_ms
            decode_tokens += generation.decode_tokens
        figures[name] = {
            "max_abs_logit_delta": delta,
            "greedy_exact_match": same / max(len(prompt_ids), 1),
            "prefill_ms_mean": float(np.mean(prefill)) if prefill else None,
            "decode_ms_per_token": decode / decode_tokens if decode_tokens else None,
        }
    return figures


def export_encoder_decoder_generator(gen_folder: Path, bundle: Path, work: Path, prompts, opts: ExportOptions,
                                     max_prompt_tokens: int | None) -> tuple[GeneratorSpec, PromptSpec, dict]:
    """A BART generator -> generator_encoder.onnx + generator_decoder.onnx (quantized, optimized) and
    its tokenizer in `bundle`; (spec, prompt, parity against PyTorch)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from edgerag.export.bart_graph import export_encoder_decoder
    from edgerag.runtime import EncoderDecoderGenerator
    from edgerag.runtime.prompt import RAG_CONCAT

    model = AutoModelForSeq2SeqLM.from_pretrained(gen_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(gen_folder)
    graphs = export_encoder_decoder(model, work / "generator_fp32")
    method = resolve_quantization(opts.quantize, "bart")
    if method in SMOOTHED:
        raise ValueError(f"--quantize {method} needs the fused Llama graph; choose int8wo, int4, int8 or none for BART")
    paths = {"fp32": {}, **({method: {}} if method != "none" else {})}
    quantization = {}
    for part, file in (("encoder", graphs["encoder"]), ("decoder", graphs["decoder"])):
        import onnx

        graph = onnx.load(str(work / "generator_fp32" / file))
        paths["fp32"][part] = work / "generator_fp32" / file
        graph, quantization[part] = quantize(graph, method, opts.block_size, opts.accuracy_level, is_generator=part == "decoder")
        onnx_export.save(graph, work / f"generator_{part}.onnx")
        quantization[part]["graph_optimization"], _ = optimize_offline(work / f"generator_{part}.onnx",
                                                                       bundle / f"generator_{part}.onnx")
        if method != "none":
            paths[method][part] = bundle / f"generator_{part}.onnx"
    shutil.copy(gen_folder / "tokenizer.json", bundle / "generator_tokenizer.json")

    template = PromptTemplate(**RAG_CONCAT)
    stop = [graphs["eos_token_id"]]
    start, forced = graphs["decoder_start_token_id"], graphs["forced_bos_token_id"]
    max_context = min(max_prompt_tokens or opts.max_context, opts.max_context, graphs["max_positions"])
    encode = encode_with(tokenizer)
    prompt_ids = [build_prompt_ids(encode, template, q, ps, max_context) for q, ps in prompts]
    parity = {"n_prompts": len(prompt_ids),
              "mean_prompt_tokens": float(np.mean([len(p) for p in prompt_ids])) if prompt_ids else 0.0}
    import torch

    reference, reference_logits = [], []
    prefix = [start] + ([forced] if forced is not None else [])
    with torch.inference_mode():
        for p in prompt_ids:
            ids = torch.tensor([p])
            reference_logits.append(model(input_ids=ids, decoder_input_ids=torch.tensor([prefix])).logits[0, -1].numpy())
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **PLAIN_GREEDY,
                                 max_new_tokens=opts.max_new_tokens + len(prefix) - 1, eos_token_id=stop)[0].tolist()[len(prefix):]
            reference.append(out[:out.index(stop[0])] if stop[0] in out else out)
    for name, files in paths.items():
        generator = EncoderDecoderGenerator(make_session(files["encoder"], None), make_session(files["decoder"], None),
                                            stop, start, forced)
        generations = [generator.greedy(p, opts.max_new_tokens) for p in prompt_ids]
        decode_tokens = sum(max(len(g.tokens) - 1, 0) for g in generations)
        parity[name] = {
            "max_abs_logit_delta": max((float(np.abs(generator.last_logits(p) - r).max())
                                        for p, r in zip(prompt_ids, reference_logits)), default=0.0),
            "greedy_exact_match": sum(g.tokens == r for g, r in zip(generations, reference)) / max(len(prompt_ids), 1),
            "prefill_ms_mean": float(np.mean([g.prefill_ms for g in generations])) if generations else None,
            "decode_ms_per_token": sum(g.decode_ms for g in generations) / decode_tokens if decode_tokens else None,
        }
    config = model.config
    spec = GeneratorSpec(family="encoder-decoder", onnx="generator_encoder.onnx", decoder_onnx="generator_decoder.onnx",
                         tokenizer="generator_tokenizer.json", model_type=config.model_type,
                         num_layers=config.decoder_layers, hidden_size=config.d_model, vocab_size=config.vocab_size,
                         parameters=sum(p.numel() for p in model.parameters()), max_context=max_context,
                         graph="bart-graph", quantization={"method": method, **quantization},
                         decoder_positions=graphs["max_positions"],
                         graph_optimization=quantization["decoder"]["graph_optimization"],
                         decoder_start_token_id=start, forced_bos_token_id=forced)
    return spec, PromptSpec(template=template, stop_token_ids=stop), parity


@dataclasses.dataclass
class ExportedEncoder:
    spec: QueryEncoderSpec
    model: object
    tokenizer: object
    pooling: str
    max_length: int
    normalized: bool


def export_encoder(name: str, stem: str, tokenizer_file: str, work: Path, bundle: Path,
                   opts: ExportOptions) -> ExportedEncoder:
    """An encoder (pooling and normalization inside the graph) into the bundle as STEM.onnx, its weights
    beside it, quantized as --quantize-encoder says; work/STEM.fp32.onnx is kept for the parity check."""
    folder = onnx_export.materialize(name, work / stem)
    model, tokenizer, pooling, max_length = load_encoder(str(folder))
    normalized = normalizes(folder)
    graph = onnx_export.export_query_encoder(folder, pooling, normalized)
    onnx_export.save(graph, work / f"{stem}.fp32.onnx")
    graph, quantization = quantize(graph, opts.quantize_encoder, opts.block_size, opts.accuracy_level, is_generator=False)
    onnx_export.save(graph, work / f"{stem}.onnx")
    optimization, weights = optimize_offline(work / f"{stem}.onnx", bundle / f"{stem}.onnx", f"{stem}.onnx.data")
    shutil.copy(folder / "tokenizer.json", bundle / tokenizer_file)
    spec = QueryEncoderSpec(onnx=f"{stem}.onnx", tokenizer=tokenizer_file, pooling=pooling, weights=weights,
                            max_length=max_length, dim=int(model.config.hidden_size), normalized=normalized,
                            quantization=quantization, parameters=sum(p.numel() for p in model.parameters()),
                            graph_optimization=optimization)
    return ExportedEncoder(spec, model, tokenizer, pooling, max_length, normalized)


def same_model(a: str, b: str) -> bool:
    return a == b or Path(str(resolve(a).path)).resolve() == Path(str(resolve(b).path)).resolve()


def export_bundle(query_encoder: str, generator: str, passages_file: str | Path, out: str | Path,
                  passage_encoder: str | None = None, options: ExportOptions | None = None,
                  passage_format: str | None = None, max_prompt_tokens: int | None = None,
                  compression: dict | None = None, calibration: list | None = None) -> Path:
    """passage_format: how a passage is written for the passage encoder (default IndexSpec's);
    max_prompt_tokens: an encoder-decoder student's context as it was trained (its edgerag.json);
    compression: a compressed-context student's settings (its edgerag.json): the bundle then carries
    every passage's piece vectors and the compact prompt template; calibration: held-in questions (with
    their passages) of a generator that learned to answer NO_ANSWER: the bundle then abstains below a
    threshold fitted on them (fit_abstention)."""
    opts = options or ExportOptions()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the progress bars readable
    # `auto` depends on the generator's graph; the encoder's method is always named
    encoder_methods = tuple(q for q in QUANTIZATIONS if q not in SMOOTHED)  # smoothing is for the Llama generator
    for method, allowed in ((opts.quantize, ("auto",) + QUANTIZATIONS), (opts.quantize_encoder, encoder_methods)):
        if method not in allowed:
            raise ValueError(f"unknown quantization {method!r}; choose from {', '.join(allowed)}")
    out = Path(out)
    if out.exists() and not opts.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    for name in (query_encoder, generator, passage_encoder):
        if name:
            resolve(name)  # a typo in a model name fails here, before minutes of work
    passages_paths = [passages_file] if isinstance(passages_file, (str, Path)) else list(passages_file)
    # bad lines fail here, before any model loads; a SQuAD file is parsed once, for passages and questions
    documents, passages, questions, _ = read_corpus(passages_paths)
    if not passages and documents is None:
        raise ValueError(f"{passages_file} holds no passages")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_work(out)
    started = time.time()
    stages = tqdm(total=7 + bool(calibration), desc="export", unit="stage")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-") as tmp:
        bundle, work = Path(tmp) / "bundle", Path(tmp) / "work"
        bundle.mkdir()
        work.mkdir()

        stages.set_postfix_str("query encoder")
        enc = export_encoder(query_encoder, "query_encoder", "query_tokenizer.json", work, bundle, opts)
        enc_model, enc_tokenizer, pooling, max_length, normalized = enc.model, enc.tokenizer, enc.pooling, enc.max_length, enc.normalized
        stages.update()

        stages.set_postfix_str("passage embeddings")
        passage_spec = None
        if passage_encoder and not same_model(passage_encoder, query_encoder):
            # shipped, so that the device embeds the passages it adds as these were (edgerag add, sync)
            p_enc = export_encoder(passage_encoder, "passage_encoder", "passage_tokenizer.json", work, bundle, opts)
            if p_enc.normalized != normalized:
                raise ValueError(f"the query encoder {'normalizes' if normalized else 'does not normalize'} its vectors and "
                                 f"the passage encoder {passage_encoder} {'does' if not normalized else 'does not'}: "
                                 "their inner products would not rank passages")
            p_model, p_tokenizer, p_pooling, p_max = p_enc.model, p_enc.tokenizer, p_enc.pooling, p_enc.max_length
            passage_spec = p_enc.spec
        else:
            p_model, p_tokenizer, p_pooling, p_max = enc_model, enc_tokenizer, pooling, max_length
        passage_format = passage_format or PASSAGE_FORMAT
        if documents is not None:
            def count_tokens(text: str) -> int:
                return len(p_tokenizer(text, add_special_tokens=False)["input_ids"])
            passages = [p for d in documents for p in cut_passages(d, count_tokens, min(192, p_max - 32))]
        vectors = embed_passages(p_model, p_tokenizer, p_pooling, p_max,
                                 [passage_format.format(title=p.title, text=p.text) for p in passages], opts.batch_size,
                                 normalized)
        stages.update()

        stages.set_postfix_str("index + passage store")
        build_index(vectors, bundle / "index.hnsw", opts.hnsw_m, opts.ef_construction)
        write_passage_store(bundle / "passages.sqlite", passages, documents)
        compression_spec = None
        if compression is not None:
            settings = Compression.from_dict(compression)
            pieces = [split_pieces(p.text, settings.max_piece_words) for p in passages]
            flat = embed_passages(p_model, p_tokenizer, p_pooling, p_max,
                                  [passage_format.format(title=p.title, text=piece) for p, ps in zip(passages, pieces) for piece in ps],
                                  opts.batch_size, normalized)
            bounds = np.cumsum([0] + [len(ps) for ps in pieces])
            PieceVectors.pack([flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]).save(bundle / "pieces.bin")
            compression_spec = CompressionSpec(file="pieces.bin", passages=settings.passages, budget=settings.budget,
                                               selector=settings.selector.to_dict(), pieces=int(bounds[-1]),
                                               max_piece_words=settings.max_piece_words)
        stages.update()

        stages.set_postfix_str("embedding parity")
        prompts = sample_prompts(questions, passages, opts.parity_questions)
        sample_questions = [q for q, _ in prompts] or ["What is this about?"]
        reference = embed_passages(enc_model, enc_tokenizer, pooling, max_length, sample_questions, opts.batch_size,
                                   normalized)
        embedding_parity = {}
        for name, path in {"fp32": work / "query_encoder.fp32.onnx", "shipped": bundle / "query_encoder.onnx"}.items():
            onnx_encoder = QueryEncoder(make_session(path, None), Tokenizer.from_file(str(bundle / "query_tokenizer.json")),
                                        max_length)
            embedding_parity[name] = float(np.abs(onnx_encoder.encode(sample_questions) - reference).max())
        enc.model = p_model = enc_model = None  # the generator's turn: free the encoders
        stages.update()

        stages.set_postfix_str("generator")
        gen_folder = onnx_export.materialize(generator, work / "generator", causal_lm=True)
        if AutoConfig.from_pretrained(gen_folder).is_encoder_decoder:
            gen_spec, prompt_spec, generator_parity = export_encoder_decoder_generator(
                gen_folder, bundle, work, prompts, opts, max_prompt_tokens)
            stages.update(2)
        else:
            gen_spec, prompt_spec, generator_parity = export_decoder_only_generator(
                gen_folder, bundle, work, questions, passages, prompts, opts, stages, compact=compression is not None)

        stages.set_postfix_str("manifest")
        manifest = Manifest(
            created_unix=int(time.time()),
            versions=_versions(),
            sources={"query_encoder": str(query_encoder), "generator": str(generator),
                     "passage_encoder": str(passage_encoder or query_encoder),
                     "passages": ", ".join(map(str, passages_paths))},
            query_encoder=dataclasses.replace(enc.spec, dim=int(vectors.shape[1])),
            passage_encoder=passage_spec and dataclasses.replace(passage_spec, dim=int(vectors.shape[1])),
            generator=gen_spec,
            prompt=prompt_spec,
            generation=GenerationSpec(k=opts.k, max_new_tokens=opts.max_new_tokens,
                                      repetition_window=opts.repetition_window, answers=opts.answers),
            index=IndexSpec(file="index.hnsw", dim=int(vectors.shape[1]), count=len(passages), M=opts.hnsw_m,
                            ef_construction=opts.ef_construction, ef=opts.ef, passage_format=passage_format),
            passages=PassagesSpec(file="passages.sqlite", count=len(passages)),
            compression=compression_spec,
            parity={"max_abs_embedding_delta": embedding_parity, "generator": generator_parity},
            export_seconds=round(time.time() - started, 1),
        )
        manifest.files = {f.name: file_record(f) for f in sorted(bundle.iterdir())}
        manifest.write(bundle)
        stages.update()
        if calibration:
            stages.set_postfix_str("abstention threshold")
            manifest.abstention = fit_abstention(bundle, manifest, calibration, opts.abstain_cost,
                                                 confidence=opts.abstain_confidence)
            manifest.write(bundle)
            stages.update()
        stages.close()
        _replace_dir(bundle, out)
    return out


def fit_abstention(bundle: Path, manifest: Manifest, questions: list, max_answer_cost: float = 2.0,
                   seed: int = 0, confidence: str = "answer") -> AbstentionSpec:
    """The abstention of a bundle whose generator learned to answer NO_ANSWER: the threshold with the best
    overall F1 on `questions` (SQuAD 2.0's scoring; metrics.fit_threshold), half of them asked over
    passages that cannot answer them, whose abstentions cost the answerable ones at most
    `max_answer_cost` points of F1; answered by the bundle itself as the device will (their passages
    added in memory)."""
    from edgerag.evaluation import abstention_records
    from edgerag.metrics import abstention_figures, fit_threshold
    from edgerag.runtime import Pipeline

    tokenizer = Tokenizer.from_file(str(bundle / manifest.generator.tokenizer))
    token_ids = no_answer_token_ids(lambda text: tokenizer.encode(text, add_special_tokens=False).ids)
    manifest.abstention = AbstentionSpec(NO_ANSWER, token_ids, 0.0, confidence=confidence)
    manifest.write(bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its warning of what the bundle lacks is for users, not for the fit
        pipeline = Pipeline.load(bundle, check=False, abstain_threshold=0.0)
    pipeline.add_passages(list({q.passage_id: (q.passage_id, q.title, q.context) for q in questions}.values()))
    records = abstention_records(pipeline, questions, 0.5, manifest.generation.k, seed)
    threshold = fit_threshold(records, max_answer_cost)
    figures = abstention_figures(records, threshold)
    print(f"[export] abstention threshold {threshold:.3f} on {len(records)} held-in questions: "
          f"overall F1 {figures['f1_overall']} (without abstention {figures['f1_overall_without_abstention']}), "
          f"abstained on {figures['no_answer_accuracy']}% of the unanswerable, {figures['has_answer_abstained']}% "
          "of the answerable")
    return AbstentionSpec(NO_ANSWER, token_ids, threshold,
                          fitted={"questions": len(records), "share_unanswerable": 0.5,
                                  "max_answer_cost": max_answer_cost, **figures}, confidence=confidence)


def export_decoder_only_generator(gen_folder: Path, bundle: Path, work: Path, questions, passages, prompts,
                                  opts: ExportOptions, stages, compact: bool = False) -> tuple[GeneratorSpec, PromptSpec, dict]:
    """A causal LM -> generator.onnx (fused Llama graph or Optimum's trace, quantized, optimized) and its
    tokenizer in `bundle`; (spec, prompt, parity against PyTorch). compact: the compressed-context template."""
    gen_model, gen_tokenizer = load_generator(str(gen_folder))
    vocab = gen_tokenizer.get_vocab()
    template = PromptTemplate.for_vocab(vocab.get, compact)
    stop = stop_token_ids(gen_tokenizer, template)
    gen_graph, gen_builder = onnx_export.export_generator(gen_folder, gen_model, opts.graph)
    onnx_export.save(gen_graph, work / "generator.fp32.onnx")
    method = resolve_quantization(opts.quantize, gen_builder)
    smoothing = {}
    if method in SMOOTHED:
        gen_graph, smoothing = smoothed_generator_graph(gen_model, gen_builder, encode_with(gen_tokenizer),
                                                        template, questions, passages, opts)
    gen_graph, gen_quant = quantize(gen_graph, method, opts.block_size, opts.accuracy_level)
    gen_quant.update(smoothing)
    onnx_export.save(gen_graph, work / "generator.onnx")
    del gen_graph
    gen_optimization, gen_weights = optimize_offline(work / "generator.onnx", bundle / "generator.onnx", GENERATOR_WEIGHTS)
    shutil.copy(gen_folder / "tokenizer.json", bundle / "generator_tokenizer.json")
    stages.update()

    stages.set_postfix_str("generator parity")
    variants = {"fp32": work / "generator.fp32.onnx"}
    if method != "none":
        variants[method] = bundle / "generator.onnx"
    generator_parity = measure_generator_parity(gen_model, gen_tokenizer, template, stop, prompts, variants, opts,
                                                kv_in_place=gen_builder in KV_IN_PLACE_GRAPHS)
    stages.update()

    config = gen_model.config
    spec = GeneratorSpec(family="decoder-only", onnx="generator.onnx", tokenizer="generator_tokenizer.json",
                         weights=gen_weights, model_type=config.model_type, num_layers=config.num_hidden_layers,
                         hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                         parameters=sum(p.numel() for p in gen_model.parameters()),
                         max_context=min(opts.max_context, getattr(config, "max_position_embeddings", opts.max_context)),
                         graph=gen_builder, quantization=gen_quant, graph_optimization=gen_optimization,
                         logits=LOGITS_LAST_POSITIONS if gen_builder == "fused-llama" else "last-position")
    return spec, PromptSpec(template=template, stop_token_ids=stop), generator_parity


def _remove_abandoned_work(out: Path) -> None:
    """Folders that an export killed before it finished left beside `out` (their process is gone): its
    work in progress, or the bundle it was replacing."""
    for kind in ("tmp", "old"):
        for folder in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            pid = folder.name[len(f".{out.name}.{kind}-"):].split("-")[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                folder.rename(out)  # killed between the two renames: the previous bundle goes back in place
            else:
                shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace_dir(new: Path, target: Path) -> None:
    """Move a finished bundle into place; an older bundle there is replaced only after the new one is in."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"edgerag": edgerag.__version__}
    for package in ("onnxruntime", "transformers", "optimum", "optimum-onnx", "torch", "onnx", "hnswlib", "tokenizers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
