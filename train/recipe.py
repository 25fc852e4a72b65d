"""A distillation recipe: a TOML file read into small dataclasses of plain values, and validated.

Every key has a default here; a recipe names only what it changes. An unknown key or a value of
the wrong type is an error that names the key, and so is a student layer list that does not fit
the teacher, which we check from the teacher's config before any model loads.
"""

from __future__ import annotations

import dataclasses
import json
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class RecipeError(ValueError):
    pass


@dataclass
class DataConfig:
    train: str = "squad-v1.1-train.json.gz"
    eval: str = "xquad-en.json.gz"
    corpus: str = ""                 # a JSONL corpus; empty: the passages of the train and eval files
    corpus_scope: str = "files"      # "files": every passage of both files; "sampled": the sampled train passages + the eval file
    train_questions: int = 0         # questions sampled from the train file (0: all)
    eval_questions: int = 0          # questions sampled from the eval file (0: all)
    data_dir: str = ""               # where bare file names are looked up (default: EDGERAG_DATA or ../shared/data)


@dataclass
class PromptConfig:
    max_prompt_tokens: int = 512
    max_answer_tokens: int = 24


@dataclass
class TeacherConfig:
    kind: str = "decoder-only"       # "decoder-only": query_encoder + generator; "hf-rag": a Hugging Face RAG checkpoint
    query_encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    generator: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    rag: str = ""                    # hf-rag: a RagTokenForGeneration / RagSequenceForGeneration folder or hub id
    context_encoder: str = ""        # hf-rag: the DPR context encoder of its passages (RAG checkpoints ship without)


@dataclass
class FinetuneConfig:
    """RAG-style fine-tuning of the teacher generator: question + top-k retrieved passages -> gold answer."""
    enabled: bool = True
    examples: int = 600
    k: int = 3                       # retrieved passages in the prompt
    gold_probability: float = 0.5    # chance that the gold passage is inserted (at a random rank) when retrieval missed it
    max_prompt_tokens: int = 384
    epochs: int = 1
    batch_size: int = 4
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 5
    train_layers: int = 0            # train only the top N decoder layers (+ final norm); 0: everything
    context: str = "whole"           # "compressed": read [compress]'s pieces of the top compress.passages passages, as the student does


@dataclass
class StudentConfig:
    generator: str = ""              # a smaller pretrained model with the teacher's tokenizer; empty: derive from the teacher
    layers: typing.Any = "all"       # "all", "auto:N" (drop the most redundant block), or a list of teacher layer indices
    intermediate_size: int = 0       # MLP width after activation-importance pruning (0: keep)
    kv_heads: int = 0                # key/value head groups kept, by attention importance (0: keep)
    vocabulary: str = "full"         # "corpus": keep only the tokens of the corpus, train questions, answers and prompt
    query_encoder: str = ""          # a smaller pretrained encoder; empty: derive from the teacher's; "teacher": keep the
                                     # teacher's as it is (no encoder distillation; decoder-only: passages share it)
    passage_encoder: str = "student" # "teacher": passages keep the teacher's vectors; only queries use the student encoder
    encoder_layers: typing.Any = 0   # int N (evenly spaced) or a list of teacher encoder layers (0: keep all)
    calibration_passages: int = 16
    generator_encoder_layers: typing.Any = "all"  # hf-rag: BART encoder layers kept (DistilBART keeps them all)
    reading: str = "concatenated"    # hf-rag: "concatenated" top-k passages in one context, or "marginalized" like the teacher

    @property
    def keeps_teacher_encoder(self) -> bool:
        """The student's query encoder is the teacher's, undistilled (query_encoder = "teacher")."""
        return self.query_encoder == "teacher"


@dataclass
class EncoderDistillConfig:
    queries: int = 2000              # train questions used as distillation queries
    passages: int = 500              # corpus passages also matched (the device embeds added passages with the student)
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4
    mse_weight: float = 1.0
    cosine_weight: float = 0.0
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.05
    warmup_steps: int = 5


@dataclass
class GeneratorDistillConfig:
    examples: int = 600
    k: int = 3
    gold_probability: float = 0.5
    max_prompt_tokens: int = 384
    epochs: int = 1
    batch_size: int = 4
    lr: float = 5e-5
    temperature: float = 2.0
    alpha: float = 0.5               # loss = alpha * CE(gold) + (1 - alpha) * T^2 * KL(teacher || student)
    top_k: int = 32                  # teacher logits cached as top-k per answer position
    seq_kd: bool = False             # also train on teacher-generated answers (sequence-level KD)
    hidden_weight: float = 0.0       # MSE between final hidden states at answer positions
    gradient_weight: float = 0.0     # match the teacher's input gradient too (train/gradient.py); 0: outputs only
    gradient_projections: int = 16   # random projections per input position for gradient matching
    warmup_steps: int = 5
    train_layers: int = 0            # train only the top N decoder layers (+ final norm); 0: everything
    questions: str = "teacher"       # "teacher": the first train questions, those the teacher was fine-tuned on;
                                     # "fresh": the next ones, whose answers the teacher has not learned by heart


