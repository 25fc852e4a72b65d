"""Measurements of bundles and runs (workstation side; benchmarks/README.md lists every command).

`edgerag bench`: bench (the command), worker (one system in one process), baselines (the other
runtimes), machine (this machine's limits and the floors), index_scale (hnswlib at scale), summary
(a worker's result -> a row) and report (results.json -> report.md and plots); process_memory reads
/proc for them and for the others. curve: the size/quality curve of a set of runs. reliability/:
the reliability suite. probes/: one-off measurements, a module per subject.
"""
