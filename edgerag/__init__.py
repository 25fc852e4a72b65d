"""edgerag: distill a RAG model, export it to an ONNX bundle, answer on a CPU.

    import edgerag
    pipeline = edgerag.load("bundle/")          # the device runtime: onnxruntime, hnswlib, tokenizers
    print(pipeline.ask("Who won Super Bowl 50?").answer)

Subpackages: edgerag.runtime (device), edgerag.export, edgerag.train, edgerag.benchmarks (workstation).
Importing edgerag imports none of them until they are used.
"""

__version__ = "0.1.0"


def load(bundle, threads=None, check: bool = True, reuse_prefix: bool = True):
    """A loaded bundle (edgerag.runtime.Pipeline), every file's checksum verified first."""
    from edgerag.runtime import load as load_bundle

    return load_bundle(bundle, threads=threads, check=check, reuse_prefix=reuse_prefix)
