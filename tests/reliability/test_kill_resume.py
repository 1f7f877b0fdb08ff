"""Kill and resume (issue 6, items 1 and 2): real SIGKILLs of fairseq-train at several points, then the same
command again; the resumed run must reproduce the uninterrupted run bitwise (weights, optimizer, memory state)
and log the same losses. Truncated checkpoints are named at load; --restore-fallback uses the previous one."""

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import BIN, REPO, THREADS, cli

FAULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "faults")
ARGS = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
        "--tokens-per-sample", 8, "--batch-size", 4, "--optimizer", "adam", "--lr", "2e-3", "--cpu", "--seed", 1,
        "--log-format", "simple", "--log-interval", 1, "--no-epoch-checkpoints", "--num-workers", 0,
        "--mem-tokens", 4, "--bptt-unroll", 1, "--dropout", 0.1, "--disable-validation",
        "--save-interval-updates", 10, "--max-update", 60]


def _env(fault=None):
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([REPO, FAULTS, os.environ.get("PYTHONPATH", "")]))
    env.pop("RMT_FAULT", None)
    if fault:
        env["RMT_FAULT"] = fault
    return env


def _cmd(data, save, fault=None, extra=()):
    args = [str(a) for a in [data, *ARGS, "--save-dir", save, *extra]]
    if fault:  # fairseq-train's own cli_main, with the fault installed first
        return [sys.executable, "-c", "import rmt_faults; rmt_faults.main('fairseq-train')", *args]
    return [os.path.join(BIN, "fairseq-train"), *args]


def _losses(log):
    return {int(u): float(v) for v, u in re.findall(r"train_inner .* loss=([0-9.]+),.* num_updates=(\d+)", log)}


def _run_until(cmd, env, pattern, delay):
    """Start the command, SIGKILL it `delay` seconds after a stdout line matches `pattern` (None: the process is
    expected to be killed by its own fault); returns the log."""
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if pattern is not None and re.search(pattern, line):
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            break
    lines.extend(p.stdout.read().splitlines(True))
    assert p.wait(timeout=60) == -signal.SIGKILL, "".join(lines)[-3000:]
    return "".join(lines)


def _state(path):
    s = torch.load(path, map_location="cpu", weights_only=False)
    return s["model"], s["last_optimizer_state"], s["extra_state"]["RMTLMTask"]["train_state"], \
        s["extra_state"]["train_iterator"]


def _assert_same_state(a, b):
    ma, oa, ta, ia = _state(a)
    mb, ob, tb, ib = _state(b)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma), "weights differ"
    sa, sb = oa["state"], ob["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert all(torch.equal(sa[k][n], sb[k][n]) if torch.is_tensor(sa[k][n]) else sa[k][n] == sb[k][n]
                   for n in sa[k]), f"optimizer state of param {k} differs"
    assert torch.equal(ta["memory"], tb["memory"]) and ta["segments_seen"] == tb["segments_seen"]
    assert ia == ib


