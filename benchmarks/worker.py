"""One system, one process: `python -m edgerag.benchmarks.worker spec.json result.json`.

The bench starts a fresh process per (system, threads), so peak RSS and cold start are that
system's alone. The spec names the system, the questions, and the passages every system answers
from (the same for all, so generation times compare like for like); each system also runs its own
retriever on every question, which gives the encode and search times and recall@5.

Kinds:
  torch     a teacher/student folder (query_encoder/ + generator/) in PyTorch; its own index of
            the bundle's passages, embedded with the folder's passage encoder; transformers generate.
  bundle    edgerag's runtime (onnxruntime) on a bundle.
  optimum   Optimum's ORTModelForCausalLM.generate on an Optimum ONNX folder; retrieval by the bundle.
  ortgenai  onnxruntime-genai on a model-builder folder; retrieval by the bundle. Runs in its own venv.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from edgerag.benchmarks.process_memory import peak_rss_mb, rss_mb, status_mb

RECALL_K = 5


def dir_size_mb(paths) -> float:
    total = 0
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)  # stat follows symlinks: the real bytes
    return total / 1e6


def manifest_shape(manifest) -> dict:
    """Parameters that take part in matmuls (the manifest counts a tied embedding once, as the LM head)."""
    g = manifest.generator
    return {"matmul_params": g.parameters, "layers": g.num_layers, "hidden": g.hidden_size}


class Stopwatch:
    """Timestamps of each new token, recorded from inside transformers' generate loop."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):  # a LogitsProcessor: called once per generated token
        self.times.append(time.perf_counter())
        return scores


def hf_generate(model, prompt: list[int], max_new_tokens: int, stop: list[int], decode, start: float) -> dict:
    """Greedy `model.generate` (transformers or Optimum), with prefill and decode split by a Stopwatch."""
    import torch
    from transformers import LogitsProcessorList

    watch = Stopwatch()
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                         pad_token_id=stop[0], logits_processor=LogitsProcessorList([watch]))
    end = time.perf_counter()
    tokens = out[0, len(prompt):].tolist()
    for i, t in enumerate(tokens):
        if t in stop:
            tokens = tokens[:i]
            break
    first = watch.times[0] if watch.times else end
    return {"answer": decode(tokens, skip_special_tokens=True).strip(),
            "prompt_tokens": len(prompt), "new_tokens": len(tokens), "prefill_ms": (first - start) * 1000,
            "decode_ms": (watch.times[-1] - first) * 1000 if watch.times else 0.0,
            "decode_steps": max(len(watch.times) - 1, 0),
            "ttft_ms": (first - start) * 1000, "generate_ms": (end - start) * 1000}


# ---------------------------------------------------------------------------------------- systems


class BundleRetriever:
    """The device retriever (ONNX query encoder + hnswlib), shared by the ONNX systems."""

    def __init__(self, pipeline):
        self.p = pipeline

    def retrieve(self, question: str, k: int) -> tuple[list[str], dict]:
        t0 = time.perf_counter()
        vector = self.p.encoder.encode([question])
        t1 = time.perf_counter()
        rows, _ = self.p.search(vector, k)
        t2 = time.perf_counter()
        ids = [p["id"] for p in self.p.passages_at(rows[0])]
        return ids, {"encode_ms": (t1 - t0) * 1000, "search_ms": (t2 - t1) * 1000}


