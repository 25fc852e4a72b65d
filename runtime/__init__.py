"""The device side of edgerag: load a bundle, retrieve, generate. No torch, no transformers.

    from edgerag.runtime import Pipeline
    pipeline = Pipeline.load("bundle/")
"""

from edgerag.runtime.manifest import BundleError, Manifest, read_manifest, verify
from edgerag.runtime.pipeline import Answer, Generation, Pipeline
from edgerag.runtime.prompt import PromptError

__all__ = ["Answer", "BundleError", "Generation", "Manifest", "Pipeline", "PromptError", "load", "read_manifest",
           "verify"]


load = Pipeline.load  # edgerag.runtime.load("bundle/") is Pipeline.load("bundle/")
