"""The device side of edgerag: load a bundle, retrieve, generate. No torch, no transformers.

    from edgerag.runtime import Pipeline
    pipeline = Pipeline.load("bundle/")
"""

from edgerag.runtime.manifest import BundleError, Manifest, read_manifest, verify
from edgerag.runtime.pipeline import Answer, Generation, Pipeline
from edgerag.runtime.prompt import PromptError

__all__ = ["Answer", "BundleError", "Generation", "Manifest", "Pipeline", "PromptError", "load", "read_manifest",
           "verify"]


def load(bundle, threads=None, check: bool = True, reuse_prefix: bool = True) -> Pipeline:
    """Pipeline.load: a bundle directory, verified, ready to answer."""
    return Pipeline.load(bundle, threads=threads, check=check, reuse_prefix=reuse_prefix)
