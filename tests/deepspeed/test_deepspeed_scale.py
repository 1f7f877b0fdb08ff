"""rmt-deepspeed-train at scale-out's edges, 2 ranks under the real `deepspeed` launcher (gloo on loopback):
a wt103-shaped model (adaptive input + tied adaptive softmax: fairseq's modules, and Transformer-XL's as the paper
presets build them) whose last band only rank 1 uses, under ZeRO-1/2/3 with ZeRO-3 really partitioning every weight
(persistence threshold 0); rank 0's ZeRO-2/3 checkpoint_last.pt evaluates
with fairseq-eval-lm to DeepSpeed's last validation loss; --update-freq 2 over an epoch of an odd number of
batches groups updates as fairseq-train does (ZeRO-2/3: the accumulation boundary is DeepSpeed's); resume with
dropout, Adam and warm-up under ZeRO-3 reproduces the run. The rules fairseq-train's own loop applies (lr
schedules, validation subsets, epoch checkpoints, ...) are in test_deepspeed_parity.py.

The references are single-process fairseq-train runs with the same 8 streams (2 ranks x 4)."""

import json
import os
import re
import sys

import pytest
import torch

from helpers import cli, make_band_data, train_losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_deepspeed_train import COMMON, TOL, _valid, deepspeed  # noqa: E402  (the module beside this one)

pytestmark = pytest.mark.deepspeed
WT103_SHAPED = ["--adaptive-input", "--adaptive-softmax-cutoff", "20,32", "--tie-adaptive-weights",
                "--tie-adaptive-proj", "--adaptive-softmax-factor", 2, "--adaptive-input-factor", 2]
# the paper presets' Transformer-XL conventions: XL's adaptive embedding and softmax (bands of 64/32/16, output biases,
# tied weights and projections, every band a module ZeRO-3 gathers), XL's init, LM-RMT's memory/cache switch
XL_SHAPED = ["--embedding-impl", "transformer_xl", "--adaptive-softmax-cutoff", "20,32", "--div-val", 2,
             "--tie-adaptive-weights", "--tie-adaptive-proj", "--init", "normal", "--mem-len", 8,
             "--read-mem-from-cache", "--same-length", "--clamp-len", 6]
SHAPES = {"fairseq": WT103_SHAPED, "transformer_xl": XL_SHAPED}


@pytest.fixture(scope="module")
def band_data(tmp_path_factory):
    return make_band_data(str(tmp_path_factory.mktemp("band")))


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory):
    """ds_configs/zeroN.json; for ZeRO-3 with stage3_param_persistence_threshold 0, so that every weight of
    the tiny model is partitioned (the shipped 100000 keeps them all whole on every rank)."""
    root = tmp_path_factory.mktemp("ds")
    (root / "partition_all.json").write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold":
                                                                               0}}))
    return lambda stage: (f"ds_configs/zero{stage}.json" + (f",{root / 'partition_all.json'}" if stage == 3 else ""))


@pytest.fixture(scope="module")
def wt103_reference(band_data):
    out = {}
    for shape, flags in SHAPES.items():
        p = cli("fairseq-train", band_data, *COMMON, *flags, "--batch-size", 8, "--max-update", 8, "--no-save",
                "--disable-validation", "--log-format", "simple", "--num-workers", 0)
        out[shape] = train_losses(p.stdout + p.stderr)
    return out


@pytest.mark.parametrize("stage,shape", [(1, "fairseq"), (2, "fairseq"), (3, "fairseq"), (2, "transformer_xl"),
                                         (3, "transformer_xl")])