class BundleSystem:
    def __init__(self, spec: dict):
        started = time.time()
        from edgerag.runtime import Pipeline

        imported = time.time()
        self.stage_rss_mb = {"import": rss_mb()}
        # verified, as on a device: cold start includes the checksums
        self.p = Pipeline.load(spec["bundle"], threads=spec["threads"], prompt_lookup=spec.get("prompt_lookup"))
        self.start_phases_s = {"import": imported - started, "load": time.time() - imported}
        self.retriever = BundleRetriever(self.p)
        self.size_mb = self.p.manifest.megabytes
        gen = self.p.manifest.generator
        # a decoding step reads the decoder's weights (an encoder-decoder's encoder runs once per question)
        self.generator_onnx = Path(spec["bundle"]) / (gen.decoder_onnx or gen.onnx)

    def answer(self, question: str, passages: list[tuple[str, str]], max_new_tokens: int) -> dict:
        a = self.p.answer_with_passages(question, passages, max_new_tokens)
        t = a.timings
        return {"answer": a.answer, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                "prefill_ms": t.get("prefill_ms", 0.0), "decode_ms": t.get("decode_ms", 0.0),
                "decode_steps": t.get("decode_steps", max(a.new_tokens - 1, 0)),
                "decode_tokens": t.get("decode_tokens", t.get("decode_steps", max(a.new_tokens - 1, 0))),
                "ttft_ms": t.get("ttft_ms", t.get("total_ms", 0.0)), "generate_ms": t["total_ms"]}

    def own(self, question: str, max_new_tokens: int) -> dict:
        """The device's whole path: its own k, its compressed context where it has one."""
        a = self.p.ask(question, max_new_tokens=max_new_tokens)
        t = a.timings
        searched = t["encode_ms"] + t["search_ms"]
        return {"answer": a.answer, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                "prefill_ms": t.get("prefill_ms", 0.0), "decode_ms": t.get("decode_ms", 0.0),
                "decode_steps": t.get("decode_steps", max(a.new_tokens - 1, 0)),
                "decode_tokens": t.get("decode_tokens", t.get("decode_steps", max(a.new_tokens - 1, 0))),
                "ttft_ms": t.get("ttft_ms", t["total_ms"]) - searched, "generate_ms": t["total_ms"] - searched,
                "encode_ms": t["encode_ms"], "search_ms": t["search_ms"], "compress_ms": t.get("compress_ms", 0.0)}

    def floors(self) -> dict:
        from edgerag.benchmarks.machine import onnx_kv_bytes_per_position, onnx_weight_bytes

        return {"weight_bytes": onnx_weight_bytes(self.generator_onnx), **manifest_shape(self.p.manifest),
                **onnx_kv_bytes_per_position(self.generator_onnx),
                # what the generator drafts per step: 0 where its graph cannot check drafts, whatever was asked
                "prompt_lookup": getattr(self.p.generator, "prompt_lookup", 0)}


