"""Student (or teacher) models -> ONNX graphs, with Optimum's exporter plus two small graph edits.

- The query encoder's graph ends in the sentence embedding: pooled (mean or CLS, as the model's
  sentence-transformers config says) and L2-normalized, so the device does no pooling itself.
- The generator's graph (one graph for prefill and decode, with a KV cache) computes vocabulary
  logits for the last position only: a RAG prompt has hundreds of positions, the device needs
  one, and the LM head is the largest matrix in a small model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgerag.export.llama_graph import LOGITS, UnsupportedModel, build_llama_graph
from edgerag.models import resolve

log = logging.getLogger(__name__)

ENCODER_OUTPUT = "embedding"


def materialize(name: str, workdir: Path, causal_lm: bool = False) -> Path:
    """A local Hugging Face folder for any model source; GGUF and hub models are saved to `workdir`."""
    from transformers import AutoConfig, AutoTokenizer

    source = resolve(name)
    folder = Path(source.path)
    if folder.is_dir() and not source.gguf_file and (folder / "tokenizer.json").exists():
        return folder
    workdir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    # a GGUF config names no architecture, so the caller says which head the model needs
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM if causal_lm else AutoModel
    model = auto.from_pretrained(source.path, **source.kwargs())
    model.save_pretrained(workdir)
    AutoTokenizer.from_pretrained(source.path, **source.kwargs()).save_pretrained(workdir)
    if folder.is_dir():  # keep sentence-transformers files (pooling config) beside the weights
        for extra in ("modules.json", "sentence_bert_config.json", "1_Pooling"):
            if (folder / extra).is_dir():
                shutil.copytree(folder / extra, workdir / extra, dirs_exist_ok=True)
            elif (folder / extra).exists():
                shutil.copy(folder / extra, workdir / extra)
    return workdir


def _optimum_export(folder: Path, task: str) -> onnx.ModelProto:
    import warnings

    from optimum.exporters.onnx import main_export
    from optimum.utils import logging as optimum_logging
    from transformers.utils import logging as hf_logging

    # the tracer's warnings are about shapes that the exported graph keeps dynamic anyway
    hf_logging.set_verbosity_error()
    optimum_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(folder), output=out, task=task, do_validation=False)
        return onnx.load(str(Path(out) / "model.onnx"))


def export_query_encoder(folder: Path, pooling: str, normalize: bool = True) -> onnx.ModelProto:
    model = _optimum_export(folder, "feature-extraction")
    return add_pooling(model, pooling, normalize)


def add_pooling(model: onnx.ModelProto, pooling: str, normalize: bool = True) -> onnx.ModelProto:
    """Replace the `last_hidden_state` output by the pooled `embedding` [batch, dim], L2-normalized
    unless told otherwise (DPR scores raw vectors)."""
    graph = model.graph
    hidden = "last_hidden_state"
    if hidden not in [o.name for o in graph.output]:
        raise ValueError(f"encoder graph has no {hidden} output: {[o.name for o in graph.output]}")
    nodes = []
    consts = [numpy_helper.from_array(v, n) for n, v in [
        ("pool_axis1", np.array([1], dtype="int64")),
        ("pool_axis_last", np.array([-1], dtype="int64")),
        ("pool_eps", np.array(1e-9, dtype="float32")),
        ("norm_eps", np.array(1e-12, dtype="float32")),
        ("cls_index", np.array(0, dtype="int64")),
    ]]
    if pooling == "mean":
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["pool_mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["pool_mask_f", "pool_axis_last"], ["pool_mask_3d"]),
            helper.make_node("Mul", [hidden, "pool_mask_3d"], ["pool_masked"]),
            helper.make_node("ReduceSum", ["pool_masked", "pool_axis1"], ["pool_sum"], keepdims=0),
            helper.make_node("ReduceSum", ["pool_mask_3d", "pool_axis1"], ["pool_count"], keepdims=0),
            helper.make_node("Max", ["pool_count", "pool_eps"], ["pool_count_safe"]),
            helper.make_node("Div", ["pool_sum", "pool_count_safe"], ["pooled"]),
        ]
    elif pooling == "cls":
        nodes.append(helper.make_node("Gather", [hidden, "cls_index"], ["pooled"], axis=1))
    else:
        raise ValueError(f"unknown pooling {pooling!r}: expected 'mean' or 'cls'")
    if normalize:
        nodes += [
            helper.make_node("ReduceL2", ["pooled", "pool_axis_last"], ["pool_norm"], keepdims=1),
            helper.make_node("Max", ["pool_norm", "norm_eps"], ["pool_norm_safe"]),
            helper.make_node("Div", ["pooled", "pool_norm_safe"], [ENCODER_OUTPUT]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["pooled"], [ENCODER_OUTPUT]))
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    dim = None
    for o in graph.output:
        if o.name == hidden:
            dim = o.type.tensor_type.shape.dim[-1]
    del graph.output[:]
    out = helper.make_tensor_value_info(ENCODER_OUTPUT, TensorProto.FLOAT, ["batch_size", dim.dim_value or "dim"])
    graph.output.append(out)
    onnx.checker.check_model(model)
    return model


GRAPHS = ("auto", "fused", "optimum")


def export_generator(folder: Path, model=None, graph: str = "auto") -> tuple[onnx.ModelProto, str]:
    """(generator graph, which builder wrote it).

    graph: "fused" writes Llama-family models with onnxruntime's fused operators (llama_graph.py),
    "optimum" traces any causal LM with Optimum, "auto" takes "fused" where the model allows.
    """
    if graph not in GRAPHS:
        raise ValueError(f"unknown generator graph {graph!r}; choose from {', '.join(GRAPHS)}")
    if graph in ("auto", "fused"):
        if model is None:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder)
        try:
            return build_llama_graph(model), "fused-llama"
        except UnsupportedModel as reason:
            if graph == "fused":
                raise
            log.info("%s; exporting with Optimum", reason)
    model = _optimum_export(folder, "text-generation-with-past")
    return last_position_logits(model), "optimum"


def _producer(graph, name):
    for node in graph.node:
        if name in node.output:
            return node
    return None


def last_position_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """Slice the hidden states to the last position before the LM head: logits become [batch, 1, vocab]."""
    graph = model.graph
    head = _producer(graph, LOGITS)
    if head is None or head.op_type not in ("MatMul", "Gemm"):
        raise ValueError(f"cannot find the LM head MatMul producing {LOGITS!r}")
    hidden = head.input[0]
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], dtype="int64"), "last_pos_start"),
        numpy_helper.from_array(np.array([2**62], dtype="int64"), "last_pos_end"),
        numpy_helper.from_array(np.array([1], dtype="int64"), "last_pos_axis"),
    ])
    sliced = hidden + "_last_position"
    slice_node = helper.make_node("Slice", [hidden, "last_pos_start", "last_pos_end", "last_pos_axis"], [sliced],
                                  name="last_position_slice")
    head.input[0] = sliced
    # keep topological order: the slice goes right before the head
    index = list(graph.node).index(head)
    graph.node.insert(index, slice_node)
    for o in graph.output:
        if o.name == LOGITS:
            o.type.tensor_type.shape.dim[1].dim_value = 1
    return model


def untie_lm_head(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the LM head its own (transposed) weight, where it reads the embedding through a Transpose.

    Tied embeddings are stored once in fp32 exports; quantizers only see MatMuls whose weight is
    an initializer, so a quantized export needs the head's weight as one of its own.
    """
    graph = model.graph
    head = _producer(graph, LOGITS)
    transpose = _producer(graph, head.input[1])
    if transpose is None or transpose.op_type != "Transpose":
        return model
    inits = {i.name: i for i in graph.initializer}
    weight = numpy_helper.to_array(inits[transpose.input[0]])
    graph.initializer.append(numpy_helper.from_array(weight.T.copy(), "lm_head.weight"))
    head.input[1] = "lm_head.weight"
    if not any(transpose.output[0] in n.input for n in graph.node):
        graph.node.remove(transpose)
    return model