def test_wt103_shaped_band_on_one_rank_logs_fairseq_train_losses_and_evaluates(band_data, wt103_reference, ds_config,
                                                                             stage, shape, tmp_path):
    save = tmp_path / "ds"
    out = deepspeed(band_data, *COMMON, *SHAPES[shape], "--batch-size", 4, "--max-update", 8, "--save-dir", save,
                    "--deepspeed-config", ds_config(stage))
    got = train_losses(out)
    assert sorted(got) == list(range(1, 9)), out[-3000:]
    assert all(abs(got[u] - wt103_reference[shape][u]) <= TOL for u in got), (got, wt103_reference[shape])
    shard = torch.load(save / "checkpoint_last-shard1.pt", weights_only=False)  # rank 1: its DeepSpeed state only
    assert shard["model"] is None
    engine_files = sorted(shard["last_optimizer_state"]["deepspeed"])
    assert engine_files == ["zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]\
        if stage == 3 else ["zero_pp_rank_1_mp_rank_00_optim_states.pt"], engine_files
    if stage == 1:
        return
    model = save / "checkpoint_last.pt"  # rank 0's: a fairseq checkpoint (the weights gathered under ZeRO-3)
    state = torch.load(model, weights_only=False)
    assert state["extra_state"]["RMTLMTask"]["train_state"]["memory"].shape[0] == 8  # both ranks' streams
    e = cli("fairseq-eval-lm", band_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
            model, "--batch-size", 8, "--tokens-per-sample", 8, "--gen-subset", "valid", "--cpu",
            "--num-workers", 0)
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", e.stdout + e.stderr).group(1))
    assert loss == pytest.approx(_valid(out)[-1], abs=TOL)
    # fairseq-validate builds the task from the checkpoint's config (saved by rank 0 of 2): one process, every stream
    v = cli("fairseq-validate", band_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
            model, "--batch-size", 8, "--valid-subset", "valid", "--cpu", "--num-workers", 0)
    vout = v.stdout + v.stderr
    assert "8 streams x" in vout, vout[-2000:]
    assert float(re.search(r"valid \| .*?loss ([0-9.]+)", vout).group(1)) == pytest.approx(_valid(out)[-1], abs=TOL)


@pytest.fixture(scope="module")
def odd_epoch_reference(recall_data):
    """fairseq-train, --update-freq 2, across the end of an epoch of 47 batches (the last group holds one)."""
    p = cli("fairseq-train", recall_data, *COMMON, "--batch-size", 8, "--update-freq", 2, "--max-update", 26,
            "--no-save", "--disable-validation", "--log-format", "simple", "--num-workers", 0)
    losses = train_losses(p.stdout + p.stderr)
    assert sorted(losses) == list(range(1, 27))
    return losses


@pytest.mark.parametrize("stage", [2, 3])
def test_update_freq_over_an_odd_epoch_groups_as_fairseq_train(recall_data, odd_epoch_reference, ds_config, stage):
    out = deepspeed(recall_data, *COMMON, "--batch-size", 4, "--update-freq", 2, "--max-update", 26, "--no-save",
                    "--disable-validation", "--deepspeed-config", ds_config(stage))
    got = train_losses(out)
    assert sorted(got) == list(range(1, 27)), out[-3000:]
    assert all(abs(got[u] - odd_epoch_reference[u]) <= TOL for u in got), (got, odd_epoch_reference)


RESUME = ["--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 4,
          "--warmup-init-lr", "1e-5", "--dropout", 0.1, "--save-interval-updates", 4, "--disable-validation"]


@pytest.mark.parametrize("stage", [3])
def test_resume_with_dropout_adam_and_warmup_reproduces_the_run(recall_data, ds_config, stage, tmp_path):
    args = [recall_data, *COMMON, *RESUME, "--batch-size", 4, "--deepspeed-config", ds_config(stage)]  # adam wins
    full = train_losses(deepspeed(*args, "--max-update", 10, "--save-dir", tmp_path / "a"))
    deepspeed(*args, "--max-update", 4, "--save-dir", tmp_path / "b")
    resumed = train_losses(deepspeed(*args, "--max-update", 10, "--save-dir", tmp_path / "b"))
    assert sorted(resumed) == list(range(5, 11)), resumed
    assert all(resumed[u] == full[u] for u in resumed), (full, resumed)


def test_a_bad_json_under_the_launcher_is_one_line(recall_data, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_batch_size": 64}')
    import subprocess

    from helpers import BIN, REPO, command, free_port

    p = subprocess.run([*command("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                        os.path.join(BIN, "rmt-deepspeed-train"), *map(str, [recall_data, *COMMON, "--batch-size", 4,
                                                                             "--deepspeed-config", bad])],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    errors = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and len(errors) == 1 and "train_batch_size is 64" in errors[0], p.stderr[-2000:]


def test_without_the_launcher_one_rank_trains(recall_data):
    """rmt-deepspeed-train started directly is one rank (DeepSpeed alone would look for MPI): the losses of
    single-process fairseq-train with the same streams."""
    ref = train_losses(cli("fairseq-train", recall_data, *COMMON, "--batch-size", 4, "--max-update", 4, "--no-save",
                           "--disable-validation", "--log-format", "simple", "--num-workers", 0).stdout)
    p = cli("rmt-deepspeed-train", recall_data, *COMMON, "--batch-size", 4, "--max-update", 4, "--no-save",
            "--disable-validation", "--deepspeed-config", "ds_configs/zero1.json")
    got = train_losses(p.stdout + p.stderr)
    assert sorted(got) == [1, 2, 3, 4] and all(abs(got[u] - ref[u]) <= TOL for u in got), (got, ref)


def test_deepspeed_files_that_hold_no_model_are_named_where_a_model_is_expected(recall_data, tmp_path):
    tag = tmp_path / "ds" / "update4"  # DeepSpeed's own layout
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    shard = tmp_path / "checkpoint_last-shard1.pt"  # what rank 1 writes: its engine state, no model
    torch.save({"model": None, "cfg": {}, "last_optimizer_state": {"deepspeed": {}}}, shard)
    for path, message in [(tag, "DeepSpeed checkpoint directory"), (shard, "without -shard<r>, rank 0's file")]:
        p = cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path", path, "--cpu",
                check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and last.startswith("error: ") and message in last, p.stderr[-2000:]


def test_a_save_dir_of_the_earlier_deepspeed_layout_is_refused_not_silently_restarted(recall_data, tmp_path):
    (tmp_path / "latest").write_text("update4")  # DeepSpeed's own layout, as rmt-deepspeed-train wrote it before
    (tmp_path / "update4").mkdir()
    p = cli("rmt-deepspeed-train", recall_data, *COMMON, "--batch-size", 4, "--max-update", 1, "--save-dir", tmp_path,
            "--deepspeed-config", "ds_configs/zero1.json", check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("error: ") and "'latest'" in last, p.stderr[-2000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["latest", "update4"]  # nothing written
