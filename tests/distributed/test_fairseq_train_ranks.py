"""fairseq-train with 2 real ranks (CPU processes over gloo on loopback), launched the way users launch it
(`fairseq-train --distributed-world-size 2`; on CPU the plugin spawns the ranks, rmt_fairseq/distributed.py):
per-update losses equal one process with the same total number of streams, for every --ddp-backend the README
offers; killed mid-epoch and rerun, each rank continues its own streams; validating on the training split
leaves training untouched.

SGD keeps the comparison tight (printed losses have 4 decimals; all-reduce sums in another order than one
process, so the last bits may differ): Adam's first steps turn float-level differences into full-size ones."""

import os
import re
import signal
import subprocess

import pytest
import torch

from helpers import BIN, REPO, cli, free_port, fresh_command, make_band_data, train_losses

TOL = 2e-4
UPDATES = 8
BACKENDS = ["pytorch_ddp", "legacy_ddp"]
STREAM = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
          "--tokens-per-sample", 8, "--optimizer", "sgd", "--lr", 0.5, "--log-interval", 1, "--seed", 1, "--cpu",
          "--log-format", "simple", "--num-workers", 0, "--no-save", "--disable-validation", "--max-update", UPDATES]
WT103_SHAPED = ["--adaptive-input", "--adaptive-softmax-cutoff", "20,32", "--tie-adaptive-weights",
                "--tie-adaptive-proj", "--adaptive-softmax-factor", 2, "--adaptive-input-factor", 2]
CONFIGS = {
    "rmt-block": ["--bptt-unroll", 1],
    "rmt-sliding": ["--bptt-unroll", 2, "--bptt-mode", "sliding"],
    "xl": ["--mem-tokens", 0, "--mem-len", 8, "--bptt-unroll", 0],
    "rmt+xl": ["--mem-len", 8, "--bptt-unroll", 1],
    "adaptive-one-rank-band": [*WT103_SHAPED, "--bptt-unroll", 1],
    # the paper presets' Transformer-XL conventions: XL's adaptive embedding and softmax (bands of 64/32/16, output
    # biases, tied), XL's init, LM-RMT's memory/cache switch, XL's same-length attention and distance clamp
    # without weight tying the last band's softmax weights get gradient only from the softmax: a rank whose streams
    # never reach that band must still run it (modules/adaptive.py), or the ranks' reductions differ (issue 28)
    "adaptive-untied-one-rank-band": ["--adaptive-input", "--adaptive-softmax-cutoff", "20,32",
                                      "--adaptive-softmax-factor", 2, "--adaptive-input-factor", 2, "--bptt-unroll", 1],
    "adaptive-xl-untied-one-rank-band": ["--embedding-impl", "transformer_xl", "--adaptive-softmax-cutoff", "20,32",
                                         "--div-val", 2, "--init", "normal", "--bptt-unroll", 1],
    "adaptive-xl-one-rank-band": ["--embedding-impl", "transformer_xl", "--adaptive-softmax-cutoff", "20,32",
                                  "--div-val", 2, "--tie-adaptive-weights", "--tie-adaptive-proj", "--init", "normal",
                                  "--mem-len", 8, "--read-mem-from-cache", "--same-length", "--clamp-len", 6,
                                  "--bptt-unroll", 1],
}
WRAPPER = ["--user-dir", "user_dir", "--task", "language_modeling", "--arch", "rmt_transformer_lm",
           "--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64,
           "--decoder-attention-heads", 2, "--dropout", 0.0, "--mem-tokens", 4, "--tokens-per-sample", 32,
           "--segment-len", 8, "--criterion", "rmt_cross_entropy", "--optimizer", "sgd", "--lr", 0.5, "--cpu",
           "--num-workers", 0, "--seed", 1, "--log-format", "simple", "--log-interval", 1, "--no-save",
           "--disable-validation", "--max-update", UPDATES]