@pytest.fixture(scope="module")
def reference(recall_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("ref")
    p = subprocess.run(_cmd(recall_data, save), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    losses = _losses(p.stdout + p.stderr)
    assert sorted(losses) == list(range(1, 61))
    return save, losses


@pytest.mark.long  # about 26 s: `make test-long`
def test_sigkill_at_several_points_then_resume_reproduces_the_uninterrupted_run(recall_data, reference, tmp_path):
    ref_dir, ref_losses = reference
    rng = random.Random(0)
    logs = []
    # 1. a random moment (a few updates) after the first checkpoint (update 10) was written
    logs.append(_run_until(_cmd(recall_data, tmp_path), _env(), r"Saved checkpoint .*@ 10 updates", rng.random() / 10))
    # 2. the resumed run is killed half-way through writing its second checkpoint file
    logs.append(_run_until(_cmd(recall_data, tmp_path, "kill_in_save:2"), _env("kill_in_save:2"), None, 0))
    # the interrupted write left no checkpoint*.pt behind (only a temporary file), and checkpoint_last.pt loads
    assert all(re.fullmatch(r"checkpoint_(last|1_\d+)\.pt", f) for f in os.listdir(tmp_path) if f.endswith(".pt"))
    updates_before = _state(tmp_path / "checkpoint_last.pt")[3]
    # 3. killed half-way through copying the checkpoint to checkpoint_last.pt
    logs.append(_run_until(_cmd(recall_data, tmp_path, "kill_in_copy:1"), _env("kill_in_copy:1"), None, 0))
    assert _state(tmp_path / "checkpoint_last.pt")[3] == updates_before  # the previous, complete file
    # 4. mid-epoch, between checkpoints
    logs.append(_run_until(_cmd(recall_data, tmp_path), _env(), r"num_updates=4[1-4]\b", rng.random() / 20))
    # 5. the same command runs to the end
    p = subprocess.run(_cmd(recall_data, tmp_path), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    logs.append(p.stdout + p.stderr)

    for log in logs:
        got = _losses(log)
        assert got and all(got[u] == ref_losses[u] for u in got), (logs.index(log), got, ref_losses, log[-3000:])
    assert max(_losses(logs[-1])) == 60
    _assert_same_state(ref_dir / "checkpoint_last.pt", tmp_path / "checkpoint_last.pt")


def _hashes(d):
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in sorted(os.listdir(d))}


def test_truncated_checkpoint_is_named_and_fallback_resumes_from_the_previous_one(recall_data, reference, tmp_path):
    ref_dir, ref_losses = reference
    cli("fairseq-train", recall_data, *ARGS[:-1], 20, "--save-dir", tmp_path)
    last = tmp_path / "checkpoint_last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    before = _hashes(tmp_path)

    p = cli("fairseq-train", recall_data, *ARGS[:-1], 30, "--save-dir", tmp_path, check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and err.startswith(f"error: checkpoint {last} is truncated or corrupt"), p.stderr[-2000:]
    assert "--restore-fallback" in err
    e = cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path", last, "--cpu",
            check=False)
    assert e.returncode == 2 and f"error: checkpoint {last} is truncated or corrupt" in e.stderr
    assert _hashes(tmp_path) == before  # nothing written, nothing removed

    # the file the fallback loads gets the checks the named file would: its streams were cut for 4 per batch
    p = cli("fairseq-train", recall_data, *ARGS[:-1], 30, "--save-dir", tmp_path, "--restore-fallback",
            "--batch-size", 2, check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and err.startswith(f"error: {tmp_path / 'checkpoint_1_20.pt'} (--restore-fallback's "
                                                f"choice for the unreadable {last})"), p.stderr[-2000:]
    assert "cut differently" in err and _hashes(tmp_path) == before

    p = cli("fairseq-train", recall_data, *ARGS[:-1], 30, "--save-dir", tmp_path, "--restore-fallback")
    log = p.stdout + p.stderr
    assert re.search(rf"checkpoint {last} is truncated or corrupt .*loading {tmp_path / 'checkpoint_1_20.pt'}", log)
    got = _losses(log)
    assert sorted(got) == list(range(21, 31)) and all(got[u] == ref_losses[u] for u in got)


def test_checkpoint_writes_are_atomic_and_leave_complete_files(tmp_path):
    """The patched writer and copier: a complete file or the old one, never a partial file under the name."""
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    import user_dir  # noqa: F401  (installs rmt_fairseq.checkpoints)

    target = tmp_path / "checkpoint_last.pt"
    checkpoint_utils.torch_persistent_save({"x": torch.arange(5)}, str(target))
    assert torch.equal(torch.load(target)["x"], torch.arange(5))
    checkpoint_utils.torch_persistent_save({"x": torch.arange(7)}, str(tmp_path / "checkpoint_1_2.pt"))
    assert PathManager.copy(str(tmp_path / "checkpoint_1_2.pt"), str(target), overwrite=True)
    assert torch.equal(torch.load(target)["x"], torch.arange(7))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1_2.pt", "checkpoint_last.pt"]  # no temporaries left