class TorchSystem:
    def __init__(self, spec: dict):
        import torch

        from edgerag.export.bundle import stop_token_ids
        from edgerag.runtime.prompt import PromptTemplate, build_prompt_ids
        from edgerag.train.retrieval import embed, passage_text
        from edgerag.models import load_encoder, load_generator, passage_encoder_folder, read_info
        from edgerag.runtime.compress import Compression

        torch.set_num_threads(spec["threads"])
        torch.set_flush_denormal(True)  # denormals make CPU matmuls several times slower
        self.torch, self.build_prompt_ids, self.embed = torch, build_prompt_ids, embed
        folder = Path(spec["folder"])
        self.encoder, self.enc_tok, self.pooling, self.max_length = load_encoder(folder / "query_encoder")
        self.model, self.tokenizer = load_generator(folder / "generator")
        self.model.eval()
        info = read_info(folder)
        self.compression = Compression.from_dict(info["compression"]) if info.get("compression") else None
        self.template = PromptTemplate.for_vocab(self.tokenizer.get_vocab().get, info.get("template") == "compact")
        self.stop = stop_token_ids(self.tokenizer, self.template)
        self.budget = spec["max_context"] - spec["max_new_tokens"]

        # the system's own retriever: the bundle's passages, embedded with this folder's passage encoder
        import hnswlib

        from edgerag.runtime import read_manifest
        from edgerag.runtime import PassageStore

        p_folder = passage_encoder_folder(folder)
        p_enc = load_encoder(p_folder) if p_folder else (self.encoder, self.enc_tok, self.pooling, self.max_length)
        bundle = Path(spec["bundle"])
        manifest = read_manifest(bundle)
        self.corpus = list(PassageStore(bundle / manifest.passages.file))
        vectors = embed(p_enc[0], p_enc[1], [passage_text(t, x) for _, t, x in self.corpus], p_enc[2], p_enc[3])
        idx = manifest.index  # the bundle's own index settings, so the two retrievers differ only in their encoders
        self.index = hnswlib.Index(space=idx.space, dim=vectors.shape[1])
        self.index.init_index(max_elements=len(vectors), ef_construction=idx.ef_construction, M=idx.M, random_seed=0)
        self.index.add_items(vectors, np.arange(len(vectors)))
        self.index.set_ef(idx.ef)
        self.index.set_num_threads(1)
        self.size_mb = dir_size_mb([folder / "query_encoder", folder / "generator"])
        self.retriever = self
        if self.compression is not None:
            # a compressed student's piece vectors, computed before it answers (a bundle ships them)
            from edgerag.train.compression_fit import PieceEmbedder

            self.pieces = PieceEmbedder(p_folder or folder / "query_encoder", self.compression.max_piece_words)
            self.pieces([(t, x) for _, t, x in self.corpus])

    def retrieve(self, question: str, k: int) -> tuple[list[str], dict]:
        ids, times, _ = self._search(question, k)
        return ids, times

    def _search(self, question: str, k: int):
        t0 = time.perf_counter()
        vector = self.embed(self.encoder, self.enc_tok, [question], self.pooling, self.max_length)
        t1 = time.perf_counter()
        rows, _ = self.index.knn_query(vector, k=min(k, len(self.corpus)))
        t2 = time.perf_counter()
        return [self.corpus[r][0] for r in rows[0]], {"encode_ms": (t1 - t0) * 1000, "search_ms": (t2 - t1) * 1000}, \
            (vector[0], [self.corpus[r][1:] for r in rows[0]])

    def own(self, question: str, max_new_tokens: int) -> dict | None:
        """A compressed student's whole path: its top passages, their selected pieces (None: the
        student reads whole passages, like any system)."""
        if self.compression is None:
            return None
        _, times, (vector, found) = self._search(question, self.compression.passages)
        return {**self.answer(question, found, max_new_tokens, vector), **times}

    def answer(self, question: str, passages: list[tuple[str, str]], max_new_tokens: int, vector=None) -> dict:
        """Generation from passages; a compressed student first selects their pieces (as a bundle's
        answer_with_passages does), with `vector` or the question embedded here."""
        torch = self.torch
        start = time.perf_counter()
        encode = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        if self.compression is not None:
            from edgerag.runtime.compress import compress_context

            if vector is None:
                vector = self.embed(self.encoder, self.enc_tok, [question], self.pooling, self.max_length)[0]
            passages = compress_context(self.compression, question, vector, passages, self.pieces(passages), encode)
        prompt = self.build_prompt_ids(encode, self.template, question, passages, self.budget)
        with torch.inference_mode():
            return hf_generate(self.model, prompt, max_new_tokens, self.stop, self.tokenizer.decode, start)

    def floors(self) -> dict:
        from edgerag.benchmarks.machine import torch_kv_bytes_per_position, torch_weight_bytes

        c = self.model.config
        emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        params = sum(p.numel() for p in self.model.parameters())
        if head is None or head.weight.data_ptr() != emb.weight.data_ptr():
            params -= emb.weight.numel()  # a gathered table, not a matmul
        return {"weight_bytes": torch_weight_bytes(self.model), "matmul_params": params,
                "layers": c.num_hidden_layers, "hidden": c.hidden_size, **torch_kv_bytes_per_position(self.model)}


