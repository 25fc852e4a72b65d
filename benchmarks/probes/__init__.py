"""One-off measurements run by hand, a module per subject (`edgerag bench` uses none of them):

  generator     the generator step: speed of graphs, prefix reuse, span answers' cost, each --quantize option
  decode        the decode step: taken apart, profiled, its two 8-bit matmul kinds
  gradient_kd   what gradient distillation costs per training step

benchmarks/README.md lists each command.
"""

import argparse


def run_command(prog: str, doc: str, commands: dict, argv=None) -> int:
    """A probe module's entry point: its first argument names the command, the rest are the command's."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("command", choices=commands)
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's own (COMMAND --help)")
    args = parser.parse_args(argv)
    return commands[args.command](args.arguments)
