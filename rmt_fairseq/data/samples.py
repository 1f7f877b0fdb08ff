"""Independent samples "source <gen> target" for --task rmt_algorithmic, split into equal segments.

Legend: B samples, L tokens per sample (padded to S*T), S segments, T segment length.

Targets before <gen> (and the closing </s>) are set to pad, so neither loss nor accuracy counts them: the
model reads the source and must produce everything after <gen> (paper §4, "we don't compute loss over the
input sequence before the start-to-generate token").
"""

import math

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils

from rmt_fairseq.errors import RMTConfigError


class SegmentedSampleDataset(FairseqDataset):
    def __init__(self, data, gen_idx: int, pad: int, eos: int, split: str, num_segments: int = 1,
                 seg_len=None):
        super().__init__()
        self.data, self.gen_idx, self.pad, self.eos, self.split = data, gen_idx, pad, eos, split
        self.num_segments, self.seg_len = num_segments, seg_len
        self.sizes = np.asarray(data.sizes)

    def __getitem__(self, index):
        tokens = self.data[index]
        hits = (tokens == self.gen_idx).nonzero()
        if len(hits) != 1:
            raise RMTConfigError(f"sample {index} of split '{self.split}' has {len(hits)} start-to-generate tokens "
                                 f"(need exactly one): was it written by rmt-data?")
        return {"id": index, "tokens": tokens, "gen": int(hits[0])}

    def __len__(self):
        return len(self.data)

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        return np.arange(len(self))

    def segment_layout(self, length: int):
        """(S, T) for an input of `length` tokens: --num-segments equal segments, or segments of T tokens."""
        if self.seg_len:
            return math.ceil(length / self.seg_len), self.seg_len
        return self.num_segments, math.ceil(length / self.num_segments)

    def collater(self, samples):
        if not samples:
            return {}
        tokens = data_utils.collate_tokens([s["tokens"] for s in samples], self.pad)  # B x (L+1)
        src, tgt = tokens[:, :-1], tokens[:, 1:].clone()  # B x L
        gen = torch.tensor([s["gen"] for s in samples])  # B
        pos = torch.arange(src.size(1))[None, :]
        scored = (pos >= gen[:, None]) & tgt.ne(self.eos) & tgt.ne(self.pad)  # only what follows <gen>
        answer = tgt.clone()
        tgt[~scored] = self.pad
        sample = {
            "id": torch.tensor([s["id"] for s in samples]),
            "net_input": {"src_tokens": src, "src_lengths": torch.full((src.size(0),), src.size(1))},
            "target": tgt,  # B x S*T, pad outside the answer
            "answer": answer,  # B x S*T, the unmasked next tokens (for greedy decoding's reference)
            "gen": gen,
            "length": src.size(1),
            "nsentences": len(samples),
            "ntokens": int(scored.sum()),
            "split": self.split,
        }
        return self.apply_layout(sample)

    def apply_layout(self, sample):
        """Split the batch into the current number of equal segments (pad the end; nothing padded is scored).
        Called again at step time, because batches are collated ahead (prefetching) and the curriculum may
        have changed the number of segments since."""
        L = sample["length"]
        S, T = self.segment_layout(L)
        extra = S * T - L

        def fit(x):
            return torch.nn.functional.pad(x[:, :L], (0, extra), value=self.pad) if extra else x[:, :L]

        sample["net_input"]["src_tokens"] = fit(sample["net_input"]["src_tokens"])
        sample["target"], sample["answer"] = fit(sample["target"]), fit(sample["answer"])
        sample["net_input"]["segment_len"], sample["num_segments"] = T, S
        return sample
