"""--task rmt_algorithmic: target-only loss, equal segments, metrics; a real fairseq-train run and a
checkpoint evaluation with fairseq-validate."""

import math
import re

import torch
import torch.nn.functional as F

from helpers import build_from_cli_args, cli


def _data(tmp_path, task="copy", *extra):
    raw, out = tmp_path / "raw", tmp_path / "bin"
    cli("rmt-data", task, "--out", raw, "--train-size", 300, "--valid-size", 40, "--test-size", 40, *extra)
    cli("fairseq-preprocess", "--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
        "--testpref", raw / "test.txt", "--destdir", out, "--workers", 1)
    return str(out)


ARGS = ["--user-dir", "user_dir", "--task", "rmt_algorithmic", "--arch", "rmt_tiny", "--criterion",
        "rmt_cross_entropy", "--batch-size", 8, "--cpu", "--decoder-embed-dim", 32]


def test_loss_covers_only_the_target_and_segments_are_equal(tmp_path):
    data = _data(tmp_path, "copy", "--src-len", 6)
    cfg, task, model, criterion = build_from_cli_args([data, *ARGS, "--num-segments", 3])
    task.load_dataset("valid")
    sample = task.dataset("valid").collater([task.dataset("valid")[i] for i in range(4)])
    src, tgt = sample["net_input"]["src_tokens"], sample["target"]
    gen = int(sample["gen"][0])
    pad = task.source_dictionary.pad()
    # 6 source + <gen> + 12 target = 19 inputs -> 3 segments of 7 (padded to 21)
    assert src.shape[1] == 21 and sample["net_input"]["segment_len"] == 7 and sample["num_segments"] == 3
    assert (tgt[:, :gen] == pad).all()  # nothing before <gen> is scored
    assert torch.equal(tgt[:, gen : gen + 12], src[:, gen + 1 : gen + 13])  # the whole copy is
    assert (tgt[:, gen + 12 :] == pad).all()  # not </s>, not the padding
    model.eval()
    sample["rmt_state"] = None
    loss, n, _ = criterion(model, sample)
    assert n == 4 * 12
    # the same number from the logits directly, over target positions only
    from rmt_fairseq.modules.recurrence import RecurrentState, run_segments

    h = torch.cat(run_segments(model.decoder, src, None, RecurrentState(), seg_len=7, return_hidden=True).hidden, 1)
    lp = model.decoder.token_log_probs(h)
    assert math.isclose(loss.item(), F.nll_loss(lp.flatten(0, 1), tgt.flatten(), ignore_index=pad,
                                                reduction="sum").item(), rel_tol=1e-5)
    # and changing a source token's own target entry (what an LM would score) changes nothing
    tgt2 = tgt.clone()
    tgt2[:, : gen - 1] = src[:, 1:gen]
    assert (tgt2 != tgt).any()
    sample2 = dict(sample, target=torch.where(tgt == pad, pad, tgt2), rmt_state=None)  # fresh memory again
    assert criterion(model, sample2)[0].item() == loss.item()


def test_train_and_validate_through_the_clis(tmp_path):
    data = _data(tmp_path, "equations")
    save = tmp_path / "ckpt"
    p = cli("fairseq-train", data, *ARGS, "--tokens-per-sample", 30, "--answer-len", 30, "--optimizer", "adam",
            "--lr", "3e-3", "--max-update", 8, "--save-dir", save, "--num-workers", 0, "--log-format", "simple",
            "--no-epoch-checkpoints")
    log = p.stdout + p.stderr
    m = re.search(r"valid on 'valid' subset \| loss ([0-9.]+) \| acc_tf ([0-9.]+) \| em_tf ([0-9.]+) \| "
                  r"acc ([0-9.]+) \| em ([0-9.]+) \| answer_acc ([0-9.]+)", log)
    assert m, log[-3000:]
    v = cli("fairseq-validate", data, "--user-dir", "user_dir", "--task", "rmt_algorithmic", "--path",
            save / "checkpoint_last.pt", "--valid-subset", "valid", "--batch-size", 8, "--cpu",
            "--tokens-per-sample", 30, "--answer-len", 30, "--num-workers", 0)
    mv = re.search(r"loss ([0-9.]+) \| acc_tf ([0-9.]+) .* acc ([0-9.]+)", v.stdout + v.stderr)
    assert mv, (v.stdout + v.stderr)[-3000:]
    assert float(mv.group(1)) == float(m.group(1))  # the checkpoint evaluates to its last validation


def test_curriculum_advances_is_logged_and_survives_resume(tmp_path):
    data = _data(tmp_path, "copy", "--src-len", 6)
    save = tmp_path / "ckpt"
    args = [data, *ARGS, "--segment-curriculum", "--curriculum-threshold", 0, "--max-num-segments", 3, "--optimizer",
            "adam", "--lr", "1e-3", "--validate-interval-updates", 2, "--save-dir", save, "--num-workers", 0,
            "--log-format", "simple", "--log-interval", 1, "--no-epoch-checkpoints", "--no-eval-greedy",
            "--save-interval-updates", 2]
    p = cli("fairseq-train", *args, "--max-update", 3)
    stages = [float(x) for x in re.findall(r"train_inner .*num_segments=([0-9.]+)", p.stdout + p.stderr)]
    # stage 1 for updates 1-2, validation (threshold 0 always passes), then 2 segments from update 3
    assert stages == [1.0, 1.0, 2.0], (p.stdout + p.stderr)[-3000:]
    p = cli("fairseq-train", *args, "--max-update", 6)  # resumes from checkpoint_last (update 3)
    stages = [float(x) for x in re.findall(r"train_inner .*num_segments=([0-9.]+)", p.stdout + p.stderr)]
    assert stages == [2.0, 3.0, 3.0], (p.stdout + p.stderr)[-3000:]  # the stage came back from the checkpoint


def test_every_sample_is_batched_whatever_the_batch_size(tmp_path):
    """fairseq's batch_by_size with its default --required-batch-size-multiple 8 would drop samples (40 in
    batches of 4 -> 36 scored); the task batches every one."""
    data = _data(tmp_path, "copy", "--src-len", 6)
    _, task, _, _ = build_from_cli_args([data, *ARGS, "--num-segments", 2])
    task.load_dataset("valid")
    for bs in (4, 7, 32):
        # as fairseq-train and fairseq-validate call it (their default --required-batch-size-multiple)
        itr = task.get_batch_iterator(task.dataset("valid"), max_sentences=bs, required_batch_size_multiple=8)
        itr = itr.next_epoch_itr(shuffle=False)
        assert sorted(i for batch in itr for i in batch["id"].tolist()) == list(range(40)), bs


def test_segment_layout_names_the_segment_length():
    from rmt_fairseq.tasks.rmt_algorithmic import segment_layout

    # the demo: 10 symbols, <gen>, the source twice in 3 equal segments
    assert segment_layout((31, 31), 3, None) == (11, "segment length 11 (31-token samples in 3 segments)")
    assert segment_layout((31, 31), 1, None) == (31, "segment length 31 (31-token samples in 1 segment)")
    # equations: 180 tokens in segments of --tokens-per-sample 30
    assert segment_layout((180, 180), 1, 30) == (30, "segment length 30 (180-token samples in 6 segments)")
    # samples of different lengths: equal segments differ per batch (no single length to record)
    assert segment_layout((28, 31), 3, None) == (
        None, "segment length 10 to 11 (28 to 31-token samples in 3 segments)")
    assert segment_layout((28, 31), 3, 10)[0] == 10