@pytest.fixture(scope="module")
def band_data(tmp_path_factory):
    return make_band_data(str(tmp_path_factory.mktemp("band")))


def _data(name, recall_data, band_data):
    return band_data if name.startswith("adaptive") else recall_data


def _two_ranks(*args, **kw):
    return cli("fairseq-train", *args, "--distributed-world-size", 2, **kw)


@pytest.fixture(scope="module")
def one_process(recall_data, band_data):
    """The reference: one process reading all 8 streams (rmt_lm), or the 2 x 4 samples of an update as
    --update-freq 2 (language_modeling: both ranks' batches of fairseq's shared shuffled batch order)."""
    out = {}
    for name, extra in CONFIGS.items():
        p = cli("fairseq-train", _data(name, recall_data, band_data), *STREAM, *extra, "--batch-size", 8)
        out[name] = train_losses(p.stdout + p.stderr)
    p = cli("fairseq-train", recall_data, *WRAPPER, "--batch-size", 4, "--update-freq", 2)
    out["wrapper"] = train_losses(p.stdout + p.stderr)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [*CONFIGS, "wrapper"])
def test_two_ranks_log_the_losses_of_one_process(recall_data, band_data, one_process, name, backend):
    if name == "wrapper":
        p = _two_ranks(recall_data, *WRAPPER, "--batch-size", 4, "--ddp-backend", backend)
    else:
        p = _two_ranks(_data(name, recall_data, band_data), *STREAM, *CONFIGS[name], "--batch-size", 4,
                       "--ddp-backend", backend)
    log = p.stdout + p.stderr
    assert "initialized host" in log and "as rank 1" in log, log[-3000:]  # really two processes
    got, ref = train_losses(log), one_process[name]
    assert sorted(got) == list(range(1, UPDATES + 1)), log[-3000:]
    assert all(abs(got[u] - ref[u]) <= TOL for u in got), (got, ref)


def test_torchrun_without_a_world_size_flag_trains_one_job(recall_data, one_process):
    """The README's torchrun line on CPU: fairseq reads WORLD_SIZE only when --distributed-world-size (default:
    the GPU count, 1 here) is above 1, so each rank would train alone; the launcher's count is used."""
    p = cli("torchrun", "--nproc_per_node", 2, "--master_port", free_port(), fresh_command("fairseq-train")[-1],
            recall_data, *STREAM, *CONFIGS["rmt-block"], "--batch-size", 4)
    log = p.stdout + p.stderr
    assert "from the launcher (WORLD_SIZE)" in log and "as rank 1" in log, log[-3000:]
    got, ref = train_losses(log), one_process["rmt-block"]
    assert sorted(got) == list(range(1, UPDATES + 1)) and all(abs(got[u] - ref[u]) <= TOL for u in got), (got, ref)


def test_band_data_uses_the_last_band_on_rank_1_only(band_data):
    """The premise of the adaptive case: rank 0's streams never reach the last band, rank 1's do."""
    from fairseq.data import data_utils

    tokens = torch.cat([t for t in data_utils.load_indexed_dataset(os.path.join(band_data, "train"), None)])
    half = tokens[: (len(tokens) - 1) // 8 * 4 + 1]  # rank 0's 4 of 8 streams (inputs and targets)
    assert int(half.max()) < 32 and int(tokens.max()) >= 32


RESUME = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
          "--tokens-per-sample", 8, "--batch-size", 4, "--optimizer", "adam", "--lr", "2e-3", "--dropout", 0.1,
          "--mem-tokens", 4, "--mem-len", 8, "--bptt-unroll", 1, "--cpu", "--seed", 1, "--log-format", "simple",
          "--log-interval", 1, "--num-workers", 0, "--no-epoch-checkpoints", "--disable-validation",
          "--save-interval-updates", 6, "--max-update", 14, "--distributed-world-size", 2]


