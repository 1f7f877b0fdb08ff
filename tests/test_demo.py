"""The demo command runs end to end (tiny budget) and writes a well-formed results.json and a PNG."""

import json

from helpers import cli


def test_demo_writes_results_and_plot(tmp_path):
    out = tmp_path / "demo"
    p = cli("rmt-demo", "--out", out, "--updates", 4, "--train-size", 200)
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"rmt", "no_memory"} and res["num_segments"] == 3
    for r in res["models"].values():
        assert 0 <= r["test_acc"] <= 100 and 0 <= r["test_em"] <= 100 and r["valid_curve"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact match" in p.stdout
