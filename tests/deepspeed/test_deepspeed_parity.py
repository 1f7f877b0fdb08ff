"""Issue 26: one training loop. rmt-deepspeed-train is fairseq-train's own loop, so each flag of fairseq-train's
checkpoint, dataset and validation groups means the same there. Each row of the table runs one process of
fairseq-train (8 streams) and two DeepSpeed ranks (4 streams each, ZeRO stage of the row) with the row's flags,
and, for the rows that continue a run, the second command in the same way; both must log the same training losses
per update, the same validation lines (subset, update, loss, best so far) and leave the same checkpoint names
(rank 0 under fairseq's names, rank 1 under the same names with -shard1)."""

import glob
import os
import re
import sys

import pytest
import torch

from helpers import REPO, cli, train_losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_deepspeed_train import COMMON, TOL, deepspeed  # noqa: E402  (the module beside this one)

pytestmark = [pytest.mark.deepspeed, pytest.mark.long]
BASE = [a for a in COMMON if a not in ("--optimizer", "sgd", "--lr", 0.5)] + [
    "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 4,
    "--warmup-init-lr", "1e-4", "--log-format", "simple", "--num-workers", 0]
EPOCH = 47  # updates per epoch: 8 streams of the recall corpus, 2 segments of 8 per batch

# row: (ZeRO stage, first command's flags, second command's flags or None); "{a}" is the first run's save dir
ROWS = {
    "intervals, keep rules, subsets, step caps": (2, [
        "--max-update", 12, "--save-interval-updates", 3, "--keep-interval-updates", 1, "--validate-interval-updates",
        3, "--valid-subset", "valid,test", "--max-valid-steps", 2, "--keep-best-checkpoints", 2, "--update-freq", 2,
        "--clip-norm", 1], None),
    "epochs": (1, ["--max-epoch", 3, "--save-interval", 2, "--keep-last-epochs", 1, "--validate-interval", 2,
                   "--log-interval", 10], None),
    "best metric, maximized, patience": (3, ["--best-checkpoint-metric", "ppl", "--maximize-best-checkpoint-metric",
                                             "--patience", 2, "--validate-interval-updates", 2, "--max-update", 40,
                                             "--no-last-checkpoints"], None),
    "no save, no validation, stop time": (2, ["--no-save", "--disable-validation", "--stop-time-hours", 1e-9,
                                              "--max-update", 5], None),
    "resume, reset dataloader and meters": (2, ["--max-update", 6, "--save-interval-updates", 3],
                                            ["--max-update", 9, "--save-interval-updates", 3, "--reset-dataloader",
                                             "--reset-meters"]),
    "resume, reset optimizer and lr scheduler": (3, ["--max-update", 6, "--save-interval-updates", 3],
                                                 ["--max-update", 9, "--save-interval-updates", 3,
                                                  "--reset-optimizer", "--reset-lr-scheduler"]),
    "restore file": (2, ["--max-update", 6, "--save-interval-updates", 3],
                     ["--max-update", 9, "--restore-file", "{a}/checkpoint_1_3.pt"]),
    "finetune from model": (1, ["--max-update", 4, "--save-interval-updates", 2],
                            ["--max-update", 3, "--finetune-from-model", "{a}/checkpoint_1_2.pt"]),
}


def _valid_lines(text):
    """(subset, num_updates, loss, best_loss or None) of every validation line."""
    out = []
    for m in re.finditer(r"valid on '(\w+)' subset \| loss ([0-9.]+) .*?num_updates (\d+)(?: \| best_\w+ ([0-9.]+))?",
                         text):
        out.append((m.group(1), int(m.group(3)), float(m.group(2)), m.group(4) and float(m.group(4))))
    return out


def _names(folder):
    """The checkpoint names, --keep-best-checkpoints' random tie-break digit dropped (fairseq seeds it with the
    hash of the unrounded validation loss, which one process and two ranks sum in another order)."""
    names = [re.sub(r"^(checkpoint\.best_\w+_\d+\.\d{3})\d", r"\1", p.name) for p in folder.iterdir()] \
        if folder.exists() else []
    return sorted(names)


def _same(fs_log, ds_log, what):
    f, d = train_losses(fs_log), train_losses(ds_log)
    assert sorted(f) == sorted(d) and f, (what, sorted(f), sorted(d), ds_log[-3000:])
    assert all(abs(f[u] - d[u]) <= TOL for u in f), (what, f, d)
    fv, dv = _valid_lines(fs_log), _valid_lines(ds_log)
    assert [v[:2] for v in fv] == [v[:2] for v in dv], (what, fv, dv)
    for a, b in zip(fv, dv):
        assert abs(a[2] - b[2]) <= TOL and (a[3] is None) == (b[3] is None), (what, fv, dv)
        assert a[3] is None or abs(a[3] - b[3]) <= max(TOL, 0.02 * abs(a[3])), (what, fv, dv)  # ppl: 2 dp


