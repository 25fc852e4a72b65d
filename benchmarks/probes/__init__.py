"""One-off measurements run by hand, a module per subject (`edgerag bench` uses none of them):

  generator     the generator step: speed of graphs, prefix reuse, each --quantize option
  decode        the decode step: taken apart, profiled, its two 8-bit matmul kinds
  gradient_kd   what gradient distillation costs per training step

benchmarks/README.md lists each command.
"""
