"""Streams, state reset and eval-lm == validation (test 4 of issue 2), in-process through fairseq's own
parsers, registries, SequenceScorer and eval_lm function."""

import numpy as np
import pytest
import torch

from helpers import build_from_cli_args, validation_loss
from rmt_fairseq.data.streams import StreamDataset


def test_streams_score_every_token_once_across_segment_boundaries():
    tokens = np.arange(1000, dtype=np.int64)
    ds = StreamDataset(tokens, streams_per_shard=3, seg_len=7, segments_per_batch=2, split="train")
    srcs = [ds.collater([i])["net_input"]["src_tokens"] for i in range(len(ds))]
    tgts = [ds.collater([i])["target"] for i in range(len(ds))]
    src, tgt = torch.cat(srcs, 1), torch.cat(tgts, 1)
    n = (1000 - 1) // 3
    assert src.shape == (3, n)
    assert torch.equal(tgt, src + 1)  # the next token, also for the last token of every segment
    assert torch.equal(src[1], torch.arange(n, 2 * n))  # contiguous streams
    assert ds.collater([0])["net_input"]["reset"].all() and not ds.collater([1])["net_input"]["reset"].any()


def test_streams_are_sharded_by_rank():
    tokens = np.arange(1001, dtype=np.int64)
    shards = [StreamDataset(tokens, 2, 5, 1, "train", shard_id=r, num_shards=2) for r in range(2)]
    firsts = [s.collater([0])["net_input"]["src_tokens"][:, 0].tolist() for s in shards]
    assert firsts == [[0, 250], [500, 750]]


ARGS = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion", "rmt_cross_entropy",
        "--tokens-per-sample", 8, "--batch-size", 4, "--cpu", "--decoder-embed-dim", 32]


@pytest.mark.parametrize("extra", [[], ["--mem-len", 8], ["--mem-len", 8, "--mem-tokens", 0],
                                   ["--bptt-mode", "sliding", "--bptt-unroll", 2],
                                   ["--adaptive-softmax-cutoff", "8,16", "--adaptive-input", "--tie-adaptive-weights",
                                    "--tie-adaptive-proj", "--adaptive-softmax-factor", 2,
                                    "--adaptive-input-factor", 2]],
                         ids=["rmt", "rmt+xl", "xl", "sliding", "adaptive"])
def test_eval_lm_equals_validation_and_passes_agree(recall_data, extra):
    from fairseq_cli.eval_lm import eval_lm

    cfg, task, model, criterion = build_from_cli_args([recall_data, *ARGS, *extra])
    model.eval()
    v1 = validation_loss(task, model, criterion)
    v2 = validation_loss(task, model, criterion)
    assert v1 == pytest.approx(v2, abs=1e-7)  # reset at every pass: two passes agree

    itr = task.eval_lm_dataloader(task.dataset("valid"), batch_size=4, num_workers=0)
    res = {k: float(v) for k, v in eval_lm([model], task.source_dictionary, itr).items()}
    assert res["loss"] == pytest.approx(v1, abs=1e-4)
    itr = task.eval_lm_dataloader(task.dataset("valid"), batch_size=4, num_workers=0)
    assert float(eval_lm([model], task.source_dictionary, itr)["loss"]) == pytest.approx(res["loss"], abs=1e-7)

    # and memory really is carried: scoring every segment from fresh memory gives a different loss
    if "--mem-tokens" not in extra:
        fresh = []
        for sample in task.get_batch_iterator(task.dataset("valid")).next_epoch_itr(shuffle=False):
            sample["batch_index"] = 0  # pretend every batch starts a pass
            loss, n, _ = task.valid_step(sample, model, criterion)
            fresh.append((loss.item(), n))
        assert abs(sum(a for a, _ in fresh) / sum(b for _, b in fresh) / np.log(2) - v1) > 1e-4


def test_training_state_is_saved_and_restored():
    from rmt_fairseq.modules.recurrence import RecurrentState, WindowEntry

    st = RecurrentState(memory=torch.randn(2, 3, 4), cache=[torch.randn(2, 5, 4)],
                        window=[WindowEntry(torch.ones(2, 8, dtype=torch.long), None, None)], segments_seen=7)
    buf = __import__("io").BytesIO()
    torch.save(st.state_dict(), buf)
    buf.seek(0)
    st2 = RecurrentState()
    st2.load_state_dict(torch.load(buf, weights_only=True))  # loadable under torch's safe default
    assert torch.equal(st2.memory, st.memory) and torch.equal(st2.cache[0], st.cache[0])
    assert st2.segments_seen == 7 and st2.window[0].memory is None