def split_lm_head(model: onnx.ModelProto, max_params: int = 4_000_000) -> onnx.ModelProto:
    """Compute the logits in vocabulary slices of at most `max_params` weights each, concatenated.

    onnxruntime prepacks a quantized MatMul's weight into a copy of its own while the original,
    memory-mapped, is resident; the pages are let go only once that weight is packed. For the LM
    head, the largest matrix (49152 x 576 in SmolLM2), that left ~28 MB of load-time peak above the
    loaded pipeline; slices bound it by their size. Same logits, bit for bit: each slice is the same
    dot products. A head that is not a MatMul with an initializer weight is left as it is.
    """
    graph = model.graph
    head = _producer(graph, LOGITS)
    inits = {i.name: i for i in graph.initializer}
    if head is None or head.op_type != "MatMul" or head.input[1] not in inits:
        return model
    weight = numpy_helper.to_array(inits[head.input[1]])
    hidden, vocab = weight.shape
    slices = -(-hidden * vocab // max_params)
    if slices < 2 or sum(head.input[1] in n.input for n in graph.node) > 1:
        return model
    bounds = np.linspace(0, vocab, slices + 1).astype(int)
    graph.initializer.remove(inits[head.input[1]])
    index = list(graph.node).index(head)
    graph.node.remove(head)
    parts = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        name = f"{head.input[1]}.{i}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight[:, start:end]), name))
        parts.append(f"{LOGITS}.{i}")
        graph.node.insert(index + i, helper.make_node("MatMul", [head.input[0], name], [parts[-1]], name=f"lm_head.{i}"))
    graph.node.insert(index + slices, helper.make_node("Concat", parts, [LOGITS], name="lm_head.concat", axis=-1))
    return model


def save(model: onnx.ModelProto, path: Path) -> None:
    """One self-contained .onnx file (all our models are far below protobuf's 2 GB limit)."""
    onnx.save_model(model, str(path), save_as_external_data=False)
