"""rmt-deepspeed-train at scale-out's edges, 2 ranks under the real `deepspeed` launcher (gloo on loopback):
a wt103-shaped model (adaptive input + tied adaptive softmax: fairseq's modules, and Transformer-XL's as the paper
presets build them) whose last band only rank 1 uses, under ZeRO-1/2/3 with ZeRO-3 really partitioning every weight
(persistence threshold 0); rank 0's ZeRO-2/3 checkpoint_last.pt evaluates
with fairseq-eval-lm to DeepSpeed's last validation loss; --update-freq 2 over an epoch of an odd number of
batches groups updates as fairseq-train does (every stage); resume with dropout, Adam and warm-up reproduces
the run; reduce_lr_on_plateau decays as under fairseq-train; validating on the training split changes nothing;
an epoch's end always leaves a checkpoint.

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
STAGES = [1, 2, 3]


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


@pytest.mark.parametrize("stage", STAGES)
def test_update_freq_over_an_odd_epoch_groups_as_fairseq_train(recall_data, odd_epoch_reference, ds_config, stage):
    out = deepspeed(recall_data, *COMMON, "--batch-size", 4, "--update-freq", 2, "--max-update", 26, "--no-save",
                    "--disable-validation", "--deepspeed-config", ds_config(stage))
    got = train_losses(out)
    assert sorted(got) == list(range(1, 27)), out[-3000:]
    assert all(abs(got[u] - odd_epoch_reference[u]) <= TOL for u in got), (got, odd_epoch_reference)


RESUME = ["--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 4,
          "--warmup-init-lr", "1e-5", "--dropout", 0.1, "--save-interval-updates", 4, "--disable-validation"]


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_with_dropout_adam_and_warmup_reproduces_the_run(recall_data, ds_config, stage, tmp_path):
    args = [recall_data, *COMMON, *RESUME, "--batch-size", 4, "--deepspeed-config", ds_config(stage)]  # adam wins
    full = train_losses(deepspeed(*args, "--max-update", 10, "--save-dir", tmp_path / "a"))
    deepspeed(*args, "--max-update", 4, "--save-dir", tmp_path / "b")
    resumed = train_losses(deepspeed(*args, "--max-update", 10, "--save-dir", tmp_path / "b"))
    assert sorted(resumed) == list(range(5, 11)), resumed
    assert all(resumed[u] == full[u] for u in resumed), (full, resumed)


def _lrs(text):
    return [float(x) for x in re.findall(r"train_inner .*?lr[=\s]([0-9.e-]+)", text)]


def test_reduce_lr_on_plateau_decays_as_under_fairseq_train_and_epochs_leave_checkpoints(recall_data, tmp_path):
    """--lr-threshold 10: no epoch counts as an improvement, so with patience 0 the lr halves after every epoch.
    --no-epoch-checkpoints keeps the newest epoch's checkpoint only."""
    flags = ["--lr-scheduler", "reduce_lr_on_plateau", "--lr-shrink", 0.5, "--lr-patience", 0, "--lr-threshold", 10,
             "--max-epoch", 3, "--no-epoch-checkpoints", "--log-interval", 47]
    ref = cli("fairseq-train", recall_data, *COMMON, *flags, "--batch-size", 8, "--log-format", "simple",
              "--num-workers", 0, "--save-dir", tmp_path / "fs")
    out = deepspeed(recall_data, *COMMON, *flags, "--batch-size", 4, "--save-dir", tmp_path / "ds",
                    "--deepspeed-config", "ds_configs/zero2.json")
    fs_lr, ds_lr = _lrs(ref.stdout + ref.stderr), _lrs(out)
    assert len(fs_lr) == 3 and fs_lr[2] < fs_lr[0] and ds_lr == fs_lr, (fs_lr, ds_lr)
    ds_names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert ds_names == sorted(n for p in (tmp_path / "fs").iterdir() for n in (p.name, p.name[:-3] + "-shard1.pt"))
    assert "checkpoint_last.pt" in ds_names and not any(n.startswith("checkpoint3") for n in ds_names)


def test_one_epoch_without_epoch_checkpoints_still_writes_one(recall_data, tmp_path):
    deepspeed(recall_data, *COMMON, "--batch-size", 4, "--max-epoch", 1, "--no-epoch-checkpoints",
              "--disable-validation", "--save-dir", tmp_path, "--deepspeed-config", "ds_configs/zero1.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last-shard1.pt", "checkpoint_last.pt"]


def test_validating_on_the_training_split_leaves_training_unchanged(recall_data):
    args = [recall_data, *COMMON, "--batch-size", 4, "--max-update", 16, "--no-save", "--deepspeed-config",
            "ds_configs/zero2.json"]
    plain = train_losses(deepspeed(*args, "--disable-validation"))
    out = deepspeed(*args, "--valid-subset", "train", "--validate-interval-updates", 4)
    assert len(re.findall(r"valid on 'train' subset", out)) >= 3, out[-3000:]
    assert train_losses(out) == plain


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