@pytest.mark.parametrize("interval", [None, 3])
def test_memory_reset_interval_restarts_training_and_validation_streams_alike(recall_data, interval):
    """--memory-reset-interval N: once N segments have run since the last reset, the model's forward starts the
    streams afresh, for training (2 segments a batch here: 2, 4, fresh, 2, 4, ...) and validation (1 a batch: 1, 2,
    3, fresh, ...) alike; without it neither restarts mid-pass."""
    from helpers import build_from_cli_args

    flags = [] if interval is None else ["--memory-reset-interval", interval]
    cfg, task, model, criterion = build_from_cli_args([
        recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_tiny", "--criterion",
        "rmt_cross_entropy", "--tokens-per-sample", 8, "--batch-size", 2, "--bptt-unroll", 1, "--cpu", *flags])
    for mode, split in (("train", "train"), ("valid", "valid")):
        task.load_dataset(split)
        seen = []
        for i, sample in enumerate(task.get_batch_iterator(task.dataset(split)).next_epoch_itr(shuffle=False)):
            if i == 7:
                break
            task.run_step(mode, sample, lambda: criterion(model, sample))
            seen.append(task.states[(mode, split)].segments_seen)
        per = 2 if mode == "train" else 1  # training: 2 segments a batch (--bptt-unroll 1, block); validation: 1
        if interval is None:
            assert seen == [per * (i + 1) for i in range(7)]
        else:
            assert seen == ([2, 4, 2, 4, 2, 4, 2] if mode == "train" else [1, 2, 3, 1, 2, 3, 1]), seen


def test_a_loaded_model_restarts_where_it_was_trained_unless_told_otherwise(recall_data, tmp_path):
    """The interval travels in the model's config (trained_memory_reset_interval): a model built from it restarts
    its streams there in every forward (fairseq-eval-lm's StreamStates included); --memory-reset-interval at
    evaluation overrides it (0: never)."""
    from helpers import build_from_cli_args
    from rmt_fairseq.models.recurrent_lm import StreamStates

    base = [recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "armt_tiny", "--criterion",
            "rmt_cross_entropy", "--tokens-per-sample", 8, "--batch-size", 2, "--bptt-unroll", 1, "--cpu"]
    _, _, trained, _ = build_from_cli_args(base + ["--memory-reset-interval", 3])
    assert trained.trained_with["trained_memory_reset_interval"] == 3
    for eval_flags, expect in (([], [1, 2, 3, 1, 2]), (["--memory-reset-interval", 0], [1, 2, 3, 4, 5]),
                               (["--memory-reset-interval", 2], [1, 2, 1, 2, 1])):
        _, _, model, _ = build_from_cli_args(base + ["--trained-memory-reset-interval", 3] + eval_flags)
        assert model.memory_reset_interval == (expect.index(1, 1) if 1 in expect[1:] else None)
        streams, seen = StreamStates(), []
        x = torch.randint(4, 20, (2, 8))
        for _ in range(5):
            model(x, rmt_state=streams)
            seen.append(streams.for_model(model).segments_seen)
        assert seen == expect, (eval_flags, seen)


@pytest.mark.parametrize("arch,flags,interval", [
    ("armt_tiny", [], 16), ("armt_tiny", ["--memory-reset-interval", 0], None),
    ("armt_tiny", ["--memory-reset-interval", 5], 5), ("rmt_tiny", [], None)])
def test_armt_training_streams_restart_their_memory_by_default(recall_data, arch, flags, interval):
    """ARMT's associative matrix grows without bound on never-reset streams (issue 29): --task rmt_lm restarts an
    ARMT model's training streams every 16 segments unless --memory-reset-interval says otherwise (0: never); the
    run's summary line says so."""
    from helpers import build_from_cli_args

    cfg, task, model, criterion = build_from_cli_args([
        recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--arch", arch, "--criterion",
        "rmt_cross_entropy", "--tokens-per-sample", 8, "--batch-size", 2, "--bptt-unroll", 1, "--cpu", *flags])
    assert model.memory_reset_interval == interval
    assert model.trained_with["trained_memory_reset_interval"] == (interval or 0)
    summary = task.run_summary(model)
    assert (f"restart their memory every {interval} segments" in summary) == (interval is not None), summary
    assert ("ARMT default" in summary) == (interval == 16)
