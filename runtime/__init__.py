"""The device side of edgerag: load a bundle, retrieve, generate. No torch, no transformers."""

from runtime.manifest import BundleError
from runtime.pipeline import Answer, Pipeline
from runtime.prompt import PromptError

__all__ = ["Answer", "BundleError", "Pipeline", "PromptError", "load"]


def load(bundle, threads=None) -> Pipeline:
    return Pipeline.load(bundle, threads=threads)
