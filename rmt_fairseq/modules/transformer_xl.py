"""Transformer-XL's adaptive input and softmax, and its initialisation (Dai et al. 2019; kimiyoung/transformer-xl
pytorch/mem_transformer.py `AdaptiveEmbedding`, utils/proj_adaptive_softmax.py `ProjectedAdaptiveLogSoftmax`,
train.py `weights_init`; the same files in the RMT authors' booydar/LM-RMT).

Legend: B batch, T tokens, C model dim (XL's d_proj = d_model), E embedding dim (XL's d_embed, here C), V
vocabulary, n rows of a band, K clusters (cutoffs).

Bands: the vocabulary is cut at the cutoffs into K + 1 bands; band i has dimension E_i = E // div_val^i (E for
every band when div_val is 1). A band has a projection between E_i and C when div_val > 1 or E_i != C (XL's rule;
Transformer-XL base on WikiText-103 has div_val 1 and E = C, so none). The softmax's head scores the first band's
words and one logit per cluster; tail i scores band i's words; every output layer has a bias. With no cutoffs it
is one softmax over V with a bias (XL's enwik8 model).

Two deliberate differences, neither of which changes the function computed:
  - XL keeps one embedding matrix when div_val is 1 and slices it per band; here every band has its own matrix
    (the same values, the same initialisation distribution), so that every band is a module that ZeRO-3 gathers
    when it is called and data-parallel reducers see the same parameters on every rank;
  - every band runs on every call, on zero rows when no token of the batch falls into it (XL skips it), as
    modules/adaptive.py does for fairseq's modules: same values, parameters used identically on every rank.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


def _bands(n_token: int, cutoffs: List[int]):
    ends = [0] + list(cutoffs) + [n_token]
    return list(zip(ends[:-1], ends[1:]))


def _band_dim(embed_dim: int, div_val: int, i: int) -> int:
    return embed_dim if div_val == 1 else embed_dim // (div_val**i)


def _has_proj(embed_dim: int, proj_dim: int, div_val: int) -> bool:
    return div_val != 1 or embed_dim != proj_dim  # XL: a projection for every band when div_val > 1


class TransposedProjection(nn.Module):
    """x (..., C) -> x @ W (..., E_i) for W of shape C x E_i: XL's output projection `F.linear(hidden, proj.t())`,
    possibly sharing W with the input projection (XL's tie_projs)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t())


class XLAdaptiveEmbedding(nn.Module):
    """Transformer-XL's AdaptiveEmbedding without its sqrt(C) scale (the decoder applies it).

    tokens B x T -> B x T x C. div_val 1 and no cutoffs: a plain embedding."""

    def __init__(self, n_token: int, embed_dim: int, proj_dim: int, cutoffs: List[int], div_val: int = 1,
                 padding_idx: Optional[int] = None):
        super().__init__()
        self.bands = _bands(n_token, cutoffs)
        self.proj_dim = proj_dim
        self.padding_idx = padding_idx
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ModuleList()
        for i, (lo, hi) in enumerate(self.bands):
            d = _band_dim(embed_dim, div_val, i)
            pad = padding_idx - lo if padding_idx is not None and lo <= padding_idx < hi else None
            self.emb_layers.append(nn.Embedding(hi - lo, d, padding_idx=pad))
            # XL's emb_projs_i is a C x E_i matrix applied as F.linear(emb, W): a bias-free Linear(E_i, C)
            self.emb_projs.append(nn.Linear(d, proj_dim, bias=False) if _has_proj(embed_dim, proj_dim, div_val)
                                  else nn.Identity())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if len(self.bands) == 1:
            return self.emb_projs[0](self.emb_layers[0](tokens))  # B x T x C
        flat = tokens.reshape(-1)  # BT
        w = self.emb_layers[0].weight
        out = w.new_zeros(flat.size(0), self.proj_dim)  # BT x C
        for (lo, hi), emb, proj in zip(self.bands, self.emb_layers, self.emb_projs):
            idx = ((flat >= lo) & (flat < hi)).nonzero(as_tuple=False).squeeze(1)  # n (may be 0)
            out.index_copy_(0, idx, proj(emb(flat.index_select(0, idx) - lo)).to(out.dtype))  # n x C
        return out.view(*tokens.shape, self.proj_dim)


class XLAdaptiveLogSoftmax(nn.Module):
    """Transformer-XL's ProjectedAdaptiveLogSoftmax (XL's `crit`), with the input embedding's weights tied in
    (`tie_weight`: out_layers[i].weight is emb_layers[i].weight) and projections tied per band (`tie_projs`)."""

    def __init__(self, n_token: int, embed_dim: int, proj_dim: int, cutoffs: List[int], div_val: int = 1,
                 tied_embedding: Optional[XLAdaptiveEmbedding] = None, tie_projs: Optional[List[bool]] = None):
        super().__init__()
        self.n_token = n_token
        self.bands = _bands(n_token, cutoffs)
        self.shortlist = self.bands[0][1]
        self.n_clusters = len(cutoffs)
        tie_projs = tie_projs or [False] * len(self.bands)
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ModuleList()
        for i, (lo, hi) in enumerate(self.bands):
            d = _band_dim(embed_dim, div_val, i)
            layer = nn.Linear(d, hi - lo)  # weight V_i x E_i, bias V_i
            if tied_embedding is not None:
                layer.weight = tied_embedding.emb_layers[i].weight
            self.out_layers.append(layer)
            if not _has_proj(embed_dim, proj_dim, div_val):
                self.out_projs.append(nn.Identity())
            elif tied_embedding is not None and tie_projs[i]:
                self.out_projs.append(TransposedProjection(tied_embedding.emb_projs[i].weight))
            else:
                self.out_projs.append(TransposedProjection(nn.Parameter(torch.empty(proj_dim, d).normal_(0, 0.01))))
        # XL's cluster_weight K x E_0 and cluster_bias K, scored with the head from band 0's projection; band i's
        # cluster logit is the head's column -i (XL's `head_logprob_i[:, -i]`): row K - i, XL's order
        self.cluster = nn.Linear(_band_dim(embed_dim, div_val, 0), self.n_clusters) if self.n_clusters else None

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """x n x C -> head logits n x (shortlist + K)."""
        h = self.out_projs[0](x)  # n x E_0
        logits = self.out_layers[0](h)  # n x shortlist
        return torch.cat([logits, self.cluster(h)], dim=-1) if self.cluster is not None else logits

    def _tail(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.out_layers[i](self.out_projs[i](x))  # n x V_i

    def forward(self, hidden: torch.Tensor, target: torch.Tensor):
        """fairseq's AdaptiveSoftmax.forward interface, for `--criterion adaptive_loss`: hidden B x T x C, target
        B x T -> ([head logits BT x (shortlist + K), tail i logits n_i x V_i or None], [head targets, tail i targets
        or None]), a tail None when no target falls in it (adaptive_loss checks the targets' min/max)."""
        x = hidden.reshape(-1, hidden.size(-1))  # BT x C
        t = target.reshape(-1)  # BT
        head_target = t.clone()
        logits, targets = [self._head(x)], [head_target]
        for i, (lo, hi) in enumerate(self.bands[1:], start=1):
            mask = (t >= lo) & (t < hi)
            head_target[mask] = self.shortlist + self.n_clusters - i
            if mask.any():
                idx = mask.nonzero(as_tuple=False).squeeze(1)  # n_i
                logits.append(self._tail(i, x.index_select(0, idx)))
                targets.append(t.index_select(0, idx) - lo)
            else:
                logits.append(None)
                targets.append(None)
        return logits, targets

    def nll(self, hidden: torch.Tensor, target: torch.Tensor, padding_idx: int) -> torch.Tensor:
        """Summed NLL (nats, fp32) of target B x T given hidden B x T x C; targets equal to padding_idx (in the
        first band) are not scored. Every tail runs (on zero rows when no target falls in it)."""
        x = hidden.reshape(-1, hidden.size(-1))  # BT x C
        t = target.reshape(-1)  # BT
        head_target = t.clone()
        tails = []
        for i, (lo, hi) in enumerate(self.bands[1:], start=1):
            mask = (t >= lo) & (t < hi)
            head_target[mask] = self.shortlist + self.n_clusters - i  # the head scores the cluster (column -i)
            idx = mask.nonzero(as_tuple=False).squeeze(1)  # n
            tails.append((self._tail(i, x.index_select(0, idx)), t.index_select(0, idx) - lo))
        loss = F.cross_entropy(self._head(x).float(), head_target, ignore_index=padding_idx, reduction="sum")
        for logits, tgt in tails:
            loss = loss + F.cross_entropy(logits.float(), tgt, reduction="sum")
        return loss

    def get_log_prob(self, hidden: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden B x T x C -> log-probabilities B x T x V (fp32), as fairseq's AdaptiveSoftmax.get_log_prob
        (fairseq's decoders call it from get_normalized_probs); `target` is not needed."""
        B, T, C = hidden.shape
        x = hidden.reshape(-1, C)
        head = F.log_softmax(self._head(x).float(), dim=-1)  # BT x (shortlist + K)
        parts = [head[:, : self.shortlist]]
        for i in range(1, len(self.bands)):
            parts.append(head[:, self.shortlist + self.n_clusters - i, None]
                         + F.log_softmax(self._tail(i, x).float(), dim=-1))
        return torch.cat(parts, dim=-1).view(B, T, self.n_token)


def projection_weights(module: nn.Module) -> List[nn.Parameter]:
    """The projection matrices between band and model dimension in `module` (XL's emb_projs / out_projs, fairseq's
    AdaptiveInput band projections and AdaptiveSoftmax tail projections): XL draws them from N(0, proj_init_std)."""
    from fairseq.modules import AdaptiveInput, AdaptiveSoftmax

    found = []
    for m in module.modules():
        if isinstance(m, XLAdaptiveEmbedding):
            found += [p.weight for p in m.emb_projs if isinstance(p, nn.Linear)]
        elif isinstance(m, XLAdaptiveLogSoftmax):
            found += [p.weight for p in m.out_projs if isinstance(p, TransposedProjection)]
        elif isinstance(m, AdaptiveInput):
            found += [band[1].weight for band in m.embeddings]
        elif isinstance(m, AdaptiveSoftmax):
            found += [tail[0].weight for tail in m.tail]
    return found


@torch.no_grad()
def init_transformer_xl_(module: nn.Module, init: str = "normal", init_std: float = 0.02, init_range: float = 0.1,
                         proj_init_std: float = 0.01) -> None:
    """Transformer-XL's `weights_init` (train.py) applied to every submodule of `module`, in place:

      Linear and Embedding weights, u / v (`PositionBias`)   N(0, init_std), or U(-init_range, init_range) for
                                                               init "uniform"
      projections (projection_weights)                        N(0, proj_init_std)
      LayerNorm weights                                       N(1, init_std)
      biases (Linear, LayerNorm, cluster)                     0

    Memory tokens keep their N(0, 1) (LM-RMT's `torch.randn`). An embedding's padding row is set to 0 afterwards
    (fairseq's convention; its gradient is always zero)."""
    from rmt_fairseq.modules.relative_attention import PositionBias

    def draw(w):
        if init == "uniform":
            w.uniform_(-init_range, init_range)
        else:
            w.normal_(0.0, init_std)

    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            draw(m.weight)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.normal_(1.0, init_std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, PositionBias):
            draw(m.u)
            draw(m.v)
    for w in projection_weights(module):
        w.normal_(0.0, proj_init_std)
    for m in module.modules():
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()
