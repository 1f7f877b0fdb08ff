"""rmt-deepspeed-train under the real `deepspeed` launcher: 2 ranks over gloo on loopback, tiny model.

Reference: a single-process fairseq-train run with the same global batch (2 ranks x 4 streams = 8 streams),
seed and flags. SGD makes the comparison tight: Adam's first steps turn float-level differences in near-zero
gradients into full-size updates, so equality of the two paths is checked where it is meaningful."""

import os
import re
import subprocess

import pytest

from helpers import BIN, REPO, cli, command, free_port, remove_deepspeed_buffers

pytestmark = pytest.mark.deepspeed

COMMON = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
          "--tokens-per-sample", 8, "--optimizer", "sgd", "--lr", 0.5, "--log-interval", 1, "--seed", 1, "--cpu",
          "--bptt-unroll", 1]
TOL = 2e-4  # losses are printed to 4 decimals


def _losses(text):
    return {int(u): float(v) for v, u in re.findall(r"train_inner .*?loss=([0-9.]+),.*?num_updates=(\d+)", text)}


def _valid(text):
    return [float(x) for x in re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", text)]


def deepspeed(*args, launcher=("--num_gpus", "2"), timeout=300):
    env, port = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"), free_port()
    try:
        p = subprocess.run([*command("deepspeed"), *launcher, "--master_port", str(port),
                            os.path.join(BIN, "rmt-deepspeed-train"), *map(str, args)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=timeout)
    finally:
        remove_deepspeed_buffers(port=port)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def reference(recall_data, tmp_path_factory):
    p = cli("fairseq-train", recall_data, *COMMON, "--batch-size", 8, "--max-update", 8, "--no-save",
            "--log-format", "simple", "--num-workers", 0)
    return _losses(p.stdout + p.stderr)


@pytest.mark.parametrize("stage,extra", [(1, []), (2, ["--checkpoint-segments", "--checkpoint-activations"]),
                                         (3, ["--checkpoint-segments", "--checkpoint-activations"])],
                         ids=["zero1", "zero2+checkpointing", "zero3+checkpointing"])
def test_zero_stages_match_single_process_fairseq_train(recall_data, reference, stage, extra):
    out = deepspeed(recall_data, *COMMON, *extra, "--batch-size", 4, "--max-update", 8, "--no-save",
                    "--deepspeed-config", f"ds_configs/zero{stage}.json")
    got = _losses(out)
    assert sorted(got) == list(range(1, 9)), out[-2000:]
    assert all(abs(got[u] - reference[u]) <= TOL for u in got), (got, reference)


def test_two_nodes_on_loopback_train_together(recall_data, reference, tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("node0 slots=1\nnode1 slots=1\n")
    env, port = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"), free_port()
    procs = [subprocess.Popen([*command("deepspeed"), "--hostfile", str(hosts), "--no_ssh", "--node_rank",
                               str(r), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               os.path.join(BIN, "rmt-deepspeed-train"), recall_data, *map(str, COMMON),
                               "--batch-size", "4", "--max-update", "4", "--no-save", "--deepspeed-config",
                               "ds_configs/zero2.json"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    got = _losses(outs[0])  # rank 0 (node 0) logs the all-reduced loss of both nodes
    assert sorted(got) == [1, 2, 3, 4] and all(abs(got[u] - reference[u]) <= TOL for u in got), (got, reference)


def test_resume_and_evaluate(recall_data, tmp_path):
    """Save at update 4, stop, resume: updates 5..8 log the uninterrupted run's losses. Rank 0's checkpoint_last.pt
    evaluates with fairseq-eval-lm to DeepSpeed's own validation loss."""
    args = [recall_data, *COMMON, "--batch-size", 4, "--deepspeed-config", "ds_configs/zero2.json"]
    full = deepspeed(*args, "--max-update", 8, "--save-dir", tmp_path / "a")
    deepspeed(*args, "--max-update", 4, "--save-dir", tmp_path / "b", "--disable-validation")
    resumed = deepspeed(*args, "--max-update", 8, "--save-dir", tmp_path / "b")
    f, r = _losses(full), _losses(resumed)
    assert sorted(r) == [5, 6, 7, 8] and all(abs(f[u] - r[u]) <= TOL for u in r), (f, r)

    e = cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
            tmp_path / "a" / "checkpoint_last.pt", "--batch-size", 8, "--tokens-per-sample", 8, "--gen-subset", "valid",
            "--cpu", "--num-workers", 0)
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", e.stdout + e.stderr).group(1))
    # DeepSpeed validated 2 ranks x 4 streams = the same 8 streams eval-lm reads with --batch-size 8
    assert loss == pytest.approx(_valid(full)[-1], abs=TOL)


BAD = {
    "missing json": ("ds_configs/nope.json", "--deepspeed-config ds_configs/nope.json: no such file"),
    "invalid json": ("{bad", "invalid JSON"),
    "batch mismatch": ('{"train_micro_batch_size_per_gpu": 16}', "train_micro_batch_size_per_gpu is 16 but the "
                                                                 "flags give 4 (--batch-size 4)"),
    "zero stage 4": ('{"zero_optimization": {"stage": 4}}', "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    "offload without zero": ('{"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}',
                             "offload_optimizer needs ZeRO stage >= 1, got stage 0"),
    "param offload below zero3": ('{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}',
                                  "offload_param needs ZeRO stage >= 3"),
    "optimizer in json": ('{"optimizer": {"type": "AdamW"}}', "come from the fairseq flags"),
    "space after a comma": ("ds_configs/zero2.json, ds_configs/nope.json",
                            "--deepspeed-config ds_configs/nope.json: no such file"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_deepspeed_config_is_a_one_line_error_before_any_process_group(recall_data, tmp_path, name):
    content, message = BAD[name]
    path = content
    if content.startswith("{"):
        path = tmp_path / "ds.json"
        path.write_text(content)
    p = cli("rmt-deepspeed-train", recall_data, *COMMON, "--batch-size", 4, "--max-update", 1,
            "--deepspeed-config", path, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("error: ") and message in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "init_distributed" not in p.stderr


def test_stock_task_is_refused_naming_the_task(recall_data):
    """Per-sample recurrence (--task language_modeling) is fairseq-train's; the DeepSpeed trainer runs streams."""
    args = ["language_modeling" if a == "rmt_lm" else a for a in COMMON[:-2]]  # without --bptt-unroll 1
    p = cli("rmt-deepspeed-train", recall_data, *args, "--batch-size", 4, "--max-update", 1, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "--task language_modeling" in last and "--task rmt_lm" in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "init_distributed" not in p.stderr
