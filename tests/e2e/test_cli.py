"""End to end through the real CLIs as subprocesses (test 5 of issue 2): fairseq-preprocess a generated
corpus, fairseq-train --user-dir user_dir --task rmt_lm --arch rmt_tiny, fairseq-eval-lm the checkpoint."""

import re

import pytest

from helpers import cli

TRAIN = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
         "--tokens-per-sample", 8, "--batch-size", 4, "--optimizer", "adam", "--lr", "2e-3", "--cpu", "--seed", 1,
         "--log-format", "simple", "--log-interval", 1, "--no-epoch-checkpoints", "--num-workers", 0]


def _valid_losses(log: str):
    return [float(x) for x in re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", log)]


def _train_losses(log: str):
    return {int(u): float(v) for v, u in re.findall(r"train_inner .* loss=([0-9.]+),.* num_updates=(\d+)", log)}


@pytest.mark.parametrize("memory", [["--mem-tokens", 4], ["--mem-tokens", 0, "--mem-len", 8],
                                    ["--mem-tokens", 4, "--mem-len", 8],
                                    # the WikiText-103 preset (adaptive input + tied adaptive softmax), shrunk
                                    ["--arch", "rmt_wt103", "--decoder-layers", 1, "--decoder-embed-dim", 32,
                                     "--decoder-attention-heads", 2, "--decoder-ffn-embed-dim", 32,
                                     "--adaptive-softmax-cutoff", "8,16", "--mem-tokens", 2]],
                         ids=["rmt", "xl", "rmt+xl", "wt103-shaped"])
def test_train_then_eval_lm(recall_data, tmp_path, memory):
    save = tmp_path / "ckpt"
    p = cli("fairseq-train", recall_data, *TRAIN, *memory, "--max-update", 30, "--save-dir", save)
    log = p.stdout + p.stderr
    assert (save / "checkpoint_last.pt").exists()
    valid = _valid_losses(log)
    assert valid, log[-2000:]
    losses = _train_losses(log)
    assert losses[30] < losses[1]  # it trains

    e = cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
            save / "checkpoint_last.pt", "--batch-size", 4, "--tokens-per-sample", 8, "--gen-subset", "valid",
            "--cpu", "--num-workers", 0)
    m = re.search(r"Loss \(base 2\): ([0-9.]+)", e.stdout + e.stderr)
    assert m, e.stderr[-2000:]
    # the checkpoint's last validation and eval-lm over the same split: the same number (both printed to 4 dp)
    assert float(m.group(1)) == pytest.approx(valid[-1], abs=1.5e-4)


def test_resume_continues_the_same_loss_curve(recall_data, tmp_path):
    """An interrupted run resumed from checkpoint_last.pt (mid-epoch: data position, optimizer and per-stream
    memory restored) logs the same losses as the uninterrupted run."""
    args = [recall_data, *TRAIN, "--mem-tokens", 4, "--disable-validation"]
    def run(max_update, save):
        p = cli("fairseq-train", *args, "--max-update", max_update, "--save-dir", tmp_path / save)
        return _train_losses(p.stdout + p.stderr)

    full = run(24, "a")
    run(12, "b")
    resumed = run(24, "b")
    assert sorted(resumed) == list(range(13, 25))
    assert all(resumed[u] == full[u] for u in resumed), (full, resumed)


# fairseq-interactive's P- scores against the teacher-forced forward, across segment boundaries, for every model
# family and beam 1 / 3: tests/e2e/test_agreement.py
