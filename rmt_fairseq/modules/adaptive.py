"""fairseq's adaptive input (Baevski & Auli 2019) and adaptive softmax (Grave et al. 2017) with every band run on
every call.

Legend: B batch, T tokens, C model dim, n rows of a band.

fairseq's AdaptiveInput and AdaptiveSoftmax skip a band (a frequency cluster of the vocabulary) that no token
of the batch falls into. Under data parallelism that makes the set of parameters a step uses depend on the data
of each rank: DistributedDataParallel's reducer waits for gradients one rank never produces, ZeRO-1/2 reduce
gradient buckets that hold different tensors on different ranks, and ZeRO-3 gathers a band's weights on one
rank only ("Received data size doesn't match expected size" in gloo). Here an unused band runs on zero rows:
its weights join the graph on every rank and get an exact zero gradient, the computed values are unchanged.
"""

from typing import List

import torch
import torch.nn.functional as F
from fairseq.modules import AdaptiveInput, AdaptiveSoftmax


class DenseAdaptiveInput(AdaptiveInput):
    """AdaptiveInput whose forward runs every band (an unused one on zero rows). Same parameters and names."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input B x T (token ids) -> B x T x C."""
        result = self._float_tensor.new(input.shape + (self.embedding_dim,)).zero_()  # B x T x C
        for i in range(len(self.cutoff)):
            mask = input.lt(self.cutoff[i])
            if i > 0:
                mask.mul_(input.ge(self.cutoff[i - 1]))
                chunk_input = input[mask] - self.cutoff[i - 1]  # n
            else:
                chunk_input = input[mask]  # n
            result[mask] = self.embeddings[i](chunk_input).type_as(result)  # n x C (n may be 0)
        return result


def make_dense(module: AdaptiveInput) -> AdaptiveInput:
    """Turn a built fairseq AdaptiveInput (e.g. from transformer_lm's build) into a DenseAdaptiveInput in place."""
    if isinstance(module, AdaptiveInput) and not isinstance(module, DenseAdaptiveInput):
        module.__class__ = DenseAdaptiveInput
    return module


def adaptive_softmax_nll(asm: AdaptiveSoftmax, hidden: torch.Tensor, target: torch.Tensor,
                         padding_idx: int) -> torch.Tensor:
    """Summed NLL (nats, fp32) of target B x T under fairseq's AdaptiveSoftmax, given hidden B x T x C.

    As fairseq's AdaptiveSoftmax.forward + adaptive_loss, with two differences: every tail runs (on zero rows
    when no target falls in it; see the module docstring), and ignore_index=pad applies to the head only
    (adaptive_loss passes it to the tails too, where targets are shifted by the cutoff, so the word at
    cutoff + pad of every tail is never scored)."""
    x = asm.dropout_module(hidden.contiguous().view(-1, hidden.size(-1)))  # BT x C
    t = target.reshape(-1)  # BT
    cutoff: List[int] = asm.cutoff
    head_target = t.clone()
    tails = []
    for i in range(len(cutoff) - 1):
        mask = t.ge(cutoff[i]) & t.lt(cutoff[i + 1])
        head_target[mask] = cutoff[0] + i  # the head predicts the cluster
        idx = mask.nonzero(as_tuple=False).squeeze(1)  # n
        tails.append((asm.tail[i](x.index_select(0, idx)), t.index_select(0, idx) - cutoff[i]))  # n x V_i, n
    loss = F.cross_entropy(asm.head(x).float(), head_target, ignore_index=padding_idx, reduction="sum")
    for logits, tgt in tails:
        loss = loss + F.cross_entropy(logits.float(), tgt, reduction="sum")  # 0 with a zero gradient when n = 0
    return loss