def test_two_ranks_killed_mid_epoch_resume_each_rank_with_its_own_streams(recall_data, tmp_path):
    """SIGKILL of the whole 2-rank job after the mid-epoch checkpoint at update 12; the same command again
    continues from there with the uninterrupted run's losses (Adam, dropout 0.1, RMT + XL cache)."""
    full = cli("fairseq-train", recall_data, *RESUME, "--save-dir", tmp_path / "full")
    ref = train_losses(full.stdout + full.stderr)

    cmd = [os.path.join(BIN, "fairseq-train"), *map(str, [recall_data, *RESUME, "--save-dir", tmp_path / "b"])]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if re.search(r"Saved checkpoint .*checkpoint_1_12\.pt", line):
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and both ranks, mid-epoch
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    state = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=False)["extra_state"]["RMTLMTask"]
    memory = state["train_state"]["memory"]
    assert memory.shape[0] == 8  # both ranks' 4 streams, in rank order
    assert not torch.equal(memory[:4], memory[4:])

    resumed = cli("fairseq-train", recall_data, *RESUME, "--save-dir", tmp_path / "b")
    got = train_losses(resumed.stdout + resumed.stderr)
    assert sorted(got) == [13, 14], (resumed.stdout + resumed.stderr)[-3000:]
    assert all(got[u] == ref[u] for u in got), (got, ref)


def _with(args, drop=(), **flags):
    """args with the values of some flags replaced (max_update=12), a flag and its value dropped (None), or
    switches dropped (drop=("--disable-validation",))."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in drop:
            continue
        key = a[2:].replace("-", "_") if isinstance(a, str) and a.startswith("--") else None
        if key in flags:
            if flags[key] is not None:
                out += [a, flags[key]]
            skip = True
            continue
        out.append(a)
    return out


def test_resume_on_another_split_of_the_same_streams(recall_data, tmp_path):
    """A 2-rank checkpoint of 2 x 4 streams resumes in one process with --batch-size 8 (the same 8 streams):
    every rank's rows go to the streams they belong to. 2 x 4 -> 1 x 4 is one line naming the counts."""
    save = tmp_path / "a"
    two = cli("fairseq-train", recall_data, *_with(RESUME, max_update=12), "--save-dir", save)
    one = _with(RESUME, distributed_world_size=None)
    bad = cli("fairseq-train", recall_data, *one, "--save-dir", save, check=False)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error: ") and "8 streams" in last, bad.stderr[-2000:]
    p = cli("fairseq-train", recall_data, *_with(one, batch_size=8), "--save-dir", save)
    assert sorted(train_losses(p.stdout + p.stderr)) == [13, 14]
    # the run's summary line, once (rank 0): RESUME's --mem-tokens 4 --mem-len 8 --bptt-unroll 1, streams per rank
    # and across the ranks (issue 27)
    run = ("memory: RMT, 4 memory tokens (--mem-tokens) whose outputs are the next segment's memory + Transformer-XL "
           "cache of 8 tokens (--mem-len), detached; segment 8 tokens (--tokens-per-sample); {}; BPTT through 1 "
           "segment boundary (--bptt-unroll 1: 2 segments per update)")
    for log, streams in [(two.stdout + two.stderr, "4 streams per rank (--batch-size) x 2 ranks = 8 streams"),
                         (p.stdout + p.stderr, "8 streams (--batch-size)")]:
        assert re.findall(r"\| training with (.*)$", log, re.M) == [run.format(streams)], log[-3000:]


def test_validating_on_the_training_split_leaves_training_unchanged(recall_data, tmp_path):
    args = [recall_data, *_with(STREAM, drop=("--disable-validation",), max_update=16), "--batch-size", 8]
    plain = train_losses(cli("fairseq-train", *args, "--disable-validation").stdout)
    p = cli("fairseq-train", *args, "--valid-subset", "train", "--validate-interval-updates", 4)
    log = p.stdout + p.stderr
    assert len(re.findall(r"valid on 'train' subset", log)) >= 4, log[-3000:]
    assert train_losses(log) == plain
