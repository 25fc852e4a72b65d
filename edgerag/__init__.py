"""edgerag: distill a RAG model, export it to an ONNX bundle, answer on a CPU."""

__version__ = "0.1.0"
