"""The reliability suite, a module per section: `python -m edgerag.benchmarks.reliability BUNDLE ...`
(__main__.py runs the sections in turn and writes the report).

  fuzzing         generated hostile input to Pipeline.ask, the HTTP API, manifest.json and passage files
  load_and_soak   concurrent clients and a long soak against one `edgerag serve`
  kills           `edgerag export` and `edgerag distill` SIGKILLed mid-write
  damage          a bundle's files damaged on a copy
  server          `edgerag serve` in its own process, and a client's request
"""