def _same_names(fs_dir, ds_dir, what):
    fs, ds = _names(fs_dir), _names(ds_dir)
    assert [n for n in ds if "-shard1" not in n] == fs, (what, fs, ds)
    assert sorted(n for n in ds if "-shard1" in n) == sorted(n[:-3] + "-shard1.pt" for n in fs), (what, fs, ds)


@pytest.mark.parametrize("row", list(ROWS))
def test_fairseq_train_flags_mean_the_same_under_deepspeed(row, recall_data, tmp_path):
    stage, first, second = ROWS[row]
    config = f"ds_configs/zero{stage}.json"
    if stage == 3:
        (tmp_path / "partition_all.json").write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
        config += f",{tmp_path / 'partition_all.json'}"
    logs = {}
    for path in ("fs", "ds"):
        a, b = tmp_path / path / "a", tmp_path / path / "b"
        runs = [(first, a)] + ([([str(x).format(a=a) for x in second], b if "{a}" in str(second) else a)]
                               if second else [])
        for i, (flags, save) in enumerate(runs):
            if path == "fs":
                p = cli("fairseq-train", recall_data, *BASE, "--batch-size", 8, *flags, "--save-dir", save)
                logs[path, i] = p.stdout + p.stderr
            else:
                logs[path, i] = deepspeed(recall_data, *BASE, "--batch-size", 4, *flags, "--save-dir", save,
                                          "--deepspeed-config", config)
    for i in range(1 + bool(second)):
        _same(logs["fs", i], logs["ds", i], (row, i))
    for folder in ("a", "b"):
        _same_names(tmp_path / "fs" / folder, tmp_path / "ds" / folder, (row, folder))
    if "--patience" in first:  # the run stopped early, on fairseq's rule
        assert "early stop since valid performance hasn't improved for last 2 runs" in logs["ds", 0]
        assert max(train_losses(logs["ds", 0])) < 40
    if second and "--finetune-from-model" in second:
        assert min(train_losses(logs["ds", 1])) == 1  # a new run from the model's weights


def test_flags_deepspeed_cannot_honour_are_refused_in_one_line(recall_data):
    for flags, named in [(["--ddp-backend", "fully_sharded"], "--ddp-backend fully_sharded"),
                         (["--update-freq", "1,2"], "--update-freq 1,2"),
                         (["--store-ema"], "--store-ema")]:
        p = cli("rmt-deepspeed-train", recall_data, *COMMON, "--batch-size", 4, "--max-update", 1,
                "--deepspeed-config", "ds_configs/zero1.json", *flags, check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and last.startswith("error: ") and named in last, p.stderr[-2000:]
        assert "Traceback" not in p.stderr


SHIPPED = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "ds_configs", "*.json")))


@pytest.fixture(scope="module")
def accumulate_and_clip_reference(recall_data):
    p = cli("fairseq-train", recall_data, *BASE, *ACCUMULATE_AND_CLIP, "--batch-size", 8)
    return train_losses(p.stdout + p.stderr)


ACCUMULATE_AND_CLIP = ["--update-freq", 2, "--clip-norm", 1, "--max-update", 4, "--no-save"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_ds_config_trains_as_fairseq_train(name, recall_data, accumulate_and_clip_reference):
    """Each JSON of ds_configs/ (a precision file merged onto zero2.json) under two ranks, --update-freq 2 and
    --clip-norm 1: fairseq-train's losses (bf16 within its rounding); fp16 on this CPU: one line saying why not."""
    config = f"ds_configs/zero2.json,ds_configs/{name}" if name in ("bf16.json", "fp16.json") else f"ds_configs/{name}"
    args = [recall_data, *BASE, *ACCUMULATE_AND_CLIP, "--batch-size", 4, "--deepspeed-config", config]
    if name == "fp16.json" and not torch.cuda.is_available():
        p = cli("rmt-deepspeed-train", *args, check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and "fp16 trains on CUDA GPUs only" in last and "bf16" in last, p.stderr[-2000:]
        return
    got, ref = train_losses(deepspeed(*args)), accumulate_and_clip_reference
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    tol = 0.05 if name == "bf16.json" else TOL
    assert all(abs(got[u] - ref[u]) <= tol * (ref[u] if name == "bf16.json" else 1) for u in ref), (got, ref)
