"""Which tokens of a split the streams score (issue 16, item 4): all but the first and the (N - 1) mod G of the
tail that fill no stream, as the INFO line says."""

import logging

import numpy as np
import pytest
import torch

from rmt_fairseq.data.streams import StreamDataset


def _targets(shards):
    return torch.cat([torch.cat([ds.collater([i])["target"] for i in range(len(ds))], 1).flatten() for ds in shards])


@pytest.mark.parametrize("streams,shards", [(16, 1), (8, 2)], ids=["one process", "two ranks"])
def test_the_tail_that_fills_no_stream_is_named(caplog, streams, shards):
    tokens = np.arange(772, dtype=np.int64)  # N = 772: 771 targets, 771 mod 16 = 3 left over
    with caplog.at_level(logging.INFO, logger="rmt_fairseq.data.streams"):
        parts = [StreamDataset(tokens, streams, 8, 1, "valid", shard_id=r, num_shards=shards) for r in range(shards)]
    scored = _targets(parts)
    assert sorted(scored.tolist()) == list(range(1, 769))  # each target once: tokens 1 .. 768
    assert ("valid: scoring 768 of 772 tokens: the first is context only and the last 3 do not fill the 16 streams"
            in caplog.text)


def test_one_stream_scores_all_but_the_first_and_logs_nothing(caplog):
    tokens = np.arange(772, dtype=np.int64)
    with caplog.at_level(logging.INFO, logger="rmt_fairseq.data.streams"):
        ds = StreamDataset(tokens, 1, 8, 1, "valid")
    assert _targets([ds]).tolist() == list(range(1, 772))
    assert "scoring" not in caplog.text