class RagTorchSystem:
    """A hf-rag run's teacher (the RAG model's own generation over one context per passage,
    marginalized) or its encoder-decoder student (its reading) in PyTorch; retrieval by its DPR
    question encoder over the bundle's passages embedded with the DPR passage encoder."""

    def __init__(self, spec: dict):
        import torch

        from edgerag.models import load_encoder, read_info
        from edgerag.runtime import read_manifest
        from edgerag.runtime import PassageStore
        from edgerag.train import rag_model
        from edgerag.train.retrieval import DPR_PASSAGE_FORMAT, embed

        torch.set_num_threads(spec["threads"])
        torch.set_flush_denormal(True)
        self.torch, self.rag, self.embed = torch, rag_model, embed
        folder = Path(spec["folder"])
        info = read_info(folder)
        self.encoder, self.enc_tok, self.pooling, self.max_length = load_encoder(folder / "query_encoder")
        if (folder / "rag").is_dir():
            self.model, tokenizer = rag_model.load_rag(folder / "rag")
            self.generator, self.tokenizer, self.reading = self.model.generator, tokenizer.generator, "teacher"
            sized = [folder / "rag"]
        else:
            from transformers import AutoTokenizer, BartForConditionalGeneration

            self.generator = BartForConditionalGeneration.from_pretrained(folder / "generator").eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder / "generator")
            self.reading, sized = info.get("reading", "concatenated"), [folder / "query_encoder", folder / "generator"]
        self.model_for_floors = self.generator
        self.budget = info.get("max_prompt_tokens", 512)
        p_enc = load_encoder(folder / info.get("passage_encoder", "passage_encoder"))
        bundle = Path(spec["bundle"])
        manifest = read_manifest(bundle)
        self.corpus = list(PassageStore(bundle / manifest.passages.file))
        fmt = info.get("passage_format", DPR_PASSAGE_FORMAT)
        self.vectors = torch.from_numpy(embed(p_enc[0], p_enc[1], [fmt.format(title=t, text=x) for _, t, x in self.corpus],
                                              p_enc[2], p_enc[3], normalize=False))
        self.row_of = {(t, x): i for i, (_, t, x) in enumerate(self.corpus)}
        self.size_mb = dir_size_mb(sized)
        self.retriever = self

    def retrieve(self, question: str, k: int) -> tuple[list[str], dict]:
        t0 = time.perf_counter()
        vector = self.embed(self.encoder, self.enc_tok, [question], self.pooling, self.max_length, normalize=False)
        t1 = time.perf_counter()
        rows = (self.vectors @ self.torch.from_numpy(vector[0])).topk(min(k, len(self.corpus))).indices.tolist()
        t2 = time.perf_counter()
        return [self.corpus[r][0] for r in rows], {"encode_ms": (t1 - t0) * 1000, "search_ms": (t2 - t1) * 1000}

    def answer(self, question: str, passages: list[tuple[str, str]], max_new_tokens: int) -> dict:
        from transformers import LogitsProcessorList

        from edgerag.data import Passage, Question

        rag, torch = self.rag, self.torch
        start = time.perf_counter()
        rows = [self.row_of[p] for p in passages]
        corpus = {r: Passage(str(r), *self.corpus[r][1:]) for r in rows}
        example, = rag.make_rag_examples([Question("q", question, ("",), "", "", "")], [rows], corpus, self.tokenizer,
                                         self.generator, len(rows), self.budget, 1, 0.0, None, {})
        watch = Stopwatch()  # the marginalized student's own loop has no hook: its prefill is the whole time
        processors = LogitsProcessorList([watch])
        pad_id = self.generator.config.pad_token_id
        with torch.inference_mode():
            if self.reading == "concatenated":
                tokens = rag.concatenated_generate(self.generator, [example.concatenated], pad_id, max_new_tokens, processors)[0]
            else:
                scores = rag.doc_scores_for(self.encoder, self.enc_tok, [example], self.vectors)
                if self.reading == "teacher":
                    tokens = rag.rag_generate(self.model, [example], scores, pad_id, max_new_tokens, processors)[0]
                else:
                    tokens = rag.marginal_generate(self.generator, [example], scores, pad_id, max_new_tokens)[0]
        end = time.perf_counter()
        first = watch.times[0] if watch.times else end
        read = [example.concatenated] if self.reading == "concatenated" else example.contexts
        return {"answer": self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "prompt_tokens": sum(len(r) for r in read), "new_tokens": len(tokens),
                "prefill_ms": (first - start) * 1000, "decode_ms": (watch.times[-1] - first) * 1000 if watch.times else 0.0,
                "decode_steps": max(len(watch.times) - 1, 0), "ttft_ms": (first - start) * 1000, "generate_ms": (end - start) * 1000}

    def floors(self) -> dict:
        from edgerag.benchmarks.machine import torch_weight_bytes

        c = self.generator.config
        return {"weight_bytes": torch_weight_bytes(self.generator), "matmul_params": sum(p.numel() for p in self.generator.parameters()),
                "layers": c.decoder_layers, "hidden": c.d_model}


def torch_system(spec: dict):
    """A run folder in PyTorch: a hf-rag teacher or encoder-decoder student, or the default family's."""
    from edgerag.models import read_info

    if read_info(spec["folder"]).get("family") == "encoder-decoder":
        return RagTorchSystem(spec)
    return TorchSystem(spec)