@dataclass
class GeneralDistillConfig:
    """TinyBERT's first stage: the student imitates the teacher on plain corpus text, no labels, before
    the task pass. KL over every next token of a passage chunk (+ hidden-state MSE)."""
    passages: int = 0                # corpus passages to distill on (0: skip the stage)
    chunk_tokens: int = 128          # each passage's first N tokens
    epochs: int = 1
    batch_size: int = 4
    lr: float = 2e-4
    temperature: float = 2.0
    top_k: int = 32
    hidden_weight: float = 0.0
    warmup_steps: int = 5
    train_layers: int = 0


@dataclass
class CompressConfig:
    """The student reads a compressed context (runtime/compress.py): the pieces of its top `passages`
    retrieved passages that the selector ranks highest, up to `budget` tokens, in a compact prompt.
    The teacher keeps reading its full top-k passages; the KL is taken across the two contexts."""
    enabled: bool = False
    passages: int = 5                # retrieved passages whose pieces compete (the student may look wider than the teacher)
    budget: int = 48                 # generator tokens of selected piece text per prompt
    fit_selector: bool = True        # weigh the selector's features on train questions (else dense 1, lexical 1)
    fit_questions: int = 200         # train questions the selector is fitted on
    # what the fit maximizes: "answer" (the selected pieces hold a gold answer) or "teacher" (they keep
    # the piece after which the teacher finds the gold answer most likely: RECOMP's positives)
    fit_target: str = "answer"


@dataclass
class AbstainConfig:
    """Teacher and student learn to answer NO_ANSWER (runtime.prompt) where their passages cannot
    answer: retrieval's passages without the gold one and any holding an answer, or another article's."""
    negatives: float = 0.0           # share of fine-tuning and distillation examples that are such (0: always answer)
    calibration_questions: int = 80  # held-in train questions (half made unanswerable) the export fits the threshold on


@dataclass
class EvalConfig:
    questions: int = 0               # 0: data.eval_questions
    k: int = 3
    batch_size: int = 8
    unanswerable: float = 0.0        # share of the questions also asked over passages that cannot answer (abstention figures)


@dataclass
class RunConfig:
    checkpoint_every: int = 50       # optimizer steps (teacher caches: batches) between checkpoints
    threads: int = 0                 # torch threads (0: torch's default)
    precision: str = "auto"          # training's matmuls: "bf16" (autocast, fp32 weights), "fp32", or "auto": bf16 where the hardware has it
    batching: str = "length"         # "length": batches of similar lengths (little padding); "random": slices of the permutation


