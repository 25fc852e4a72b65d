"""The device side of edgerag: load a bundle, retrieve, generate. No torch, no transformers.

    from edgerag.runtime import Pipeline
    pipeline = Pipeline.load("bundle/")

Everything that export/, benchmarks/ and the tests use from the runtime is named in `__all__`;
the runtime's files below it may move, these names do not.
"""

from edgerag.runtime.decoder_only import DecoderOnlyGenerator
from edgerag.runtime.encoder_decoder import EncoderDecoderGenerator
from edgerag.runtime.generation import Generation
from edgerag.runtime.manifest import BundleError, Manifest, read_manifest, verify
from edgerag.runtime.memory import return_freed_memory
from edgerag.runtime.pipeline import Answer, Pipeline
from edgerag.runtime.prompt import PromptError
from edgerag.runtime.retrieval import PassageStore, QueryEncoder
from edgerag.runtime.session import make_session

__all__ = ["Answer", "BundleError", "DecoderOnlyGenerator", "EncoderDecoderGenerator", "Generation", "Manifest",
           "PassageStore", "Pipeline", "PromptError", "QueryEncoder", "load", "make_session", "read_manifest",
           "return_freed_memory", "verify"]


load = Pipeline.load  # edgerag.runtime.load("bundle/") is Pipeline.load("bundle/")