class OptimumSystem:
    """Optimum's ORTModelForCausalLM on a folder made by benchmarks.baselines.optimum_folder."""

    def __init__(self, spec: dict):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        from edgerag.runtime import Pipeline

        # the bundle's retrieval and prompts only: its generator would add to this system's memory
        self.p = Pipeline.load(spec["bundle"], threads=spec["threads"], check=False, retrieval_only=True)
        self.retriever = BundleRetriever(self.p)
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        folder = Path(spec["model_dir"])
        self.model = ORTModelForCausalLM.from_pretrained(folder, session_options=options, use_cache=True,
                                                         use_io_binding=False, provider="CPUExecutionProvider")
        self.stop = self.p.manifest.prompt.stop_token_ids
        self.size_mb = dir_size_mb([f for f in folder.iterdir() if f.suffix in (".onnx", ".onnx_data", ".data")])
        self.onnx = folder / "model.onnx"

    def answer(self, question: str, passages: list[tuple[str, str]], max_new_tokens: int) -> dict:
        start = time.perf_counter()
        prompt = self.p.prompt_ids(question, passages, max_new_tokens)
        return hf_generate(self.model, prompt, max_new_tokens, self.stop, self.p.tokenizer.decode, start)

    def floors(self) -> dict:
        from edgerag.benchmarks.machine import onnx_kv_bytes_per_position, onnx_weight_bytes

        return {"weight_bytes": onnx_weight_bytes(self.onnx), **manifest_shape(self.p.manifest),
                **onnx_kv_bytes_per_position(self.onnx)}


class OrtGenAISystem:
    """onnxruntime-genai's own generation loop on a model-builder folder."""

    def __init__(self, spec: dict):
        import onnxruntime_genai as og

        from edgerag.runtime import Pipeline

        self.og = og
        self.p = Pipeline.load(spec["bundle"], threads=spec["threads"], check=False, retrieval_only=True)
        self.retriever = BundleRetriever(self.p)
        folder = Path(spec["model_dir"])
        self.model = og.Model(str(_threaded_copy(folder, spec["threads"], Path(spec["scratch"]))))
        self.stop = set(self.p.manifest.prompt.stop_token_ids)
        self.size_mb = dir_size_mb([f for f in folder.iterdir() if f.name.startswith("model.onnx")])
        self.onnx = folder / "model.onnx"
        # the builder's graph leaves the KV head size symbolic; its config names it
        self.head_size = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"].get("head_size")

    def answer(self, question: str, passages: list[tuple[str, str]], max_new_tokens: int) -> dict:
        og = self.og
        start = time.perf_counter()
        prompt = self.p.prompt_ids(question, passages, max_new_tokens)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt)  # the prefill
        tokens, times = [], []
        while not generator.is_done() and len(tokens) < max_new_tokens:
            if tokens:
                generator.generate_next_token()  # a decode step (the first token comes from the prefill)
            token = int(generator.get_next_tokens()[0])
            times.append(time.perf_counter())
            if token in self.stop:
                break
            tokens.append(token)
        end = time.perf_counter()
        first = times[0] if times else end
        return {"answer": self.p.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "prompt_tokens": len(prompt), "new_tokens": len(tokens), "prefill_ms": (first - start) * 1000,
                "decode_ms": (times[-1] - first) * 1000 if times else 0.0, "decode_steps": max(len(times) - 1, 0),
                "ttft_ms": (first - start) * 1000, "generate_ms": (end - start) * 1000}

    def floors(self) -> dict:
        from edgerag.benchmarks.machine import onnx_kv_bytes_per_position, onnx_weight_bytes

        return {"weight_bytes": onnx_weight_bytes(self.onnx), **manifest_shape(self.p.manifest),
                **onnx_kv_bytes_per_position(self.onnx, self.head_size)}


def _threaded_copy(folder: Path, threads: int, scratch: Path) -> Path:
    """The model folder with genai_config.json set to `threads` intra-op threads (the weights are symlinked)."""
    out = scratch / f"{folder.name}-t{threads}"
    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "genai_config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((folder / "genai_config.json").read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out


KINDS = {"bundle": BundleSystem, "torch": torch_system, "optimum": OptimumSystem, "ortgenai": OrtGenAISystem}


