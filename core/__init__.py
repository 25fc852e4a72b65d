"""edgerag: distill a RAG model, export it to an ONNX bundle, answer on a CPU.

    import edgerag
    pipeline = edgerag.load("bundle/")          # the device runtime: onnxruntime, hnswlib, tokenizers
    print(pipeline.ask("Who won Super Bowl 50?").answer)

Subpackages: edgerag.runtime (device), edgerag.export, edgerag.train, edgerag.benchmarks (workstation).
Importing edgerag imports none of them until they are used.
"""

__version__ = "0.1.0"


def load(bundle, **options):
    """A loaded bundle, every file's checksum verified first: edgerag.runtime.Pipeline.load (see its options)."""
    from edgerag.runtime import Pipeline

    return Pipeline.load(bundle, **options)
