"""The demo command runs end to end (tiny budget) and writes a well-formed results.json and a PNG; the
attention-plot command draws its checkpoint."""

import json

import pytest

from helpers import cli

pytestmark = pytest.mark.long  # about 75 s: `make test-long` (CI runs it after `make test`)


def test_demo_writes_results_and_plot(tmp_path):
    out = tmp_path / "demo"
    p = cli("rmt-demo", "--out", out, "--updates", 4, "--train-size", 200, "--test-size", 50)
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"rmt", "no_memory"} and res["num_segments"] == 3
    for r in res["models"].values():
        assert 0 <= r["test_acc"] <= 100 and 0 <= r["test_em"] <= 100 and r["valid_curve"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact match" in p.stdout
    cli("rmt-demo", "--out", out, "--updates", 1, "--train-size", 100, "--test-size", 20)  # a second run in place

    line = (out / "data" / "raw" / "test.txt").read_text().splitlines()[0]
    cli("rmt-plot-attention", "--path", out / "ckpt_rmt" / "checkpoint_best.pt", "--data", out / "data" / "bin",
        "--input", line, "--num-segments", 3, "--out", tmp_path / "attn")
    pngs = sorted(p.name for p in (tmp_path / "attn").iterdir())
    assert pngs == [f"segment{s}_layer{layer}.png" for s in range(3) for layer in range(2)]
    assert all((tmp_path / "attn" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    bad = cli("rmt-plot-attention", "--path", out / "ckpt_rmt" / "checkpoint_best.pt", "--data", out / "data" / "bin",
              "--input", "zzz <gen>", "--out", tmp_path / "attn2", check=False)
    assert bad.returncode == 2 and "zzz" in bad.stderr.strip().splitlines()[-1]

    ex = cli("rmt-extrapolate", "--path", out / "ckpt_rmt" / "checkpoint_best.pt", "--data", out / "data" / "bin",
             "--task", "copy", "--src-lens", "10,20", "--segment-len", 11, "--num-samples", 40, "--out",
             tmp_path / "extra")
    rows = json.loads((tmp_path / "extra" / "extrapolation.json").read_text())["results"]
    assert [(r["src_len"], r["segments"]) for r in rows] == [(10, 3), (20, 6)]  # same T, more segments
    assert all(0 <= r["acc"] <= 100 and 0 <= r["em"] <= 100 for r in rows) and "segments" in ex.stdout
    assert (tmp_path / "extra" / "extrapolation.png").read_bytes()[:4] == b"\x89PNG"