def bandwidth_probe(spec: dict, system):
    """A function returning the bench's copy-bandwidth probe (machine.BandwidthProbe), measured in the
    bench's process; None where the spec names none. While it measures, a bundle's background
    huge-page work waits, as it does during an answer, so that it does not take the probe's bandwidth."""
    if not spec.get("bandwidth_probe"):
        return None
    import contextlib
    from multiprocessing.connection import Client

    from edgerag.benchmarks.machine import ask_bandwidth

    connection = Client(spec["bandwidth_probe"])
    pipeline = getattr(system, "p", None)
    busy = getattr(pipeline, "answers_in_flight", None) or contextlib.nullcontext()

    def measure() -> float:
        with busy:
            return ask_bandwidth(connection)

    return measure


def run(spec: dict) -> dict:
    """One system on the spec's questions. With spec["passages"], every system answers from those
    (shared) passages; without, each runs its own path: its retriever's top-k (spec["k"]) read whole,
    or, for a system with its own path (a bundle, a compressed student), what it does by itself."""
    started = time.time()
    system = KINDS[spec["kind"]](spec)  # first: a system times its own imports
    load_s = time.time() - spec["launched"]
    # resident memory after each stage; a system that measures its own import/load phases says so
    stage_rss = {**getattr(system, "stage_rss_mb", {}), "load": rss_mb()}
    phases = {"process start": started - spec["launched"], **getattr(system, "start_phases_s", {"load": time.time() - started})}
    from edgerag.metrics import best_over_references, exact_match, f1, recall_at
    from edgerag.runtime import read_manifest
    from edgerag.runtime import PassageStore

    questions, shared, n_new = spec["questions"], spec.get("passages"), spec["max_new_tokens"]
    bundle = Path(spec["bundle"])
    store = PassageStore(bundle / read_manifest(bundle).passages.file) if shared is None else None
    corpus = {}  # (title, text) by passage id, read from the store as asked, so that it adds no memory of its own

    def passage(pid: str) -> tuple[str, str]:
        if pid not in corpus:
            corpus.update({p: (title, text) for p, title, text in
                           store.db.execute("SELECT id, title, text FROM passages WHERE id = ?", (pid,))})
        return corpus[pid]

    def ask(i: int) -> dict:
        q = questions[i]
        own = getattr(system, "own", None)
        out = own(q["question"], n_new) if shared is None and own is not None else None
        if out is not None:
            ids, _ = system.retriever.retrieve(q["question"], RECALL_K)  # for recall@5 only, untimed
            times = {"encode_ms": out.pop("encode_ms"), "search_ms": out.pop("search_ms")}
        else:
            ids, times = system.retriever.retrieve(q["question"], max(spec["k"], RECALL_K))
            passages = [tuple(p) for p in shared[i]] if shared is not None else [passage(pid) for pid in ids[:spec["k"]]]
            out = system.answer(q["question"], passages, n_new)
        out.update(times)
        out["ranked_ids"] = ids
        out["total_ms"] = times["encode_ms"] + times["search_ms"] + out["generate_ms"]
        out["ttft_ms"] += times["encode_ms"] + times["search_ms"]
        return out

    before_first = time.time()
    ask(0)  # cold: process start to the first answer, then it is asked again warm
    cold_start_s = time.time() - spec["launched"]
    phases["first answer"] = time.time() - before_first
    stage_rss["first answer"] = rss_mb()
    probe = bandwidth_probe(spec, system)
    rows = []
    for i, q in enumerate(questions):
        r = ask(i)
        r["em"] = best_over_references(exact_match, r["answer"], q["answers"])
        r["f1"] = best_over_references(f1, r["answer"], q["answers"])
        r["recall@5"] = recall_at(r["ranked_ids"], q["passage_id"], RECALL_K)
        if probe:
            r["bandwidth_gb_s"] = probe()  # the copy bandwidth right after this question ran
        rows.append(r)
    stage_rss[f"after {len(questions) + 1} answers"] = rss_mb()
    return {"name": spec["name"], "threads": spec["threads"], "load_s": load_s, "cold_start_s": cold_start_s,
            "cold_start_phases_s": phases, "peak_rss_mb": peak_rss_mb(), "rss_by_stage_mb": stage_rss,
            "huge_pages_mb": status_mb("AnonHugePages", "smaps_rollup"),  # anonymous memory on huge pages
            "size_mb": system.size_mb, **system.floors(), "per_question": rows}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
