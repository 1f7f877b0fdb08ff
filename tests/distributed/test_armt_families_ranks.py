"""ARMT (issue 17) on the two families without their own multi-rank tests elsewhere, with 2 real fairseq-train ranks
(CPU processes over gloo on loopback, `--distributed-world-size 2`): the `rmt_transformer_lm` wrapper on
--task language_modeling and the `rmt_encoder` on --task rmt_long_classification. Per-update losses equal one
process that reads the same two batches per update (--update-freq 2), and so does the encoder's validation, which
runs in the diagonal schedule (armt_encoder_tiny's). `rmt_lm`'s ARMT has its ranks and DeepSpeed tests in
tests/e2e/test_armt_e2e.py.

SGD keeps the comparison tight (see test_fairseq_train_ranks.py)."""

import re

import pytest

from helpers import cli, train_losses

pytestmark = pytest.mark.long  # 4 fairseq-train runs, about a minute

TOL = 2e-4
UPDATES = 8
WRAPPER = ["--user-dir", "user_dir", "--task", "language_modeling", "--arch", "rmt_transformer_lm",
           "--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64,
           "--decoder-attention-heads", 2, "--dropout", 0.0, "--mem-tokens", 4, "--associative-memory", "--d-mem", 4,
           "--tokens-per-sample", 32, "--segment-len", 8, "--criterion", "rmt_cross_entropy", "--optimizer", "sgd",
           "--lr", 0.5, "--cpu", "--num-workers", 0, "--seed", 1, "--log-format", "simple", "--log-interval", 1,
           "--no-save", "--disable-validation", "--max-update", UPDATES, "--batch-size", 4]
ENCODER = ["--user-dir", "user_dir", "--task", "rmt_long_classification", "--arch", "armt_encoder_tiny",
           "--criterion", "rmt_classification", "--tokens-per-sample", 16, "--num-segments", 3, "--optimizer", "sgd",
           "--lr", 0.5, "--cpu", "--num-workers", 0, "--seed", 1, "--log-format", "simple", "--log-interval", 1,
           "--no-save", "--max-update", UPDATES, "--validate-interval-updates", 4, "--validate-interval", 1000,
           "--batch-size", 8, "--max-epoch", 100]


def _valid_losses(log: str):
    return [float(x) for x in re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", log)]


def _compare(one: str, two: str):
    assert "initialized host" in two and "as rank 1" in two, two[-3000:]  # really two processes
    got, ref = train_losses(two), train_losses(one)
    assert sorted(got) == sorted(ref) == list(range(1, UPDATES + 1)), (two[-3000:], one[-3000:])
    assert all(abs(got[u] - ref[u]) <= TOL for u in got), (got, ref)


def test_armt_wrapper_two_ranks_log_the_losses_of_one_process(recall_data):
    one = cli("fairseq-train", recall_data, *WRAPPER, "--update-freq", 2)
    two = cli("fairseq-train", recall_data, *WRAPPER, "--distributed-world-size", 2)
    _compare(one.stdout + one.stderr, two.stdout + two.stderr)


def test_armt_encoder_two_ranks_train_and_validate_as_one_process(tmp_path):
    data = tmp_path / "data"
    cli("rmt-data", "memorization", "fact_detection", "--out", data, "--train-size", 256, "--valid-size", 32,
        "--test-size", 16)
    one = cli("fairseq-train", data, *ENCODER, "--update-freq", 2)
    two = cli("fairseq-train", data, *ENCODER, "--distributed-world-size", 2)
    one_log, two_log = one.stdout + one.stderr, two.stdout + two.stderr
    _compare(one_log, two_log)
    v1, v2 = _valid_losses(one_log), _valid_losses(two_log)
    assert len(v1) == len(v2) == 2 and all(abs(a - b) <= TOL for a, b in zip(v1, v2)), (v1, v2)
