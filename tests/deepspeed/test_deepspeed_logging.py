"""rmt-deepspeed-train's log lines are fairseq-train's (issue 16): on a character-level dictionary, 2 ranks
under the real `deepspeed` launcher print each training line once per job with the fields single-process
fairseq-train prints for the same 8 streams (loss, bpc, ppl, wps, ups, wpb, bsz, num_updates, lr, gnorm, clip,
train_wall, wall) and the same loss, bpc, gnorm and clip; validation runs where fairseq-train's runs (at each
mid-epoch save, and once at --max-update equal to --validate-interval-updates), the checkpoint of each update is
written once, and rmt_fairseq raises no UserWarning.

ZeRO-0 in fp32 is the case where rmt-deepspeed-train computes the gradient norm itself (DeepSpeed reports none
there); --update-freq 2 makes it the norm of gradients accumulated over two micro-batches. The same run's ZeRO-0
checkpoint evaluates to its validation loss."""

import os
import random
import re
import sys

import pytest

from helpers import cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_deepspeed_train import COMMON, TOL, deepspeed  # noqa: E402  (the module beside this one)

pytestmark = pytest.mark.deepspeed
# --clip-norm 1.5 clips some of these updates and not others (gnorm 4.1, 3.6, 1.0, 2.2 here)
FLAGS = [*COMMON, "--update-freq", 2, "--clip-norm", 1.5, "--max-update", 4, "--validate-interval-updates", 4]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """A fairseq data-bin of one-character tokens (written in-process, as fairseq-preprocess would)."""
    from fairseq.data import Dictionary, indexed_dataset

    root = tmp_path_factory.mktemp("chars")
    rng = random.Random(0)
    splits = {name: [" ".join(rng.choice("abcdefgh") for _ in range(rng.randint(5, 20))) for _ in range(n)]
              for name, n in [("train", 300), ("valid", 60)]}
    d = Dictionary()
    for line in splits["train"]:
        d.encode_line(line, add_if_not_exist=True)
    d.finalize(padding_factor=1)
    d.save(str(root / "dict.txt"))
    for name, lines in splits.items():
        builder = indexed_dataset.make_builder(str(root / f"{name}.bin"), "mmap", vocab_size=len(d))
        for line in lines:
            builder.add_item(d.encode_line(line, add_if_not_exist=False))
        builder.finalize(str(root / f"{name}.idx"))
    return str(root)


def _lines(text, tag):
    """The fields of each `tag` line of fairseq's simple log format: train_inner (k=v, ...) or valid (k v | ...)."""
    out = []
    for line in text.splitlines():
        m = re.search(rf"\| {tag} \| (?:epoch \d+:\s+\d+ / \d+ |epoch \d+ \| valid on '\w+' subset \| )(.*)", line)
        if m:
            pairs = [re.split(r"=| ", p.strip(), maxsplit=1) for p in re.split(r", | \| ", m.group(1))]
            out.append({k: float(v) for k, v in pairs})
    return out


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory):
    """(fairseq-train's log, rmt-deepspeed-train's log, its --save-dir): the same 8 streams, 4 updates."""
    ref = cli("fairseq-train", char_data, *FLAGS, "--batch-size", 8, "--save-interval-updates", 2, "--save-dir",
              tmp_path_factory.mktemp("fs"), "--log-format", "simple", "--num-workers", 0)
    save = tmp_path_factory.mktemp("ds")
    out = deepspeed(char_data, *FLAGS, "--batch-size", 4, "--save-interval-updates", 2, "--save-dir", save,
                    "--deepspeed-config", "ds_configs/zero0.json")
    return ref.stdout + ref.stderr, out, save


def test_log_lines_carry_fairseq_train_fields_once_per_job(runs):
    ref, out, _ = runs

    fs, ds = _lines(ref, "train_inner"), _lines(out, "train_inner")
    assert [int(s["num_updates"]) for s in ds] == [1, 2, 3, 4], out[-3000:]  # once per job, not once per rank
    assert [int(s["num_updates"]) for s in fs] == [1, 2, 3, 4], ref[-3000:]
    for f, d in zip(fs, ds):
        assert list(d) == list(f) and {"bpc", "ups", "wps", "gnorm", "clip", "train_wall", "wall"} <= set(d), (f, d)
        assert d["bpc"] == d["loss"]  # char level: bits per token are bits per character
        assert all(abs(d[k] - f[k]) <= TOL for k in ("loss", "bpc")), (f, d)
        assert abs(d["gnorm"] - f["gnorm"]) <= 2e-3 and d["clip"] == f["clip"], (f, d)  # gnorm printed to 3 dp
        assert d["wpb"] == f["wpb"] == 256 and d["bsz"] == f["bsz"] == 16  # 8 streams x 2 segments of 8 x 2
    assert {d["clip"] for d in ds} == {0, 100}
    assert all(d["ups"] > 0 for d in ds[1:])  # the first line's rate has no interval yet (fairseq's too: 0)

    fv, dv = _lines(ref, "valid"), _lines(out, "valid")
    assert [int(s["num_updates"]) for s in dv] == [int(s["num_updates"]) for s in fv] == [2, 4], out[-3000:]
    for f, d in zip(fv, dv):
        assert list(d) == list(f) and abs(d["loss"] - f["loss"]) <= TOL, (fv, dv)
    saved = re.findall(r"Saved checkpoint \S+/(checkpoint\S+\.pt)", out)  # fairseq's line, rank 0's files
    assert saved == ["checkpoint_1_2.pt", "checkpoint_1_4.pt"], out[-3000:]
    assert not re.search(r"rmt_fairseq/\S+\.py:\d+: UserWarning", out), out


def test_a_zero0_checkpoint_evaluates_to_its_validation_loss(char_data, runs, tmp_path):
    _, out, save = runs
    e = cli("fairseq-eval-lm", char_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
            save / "checkpoint_1_4.pt", "--batch-size", 8, "--gen-subset", "valid", "--cpu", "--num-workers", 0)
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", e.stdout + e.stderr).group(1))
    # eval-lm's 8 streams are the 2 ranks x 4 that DeepSpeed validated at update 4
    assert loss == pytest.approx(_lines(out, "valid")[-1]["loss"], abs=TOL)
