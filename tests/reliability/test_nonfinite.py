"""Non-finite loss or memory (issue 6, item 4): found at the step it happens, named by update and segment;
stop (checkpoints untouched) or skip the batch (--on-nonfinite skip: zero gradient, memory restored)."""

import dataclasses
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, THREADS, build_from_cli_args

FAULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "faults")
ARGS = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
        "--tokens-per-sample", 8, "--batch-size", 4, "--optimizer", "adam", "--lr", "2e-3", "--cpu", "--seed", 1,
        "--log-format", "simple", "--log-interval", 1, "--no-epoch-checkpoints", "--num-workers", 0,
        "--mem-tokens", 4, "--bptt-unroll", 1, "--disable-validation", "--save-interval-updates", 2]


def _train(data, save, fault, *extra):
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, RMT_FAULT=fault,
               PYTHONPATH=os.pathsep.join([REPO, FAULTS, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", "import rmt_faults; rmt_faults.main('fairseq-train')",
           *map(str, [data, *ARGS, "--save-dir", save, *extra])]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("fault,message", [
    # K=1: two segments per update, so the 5th training segment is update 3, segment 1; the 6th its segment 2
    ("nan:5", "error: non-finite loss at update 3, segment 1 of 2 in the batch (segment 5 of the streams); stopped"),
    ("nan_memory:6", "error: non-finite memory state at update 3, segment 2 of 2 in the batch (segment 6 of the "
                     "streams); stopped"),
])
def test_nonfinite_stops_naming_update_and_segment_and_keeps_the_checkpoint(recall_data, tmp_path, fault, message):
    p = _train(recall_data, tmp_path, fault, "--max-update", 6)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith(message), p.stderr[-2000:]
    last = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert last["optimizer_history"][-1]["num_updates"] == 2  # the checkpoint written before the failure
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    digest = hashlib.sha256((tmp_path / "checkpoint_last.pt").read_bytes()).hexdigest()
    # the same run resumed without the fault goes on from that checkpoint
    p = _train(recall_data, tmp_path, "", "--max-update", 4)
    assert p.returncode == 0, p.stderr[-2000:]
    assert hashlib.sha256((tmp_path / "checkpoint_1_2.pt").read_bytes()).hexdigest() == digest


def test_skip_mode_logs_the_skipped_batch_and_training_goes_on(recall_data, tmp_path):
    p = _train(recall_data, tmp_path, "nan:5", "--max-update", 8, "--on-nonfinite", "skip")
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "non-finite loss at update 3, segment 1 of 2 in the batch (segment 5 of the streams); batch skipped" in log
    last = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert last["optimizer_history"][-1]["num_updates"] == 8
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert torch.isfinite(last["extra_state"]["RMTLMTask"]["train_state"]["memory"]).all()


def test_skip_restores_memory_and_gives_zero_finite_gradient(recall_data):
    """In process: the batch's memory update is undone and every parameter gets an exactly zero gradient."""
    _, task, model, criterion = build_from_cli_args([recall_data, *ARGS, "--on-nonfinite", "skip"])
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train")).next_epoch_itr(shuffle=False)
    first, second = next(itr), next(itr)
    first["rmt_state"] = task.state_for(first, "train")
    criterion(model, first)
    state = second["rmt_state"] = first["rmt_state"]  # the state the forward returned: the next batch's
    memory_before, seen_before = state.memory, state.segments_seen
    forward_segment = type(model.decoder).forward_segment
    model.decoder.forward_segment = lambda *a: dataclasses.replace(forward_segment(model.decoder, *a),
                                                                   hidden=torch.full((4, 8, 64), float("nan")))
    second["rmt_update"] = 2
    loss, sample_size, log = criterion(model, second)
    restored = second["rmt_state"]  # what the task keeps: the state before the batch
    assert restored.memory is memory_before and restored.segments_seen == seen_before
    assert sample_size == 0 and log["nonfinite_skipped"] == 1
    model.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())

    criterion.on_nonfinite = "stop"
    from rmt_fairseq.errors import RMTRunError

    with pytest.raises(RMTRunError, match=r"non-finite loss at update 2, segment 1 of 2"):
        criterion(model, second)
