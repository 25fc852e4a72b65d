"""The quantization comparison script runs on a tiny generator and reports every variant asked for."""

import json


def test_quantization_options_rows(tiny_models, tmp_path):
    from edgerag.benchmarks.probes.generator import quantization_options_command

    _, generator, _, squad = tiny_models
    out = tmp_path / "rows.json"
    assert quantization_options_command(["--generator", str(generator), "--questions", str(squad), "--n", "2",
                                         "--rounds", "1", "--max-new-tokens", "4", "--threads", "1",
                                         "--variants", "none,int8wo,int8sq,int8swo", "--out", str(out)]) == 0
    rows = {r["quantize"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"none", "int8wo", "int8sq", "int8swo"}
    assert rows["none"]["max_abs_logit_delta"] == 0
    assert rows["int8wo"]["max_abs_logit_delta"] > 0 and rows["int8sq"]["max_abs_logit_delta"] > 0 and rows["int8swo"]["max_abs_logit_delta"] > 0
    assert rows["int8wo"]["size_mb"] < rows["none"]["size_mb"]