@dataclass
class Recipe:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill_encoder: EncoderDistillConfig = field(default_factory=EncoderDistillConfig)
    distill_general: GeneralDistillConfig = field(default_factory=GeneralDistillConfig)
    distill_generator: GeneratorDistillConfig = field(default_factory=GeneratorDistillConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    abstain: AbstainConfig = field(default_factory=AbstainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(name: str, value, annotation):
    if annotation is typing.Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise RecipeError(f"{name}: expected {annotation.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a table, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = prefix + key
        if key not in known:
            raise RecipeError(f"unknown key {name!r} (known under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, name + ".")
        else:
            kwargs[key] = _check_type(name, value, hint)
    return cls(**kwargs)


def parse_layers(spec, depth: int, name: str) -> list[int] | str:
    """'all' -> every layer; 'auto:N' stays a string (resolved with calibration data); a list is checked."""
    if spec in ("all", 0):
        return list(range(depth))
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 0 < spec <= depth:
            raise RecipeError(f"{name}: {spec} layers requested but the teacher has {depth}")
        return evenly_spaced(depth, spec)
    if isinstance(spec, str) and spec.startswith("auto:"):
        try:
            n = int(spec[5:])
        except ValueError:
            raise RecipeError(f"{name}: expected 'auto:N', got {spec!r}") from None
        if not 0 < n <= depth:
            raise RecipeError(f"{name}: auto:{n} asks for {n} layers but the teacher has {depth}")
        return spec
    if isinstance(spec, list) and spec and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        bad = [i for i in spec if not 0 <= i < depth]
        if bad:
            raise RecipeError(f"{name}: layers {bad} are outside the teacher's depth (0..{depth - 1})")
        if len(set(spec)) != len(spec):
            raise RecipeError(f"{name}: a layer is listed twice: {spec}")
        return sorted(spec)
    raise RecipeError(f"{name}: expected 'all', 'auto:N', an int, or a list of layer indices, got {spec!r}")


def evenly_spaced(depth: int, n: int) -> list[int]:
    if n == 1:
        return [0]
    return sorted({round(i * (depth - 1) / (n - 1)) for i in range(n)})


def model_depth(name: str) -> int | None:
    """Number of transformer layers, read from config.json or the GGUF header (no weights loaded)."""
    from edgerag.models import resolve

    try:
        source = resolve(name)
    except FileNotFoundError:
        return None
    folder = Path(source.path)
    if source.gguf_file:
        return _gguf_block_count(folder / source.gguf_file)
    cfg = folder / "config.json"
    if not cfg.exists():
        return None
    c = json.loads(cfg.read_text())
    return c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")


def load_recipe(path: str | Path, check_models: bool = True) -> Recipe:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    try:
        recipe = _build(Recipe, raw, "")
        validate(recipe, check_models)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    return recipe


def validate(r: Recipe, check_models: bool = True) -> None:
    g, ft = r.distill_generator, r.teacher_finetune
    if g.questions not in ("teacher", "fresh"):
        raise RecipeError(f"distill_generator.questions: expected 'teacher' or 'fresh', got {g.questions!r}")
    if g.questions == "fresh" and ft.enabled and r.data.train_questions \
            and r.data.train_questions < ft.examples + g.examples:
        raise RecipeError(f"distill_generator.questions = 'fresh' takes the {g.examples} train questions after the "
                          f"teacher's {ft.examples}: data.train_questions ({r.data.train_questions}) must be at least "
                          f"{ft.examples + g.examples}")
    if r.teacher.kind not in ("decoder-only", "hf-rag"):
        raise RecipeError(f"teacher.kind: expected 'decoder-only' or 'hf-rag', got {r.teacher.kind!r}")
    if r.teacher.kind == "hf-rag":
        for key in ("rag", "context_encoder"):
            if not getattr(r.teacher, key):
                raise RecipeError(f"teacher.{key}: a hf-rag teacher needs it")
        if r.student.reading not in ("concatenated", "marginalized"):
            raise RecipeError(f"student.reading: expected 'concatenated' or 'marginalized', got {r.student.reading!r}")
        for key in ("generator", "query_encoder"):
            if getattr(r.student, key) and not (key == "query_encoder" and r.student.keeps_teacher_encoder):
                raise RecipeError(f"student.{key}: a hf-rag student is cut from the teacher's layers; leave it empty")
        if r.distill_general.passages:
            raise RecipeError("distill_general.passages: the general pass is not available for hf-rag teachers yet")
        if r.distill_generator.max_prompt_tokens != r.prompt.max_prompt_tokens:
            # the bundle's context is prompt.max_prompt_tokens: the student must be trained on the same
            raise RecipeError(f"distill_generator.max_prompt_tokens ({r.distill_generator.max_prompt_tokens}) must equal "
                              f"prompt.max_prompt_tokens ({r.prompt.max_prompt_tokens}) for a hf-rag student")
    if r.compress.enabled:
        if r.teacher.kind == "hf-rag":
            raise RecipeError("compress.enabled: a compressed context is available for decoder-only students only")
        if r.compress.fit_target not in ("answer", "teacher"):
            raise RecipeError(f"compress.fit_target: 'answer' or 'teacher', got {r.compress.fit_target!r}")
        for key in ("passages", "budget", "fit_questions"):
            if getattr(r.compress, key) < 1:
                raise RecipeError(f"compress.{key}: must be at least 1, got {getattr(r.compress, key)}")
    if r.teacher_finetune.context not in ("whole", "compressed"):
        raise RecipeError(f"teacher_finetune.context: 'whole' or 'compressed', got {r.teacher_finetune.context!r}")
    if r.teacher_finetune.context == "compressed" and not (r.compress.enabled and r.teacher_finetune.enabled):
        raise RecipeError('teacher_finetune.context = "compressed": the teacher reads [compress]\'s pieces, '
                          "so it needs compress.enabled = true and teacher_finetune.enabled = true")
    if not 0.0 <= r.abstain.negatives < 1.0:
        raise RecipeError(f"abstain.negatives: a share of the examples, from 0 to below 1, got {r.abstain.negatives}")
    if r.abstain.negatives and r.teacher.kind == "hf-rag":
        raise RecipeError("abstain.negatives: abstention is learned by decoder-only teachers and students only")
    if not 0.0 <= r.eval.unanswerable < 1.0:
        raise RecipeError(f"eval.unanswerable: a share of the questions, from 0 to below 1, got {r.eval.unanswerable}")
    if r.eval.unanswerable and r.teacher.kind == "hf-rag":
        raise RecipeError("eval.unanswerable: abstention figures are taken for decoder-only runs only")
    if r.run.checkpoint_every < 1:
        raise RecipeError(f"run.checkpoint_every: at least 1, got {r.run.checkpoint_every}")
    if r.abstain.calibration_questions < 2:
        raise RecipeError(f"abstain.calibration_questions: at least 2, got {r.abstain.calibration_questions}")
    if r.distill_generator.gradient_weight < 0 or r.distill_generator.gradient_projections < 1:
        raise RecipeError("distill_generator.gradient_weight must be >= 0 and gradient_projections >= 1")
    from .loop import BATCHINGS, PRECISIONS

    for key, value, allowed in (("precision", r.run.precision, PRECISIONS), ("batching", r.run.batching, BATCHINGS)):
        if value not in allowed:
            raise RecipeError(f"run.{key}: expected one of {', '.join(allowed)}, got {value!r}")
    if r.data.corpus_scope not in ("files", "sampled"):
        raise RecipeError(f"data.corpus_scope: expected 'files' or 'sampled', got {r.data.corpus_scope!r}")
    if r.student.passage_encoder not in ("student", "teacher"):
        raise RecipeError(f"student.passage_encoder: expected 'student' or 'teacher', got {r.student.passage_encoder!r}")
    if r.student.vocabulary not in ("full", "corpus"):
        raise RecipeError(f"student.vocabulary: expected 'full' or 'corpus', got {r.student.vocabulary!r}")
    for name, value in [("teacher_finetune.gold_probability", r.teacher_finetune.gold_probability),
                        ("distill_generator.gold_probability", r.distill_generator.gold_probability),
                        ("distill_generator.alpha", r.distill_generator.alpha)]:
        if not 0.0 <= value <= 1.0:
            raise RecipeError(f"{name}: must be between 0 and 1, got {value}")
    for name, value in [("teacher_finetune.epochs", r.teacher_finetune.epochs), ("distill_encoder.batch_size", r.distill_encoder.batch_size),
                        ("distill_generator.batch_size", r.distill_generator.batch_size), ("teacher_finetune.batch_size", r.teacher_finetune.batch_size),
                        ("distill_generator.top_k", r.distill_generator.top_k), ("eval.k", r.eval.k), ("prompt.max_prompt_tokens", r.prompt.max_prompt_tokens)]:
        if value < 1:
            raise RecipeError(f"{name}: must be at least 1, got {value}")
    if r.distill_generator.temperature <= 0:
        raise RecipeError(f"distill_generator.temperature: must be positive, got {r.distill_generator.temperature}")
    if r.student.keeps_teacher_encoder and r.student.encoder_layers not in (0, "all"):
        raise RecipeError(f"student.encoder_layers: {r.student.encoder_layers!r} cuts the encoder that "
                          'student.query_encoder = "teacher" keeps whole; leave it out')
    if not check_models or r.teacher.kind == "hf-rag":  # hf-rag layer lists are checked when the teacher loads
        return
    if not r.student.generator:
        depth = model_depth(r.teacher.generator)
        if depth is not None:
            parse_layers(r.student.layers, depth, "student.layers")
    elif r.student.layers != "all":
        raise RecipeError("student.layers: only applies to a student derived from the teacher (student.generator is set)")
    if not r.student.query_encoder:  # "teacher" keeps it whole
        depth = model_depth(r.teacher.query_encoder)
        if depth is not None:
            parse_layers(r.student.encoder_layers, depth, "student.encoder_layers")


def _gguf_block_count(path: Path) -> int | None:
    """`<arch>.block_count` from a GGUF header, reading only the metadata before it (fast on big files)."""
    import struct

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    formats = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return None
        version, = struct.unpack("<I", f.read(4))
        _, n_kv = struct.unpack("<QQ", f.read(16))

        def read_str():
            n, = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")

        def skip(kind):
            if kind == 8:
                read_str()
            elif kind == 9:
                inner, n = struct.unpack("<IQ", f.read(12))
                if inner in sizes:
                    f.seek(sizes[inner] * n, 1)
                else:
                    for _ in range(n):
                        skip(inner)
            else:
                f.seek(sizes[kind], 1)

        for _ in range(n_kv):
            key = read_str()
            kind, = struct.unpack("<I", f.read(4))
            if key.endswith(".block_count") and kind in formats:
                return int(struct.unpack("<" + formats[kind], f.read(sizes[kind]))[0])
            skip(kind)
    return None
