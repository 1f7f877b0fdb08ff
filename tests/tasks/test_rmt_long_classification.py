"""--task rmt_long_classification: memory carries a fact to a later segment, the shared curriculum, errors."""

import pytest
import torch

from helpers import build_from_cli_args, cli
from rmt_fairseq.errors import RMTConfigError

ARGS = ["--user-dir", "user_dir", "--task", "rmt_long_classification", "--arch", "rmt_encoder_tiny", "--criterion",
        "rmt_classification", "--batch-size", 32, "--cpu", "--seed", 1]


def _data(tmp_path, kind="fact_memorization", *extra):
    out = tmp_path / "data"
    cli("rmt-data", "memorization", kind, "--out", out, "--train-size", 4000, "--valid-size", 200,
        "--test-size", 200, *extra)
    return str(out)


def _train_and_score(data, mem_tokens, steps=300):
    """A short in-process training on 2-segment documents; validation accuracy."""
    torch.manual_seed(0)
    _, task, model, criterion = build_from_cli_args([data, *ARGS, "--tokens-per-sample", 16, "--num-segments", 2,
                                                     "--mem-tokens", mem_tokens])
    task.load_dataset("train")
    task.load_dataset("valid")
    ds, opt = task.dataset("train"), torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = ds.collater([ds[i] for i in torch.randint(len(ds), (32,), generator=g).tolist()])
        loss, n, _ = criterion(model, batch)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    model.eval()
    vd, correct = task.dataset("valid"), 0
    with torch.no_grad():
        for i in range(0, len(vd), 50):
            correct += criterion(model, vd.collater([vd[j] for j in range(i, i + 50)]))[2]["ncorrect"]
    return correct / len(vd), task


def test_memory_carries_the_fact_to_the_question_segment(tmp_path):
    """The fact is in segment 1, the question in segment 2: above chance with memory, at chance without."""
    data = _data(tmp_path)
    acc_mem, task = _train_and_score(data, 4)
    ds, T = task.dataset("valid"), 16
    for i in range(20):  # the setting is what the test claims: fact only in segment 1, question only in 2
        doc = ds.document(i)
        (fact_pos, fact), (q_pos, q) = doc.inserts
        assert fact_pos + len(fact) <= T and q_pos >= T and doc.length == 2 * T
    acc_none, _ = _train_and_score(data, 0)
    chance = 1 / 6
    assert acc_mem > 0.6, acc_mem
    assert acc_none < chance + 0.12, acc_none  # 200 documents: 0.12 is > 4 standard deviations


def test_curriculum_is_the_shared_one_and_grows_generated_documents(tmp_path):
    data = _data(tmp_path)
    _, task, model, criterion = build_from_cli_args([data, *ARGS, "--tokens-per-sample", 16, "--num-segments", 1,
                                                     "--segment-curriculum", "--max-num-segments", 3,
                                                     "--curriculum-threshold", 50])
    from rmt_fairseq.tasks.curriculum import SegmentCurriculum
    from rmt_fairseq.tasks.rmt_algorithmic import RMTAlgorithmicTask

    assert isinstance(task, SegmentCurriculum) and issubclass(RMTAlgorithmicTask, SegmentCurriculum)
    task.load_dataset("train")
    assert len(task.dataset("train")[0]["tokens"]) == 16
    task.begin_valid_epoch(1, model)
    task.count_valid(40, 100)  # below the threshold: stays
    task.advance_curriculum()
    assert task.num_segments == 1
    task.begin_valid_epoch(1, model)
    task.count_valid(60, 100)
    task.advance_curriculum()
    assert task.num_segments == 2 and len(task.dataset("train")[0]["tokens"]) == 32
    assert task.get_checkpoint_dict() == {"RMTLongClassificationTask": {"num_segments": 2}}
    task.set_checkpoint_dict({"num_segments": 3})
    assert len(task.dataset("train")[0]["tokens"]) == 48


def test_too_short_documents_name_the_flags(tmp_path):
    data = _data(tmp_path, "reasoning")
    with pytest.raises(RMTConfigError, match="--num-segments 1 x --tokens-per-sample 16"):
        build_from_cli_args([data, *ARGS, "--tokens-per-sample", 16])


def test_raw_text_without_dict_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "train.tsv").write_text("a\tx y\nb\ty z\n")
    with pytest.raises(RMTConfigError, match="dict.txt does not exist: write one with `rmt-data classification-dict"):
        build_from_cli_args([str(tmp_path), *ARGS])


def test_segment_too_long_for_positions_names_the_flags(tmp_path):
    data = _data(tmp_path)
    with pytest.raises(RMTConfigError, match="--tokens-per-sample 200 .* --max-positions is 128"):
        build_from_cli_args([data, *ARGS, "--tokens-per-sample", 200])


def test_every_document_is_batched_whatever_the_batch_size(tmp_path):
    """fairseq's batch_by_size with its default --required-batch-size-multiple 8 drops documents (3 in batches of
    4 -> none, 201 in batches of 32 -> 200); the task batches every one."""
    data = _data(tmp_path)
    _, task, _, _ = build_from_cli_args([data, *ARGS, "--tokens-per-sample", 16])
    task.load_dataset("valid")
    for bs in (4, 32, 7):
        # as fairseq-train and fairseq-validate call it (their default --required-batch-size-multiple)
        itr = task.get_batch_iterator(task.dataset("valid"), max_sentences=bs, required_batch_size_multiple=8)
        itr = itr.next_epoch_itr(shuffle=False)
        ids = sorted(i for batch in itr for i in batch["id"].tolist())
        assert ids == list(range(200)), bs
