"""Bad input stops before training with a one-line error naming the flag and value (test 7 of issue 2),
through the real fairseq-train, and leaves what is already on disk untouched."""

import hashlib

import pytest

from helpers import cli

BASE = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
        "--tokens-per-sample", 8, "--batch-size", 4, "--optimizer", "adam", "--lr", "1e-3", "--cpu",
        "--max-update", 2, "--num-workers", 0]

CASES = {
    "negative mem tokens": (["--mem-tokens", "-1"], ["--mem-tokens", "-1"]),
    "negative mem len": (["--mem-len", "-5"], ["--mem-len", "-5"]),
    "negative bptt unroll": (["--bptt-unroll", "-1"], ["--bptt-unroll", "-1"]),
    "sliding without memory": (["--bptt-mode", "sliding", "--mem-tokens", "0"], ["--bptt-mode sliding",
                                                                                  "--mem-tokens 0"]),
    "cutoff beyond vocab": (["--adaptive-softmax-cutoff", "20000,40000"], ["--adaptive-softmax-cutoff",
                                                                          "20000,40000", "vocabulary"]),
    "heads do not divide dim": (["--decoder-embed-dim", "30", "--decoder-attention-heads", "4"],
                                ["--decoder-embed-dim 30", "--decoder-attention-heads 4"]),
    "split too short": (["--batch-size", "400", "--tokens-per-sample", "64"], ["--batch-size 400",
                                                                             "--tokens-per-sample 64"]),
    "stock criterion": (["--criterion", "cross_entropy"], ["--criterion rmt_cross_entropy", "cross_entropy"]),
    "zero tokens per sample": (["--tokens-per-sample", "0"], ["--tokens-per-sample", "0"]),
}


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_flag(recall_data, tmp_path, name):
    flags, must_name = CASES[name]
    save = tmp_path / "ckpt"
    save.mkdir()
    keep = save / "checkpoint_last.pt"
    keep.write_bytes(b"an earlier run's checkpoint")
    before = _digest(keep)
    p = cli("fairseq-train", recall_data, *BASE, "--save-dir", save, *flags, check=False)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-3000:]
    for word in must_name:
        assert word in last, (word, last)
    assert _digest(keep) == before and sorted(x.name for x in save.iterdir()) == ["checkpoint_last.pt"]


def test_missing_data_dir(tmp_path):
    p = cli("fairseq-train", tmp_path / "nope", *BASE, "--save-dir", tmp_path / "ck", check=False)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "nope") in last and "does not exist" in last


def test_missing_valid_split(recall_data, tmp_path):
    p = cli("fairseq-train", recall_data, *BASE, "--valid-subset", "dev", "--save-dir", tmp_path / "ck",
            check=False)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'dev'" in last
