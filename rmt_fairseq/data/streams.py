"""A split's token stream cut into parallel contiguous streams, served one batch of segments at a time.

Legend: N tokens in the split, G = B x num_shards streams in all, B streams per data-parallel rank, n tokens
per stream, T segment length, S segments per batch.

Every token is scored: the flat stream is shifted by one (source = tokens[:-1], target = tokens[1:]) before it
is cut, so the target of a segment's last token is the first token of the next segment (fairseq's
truncated_bptt example pads that target away). Not scored: the split's first token (context only) and the
(N - 1) mod G tokens of the tail that do not fill a stream (logged when there are any). Item i of the dataset is
the whole batch i: B x (S*T) (the last may be shorter).
"""

import logging
import math
from typing import Dict

import numpy as np
import torch
from fairseq.data import FairseqDataset

from rmt_fairseq.errors import RMTConfigError

logger = logging.getLogger(__name__)


def flatten_indexed_dataset(data) -> np.ndarray:
    """All tokens of a fairseq indexed dataset, in order, as one 1-D array (a view of the mmap if possible)."""
    buf = getattr(data, "_bin_buffer", None)
    index = getattr(data, "_index", None)
    if buf is not None and index is not None:  # MMapIndexedDataset: the .bin file *is* the flat stream
        return np.frombuffer(buf, dtype=index.dtype)
    return np.concatenate([np.asarray(data[i]) for i in range(len(data))]) if len(data) else np.zeros(0, np.int64)


class StreamDataset(FairseqDataset):
    def __init__(
        self,
        tokens: np.ndarray,  # N
        streams_per_shard: int,
        seg_len: int,
        segments_per_batch: int,
        split: str,
        shard_id: int = 0,
        num_shards: int = 1,
        owner=None,
    ):
        super().__init__()
        # the indexed dataset whose mmap `tokens` may view: it closes the mmap when collected, so keep it alive
        self._owner = owner
        G = streams_per_shard * num_shards
        n = (len(tokens) - 1) // G
        if n < seg_len:
            raise RMTConfigError(
                f"split '{split}' has {len(tokens)} tokens: too few for {G} streams (--batch-size "
                f"{streams_per_shard} x {num_shards} ranks) of at least one --tokens-per-sample {seg_len} "
                f"segment each; lower --batch-size or --tokens-per-sample"
            )
        left = len(tokens) - 1 - G * n  # (N - 1) mod G
        if left:
            logger.info(f"{split}: scoring {G * n} of {len(tokens)} tokens: the first is context only and the last "
                        f"{left} do not fill the {G} streams; one stream (--batch-size 1, one process) scores all "
                        f"but the first")
        self.split, self.seg_len, self.segments_per_batch = split, seg_len, segments_per_batch
        self.stream_len = n
        rows = slice(shard_id * streams_per_shard, (shard_id + 1) * streams_per_shard)
        self.src = tokens[: G * n].reshape(G, n)[rows]  # B x n (a view, no copy)
        self.tgt = tokens[1 : G * n + 1].reshape(G, n)[rows]  # B x n, shifted by one
        self.block = seg_len * segments_per_batch
        self.sizes = np.full(len(self), self.block)

    def __len__(self) -> int:
        return math.ceil(self.stream_len / self.block)

    def __getitem__(self, i: int) -> int:
        return i

    def num_tokens(self, index: int) -> int:
        return self.block

    def size(self, index: int) -> int:
        return self.block

    def collater(self, items) -> Dict:
        assert len(items) == 1, "every item is a whole batch"
        i = items[0]
        cols = slice(i * self.block, (i + 1) * self.block)
        src = torch.from_numpy(np.ascontiguousarray(self.src[:, cols]).astype(np.int64))  # B x S*T
        tgt = torch.from_numpy(np.ascontiguousarray(self.tgt[:, cols]).astype(np.int64))  # B x S*T
        B = src.size(0)
        return {
            "id": torch.arange(B) + i * B,
            "net_input": {
                "src_tokens": src,
                "src_lengths": torch.full((B,), src.size(1), dtype=torch.long),
                # the first batch of a pass restarts every stream: recurrent state is reset there
                "reset": torch.full((B,), i == 0, dtype=torch.bool),
                "segment_len": self.seg_len,
            },
            "target": tgt,
            "nsentences": B,
            "ntokens": tgt.numel(),
            "split": self.split,
            "batch_index": i,
        }
