"""The evaluation tools take what the model was trained with from its checkpoint (issue 16): fairseq-train of
--task rmt_algorithmic logs the segment length and records it in the checkpoint; rmt-extrapolate and
rmt-plot-attention use it by default and refuse another one (one `error:` line, exit 2, nothing written), also
for a checkpoint written before the length was recorded; rmt-extrapolate's stdout is the table alone."""

import json
import math
import re

import pytest
import torch

from helpers import cli
from rmt_fairseq.cli.extrapolate import no_memory_bound

SRC_LEN, SEGMENTS = 6, 3  # 6 symbols, <gen>, the source twice = 19 tokens in 3 segments of 7
T = math.ceil((3 * SRC_LEN + 1) / SEGMENTS)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("algo")
    raw, data, save = root / "raw", root / "bin", root / "ckpt"
    cli("rmt-data", "copy", "--src-len", SRC_LEN, "--train-size", 64, "--valid-size", 8, "--test-size", 8,
        "--out", raw)
    cli("fairseq-preprocess", "--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
        "--testpref", raw / "test.txt", "--destdir", data, "--workers", 1)
    p = cli("fairseq-train", data, "--user-dir", "user_dir", "--task", "rmt_algorithmic", "--arch", "rmt_tiny",
            "--criterion", "rmt_cross_entropy", "--num-segments", SEGMENTS, "--mem-tokens", 2,
            "--decoder-embed-dim", 32, "--batch-size", 16, "--optimizer", "adam", "--lr", "1e-3", "--cpu",
            "--max-update", 1, "--num-workers", 0, "--no-eval-greedy", "--disable-validation", "--save-dir", save)
    ckpt = save / "checkpoint_last.pt"
    # a checkpoint from before the segment length was recorded: the tools work it out from the train split
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["cfg"]["model"].pop("trained_segment_len")
    torch.save(state, root / "old.pt")
    return {"root": root, "data": data, "ckpt": ckpt, "old": root / "old.pt", "log": p.stdout + p.stderr,
            "raw": raw}


def test_training_logs_and_records_the_segment_length(run):
    # the run's one summary line (issue 27): --mem-tokens 2, the layout of --num-segments 3, --batch-size 16
    assert re.findall(r"\| training with (.*)$", run["log"], re.M) == [
        f"memory: RMT, 2 memory tokens (--mem-tokens) whose outputs are the next segment's memory, fresh per sample; "
        f"segment length {T} (19-token samples in {SEGMENTS} segments); 16 samples (--batch-size); BPTT through every "
        f"segment boundary of a sample (--bptt-unroll not set)"]
    state = torch.load(run["ckpt"], map_location="cpu", weights_only=False)
    assert state["cfg"]["model"]["trained_segment_len"] == T


def test_extrapolate_uses_the_trained_segment_length(run):
    out = run["root"] / "extra"
    p = cli("rmt-extrapolate", "--path", run["ckpt"], "--src-lens", f"{SRC_LEN},{2 * SRC_LEN}", "--num-samples", 8,
            "--out", f"{out}/")  # no --data, --task, --segment-len: all from the checkpoint and its data
    res = json.loads((out / "extrapolation.json").read_text())
    assert res["task"] == "copy" and res["vocab_size"] == 10 and res["chance"] == 10.0
    assert res["segment_len"] == res["trained_segment_len"] == T and res["trained_segments"] == SEGMENTS
    assert res["trained_src_len"] == SRC_LEN
    rows = res["results"]
    assert [(r["src_len"], r["tokens"], r["segments"]) for r in rows] == [(6, 19, 3), (12, 37, 6)]  # same T
    assert [r["no_memory_bound"] for r in rows] == [no_memory_bound("copy", n, T, 10) for n in (6, 12)]
    # stdout: the header and one row per length, nothing of fairseq's logging
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["src_len", "tokens", "segments"], p.stdout
    assert [line.split()[:3] for line in lines[1:]] == [["6", "19", "3"], ["12", "37", "6"]]
    assert f"wrote {out}/extrapolation.json and {out}/extrapolation.png" in p.stderr and "//" not in p.stderr
    png = (out / "extrapolation.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 20000  # lines, legend and labels, not an empty frame


@pytest.mark.parametrize("ckpt", ["ckpt", "old"])
def test_extrapolate_refuses_another_segment_length(run, ckpt):
    out = run["root"] / f"refused_{ckpt}"
    p = cli("rmt-extrapolate", "--path", run[ckpt], "--src-lens", SRC_LEN, "--segment-len", 5, "--out", out,
            check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error")]
    assert p.returncode == 2 and errors == [p.stderr.strip().splitlines()[-1]], p.stderr[-3000:]
    assert errors[0].startswith(f"error: --segment-len 5 differs from the segment length the model was trained "
                                f"with ({T}); ")
    assert "--allow-other-segment-len" in errors[0] and not out.exists() and p.stdout == ""


def test_plot_attention_segments_as_trained(run):
    sample = (run["raw"] / "test.txt").read_text().splitlines()[0]
    out = run["root"] / "attn"
    p = cli("rmt-plot-attention", "--path", run["ckpt"], "--data", run["data"], "--input", sample, "--out", out)
    assert f"segments of {T}" in p.stdout
    assert sorted(f.name for f in out.iterdir()) == [f"segment{s}_layer{li}.png" for s in range(3) for li in range(2)]
    # --num-segments 2 would cut the 19 tokens into segments of 10
    bad = cli("rmt-plot-attention", "--path", run["old"], "--data", run["data"], "--input", sample,
              "--num-segments", 2, "--out", run["root"] / "attn2", check=False)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error: --num-segments 2 (segments of 10 for the 19-token input) "
                                                   f"differs from the segment length the model was trained with "
                                                   f"({T})"), bad.stderr[-3000:]
    assert not (run["root"] / "attn2").exists()
