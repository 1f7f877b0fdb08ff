"""Transformer-XL relative multi-head attention (Dai et al. 2019, §3.3) and the decoder layer built on it.

Legend: B batch, N query positions (M + T + M for RMT), K key positions (L + N with an XL cache of L),
C model dim, H heads, D head dim, P number of distinct relative distances.

Score(i, j) = (q_i + u) . k_j  +  (q_i + v) . W_r R_{i-j}        (terms (a)+(c) and (b)+(d) of XL eq. 4)

R is the sinusoid table of relative distances. Unlike the original code, which builds R for non-negative
distances only and relies on the "rel-shift" trick, we look the distance table up with an explicit index, so
negative distances (write memory attending to later write memory, paper Fig 6d) get a real embedding instead
of a value the shift trick leaves undefined. The (b)+(d) term is passed to scaled_dot_product_attention as an
additive bias together with the mask, so the attention itself runs through PyTorch's fused kernels.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def sinusoid_table(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """distances: P (float) -> P x C sinusoidal embeddings, as Transformer-XL's PositionalEmbedding."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, dim, 2.0, device=distances.device) / dim))
    angles = distances[:, None] * inv_freq[None, :]  # P x C/2
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # P x C


class RelativeMultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, attention_dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(embed_dim, 3 * inner, bias=False)
        self.r_proj = nn.Linear(embed_dim, inner, bias=False)  # W_{k,R} in XL eq. 4
        self.out_proj = nn.Linear(inner, embed_dim, bias=False)
        self.attention_dropout = attention_dropout
        self.scale = 1.0 / math.sqrt(head_dim)
        self.keep_attention = False  # set by the attention-plot tool to record weights
        self.last_attention: Optional[torch.Tensor] = None

    def project_kv(self, x: torch.Tensor):
        """B x n x C -> keys, values B x H x n x D (for the XL cache and incremental decoding)."""
        _, k, val = self.qkv(x).chunk(3, dim=-1)  # B x n x H*D (queries unused)
        return self._heads(k), self._heads(val)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, n, _ = t.shape
        return t.view(B, n, self.num_heads, self.head_dim).transpose(1, 2)  # B x H x n x D

    def forward(
        self,
        x: torch.Tensor,  # B x N x C (G x B x N x C with stacked weights)
        cache: Optional[torch.Tensor],  # B x L x C (detached XL cache) or None
        pos_emb: torch.Tensor,  # P x C, sinusoids of the distances dmax, dmax-1, ..., dmin
        rel_index: torch.Tensor,  # N x K long, index into pos_emb of distance (i - j)
        mask_bias: torch.Tensor,  # N x K float, 0 where visible, -inf where masked
        u: torch.Tensor,  # H x D content bias
        v: torch.Tensor,  # H x D position bias
        past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,  # keys, values B x H x K' x D before x
        ops: "Optional[StackedLayers]" = None,  # the weights of G layers (the diagonal schedule), or this module's
    ) -> torch.Tensor:
        lead, N = x.shape[:-2], x.size(-2)  # (B,), or (G, B) with stacked weights
        H, D = self.num_heads, self.head_dim
        linear = ops.linear if ops is not None else (lambda name, t: self.get_submodule(name)(t))

        def heads(t):  # ... x n x H*D -> (prod ...) x H x n x D
            return t.reshape(-1, t.size(-2), H, D).transpose(1, 2)

        q, k, val = (heads(t) for t in linear("qkv", x).chunk(3, dim=-1))  # each (prod lead) x H x N x D
        if cache is not None and cache.size(-2) > 0:
            _, ck, cv = (heads(t) for t in linear("qkv", cache).chunk(3, dim=-1))  # (prod lead) x H x L x D
            k, val = torch.cat([ck, k], dim=2), torch.cat([cv, val], dim=2)  # ... x H x K x D
        if past is not None:
            k, val = torch.cat([past[0], k], dim=2), torch.cat([past[1], val], dim=2)  # B x H x K x D
        Kn = k.size(2)
        r = linear("r_proj", pos_emb.expand(*lead[:-1], *pos_emb.shape)).view(*lead[:-1], -1, H, D)  # ... P x H x D

        # position term (b)+(d): (q + v) . r_{i-j}, computed for every distance once, then gathered.
        qv = (q + v[None, :, None, :]).view(*lead, H, N, D)
        bd = torch.einsum("...bhnd,...phd->...bhnp", qv, r)  # ... x B x H x N x P
        bd = bd.gather(-1, rel_index.expand(*lead, H, N, Kn))  # ... x B x H x N x K
        bias = (bd * self.scale + mask_bias).reshape(-1, H, N, Kn)  # (prod lead) x H x N x K
        if self.keep_attention:  # explicit softmax, for plots (cli/plot_attention.py); same result
            probs = torch.softmax(torch.einsum("bhnd,bhkd->bhnk", q + u[None, :, None, :], k) * self.scale + bias,
                                  dim=-1)  # B x H x N x K
            self.last_attention = probs.detach()
            out = torch.einsum("bhnk,bhkd->bhnd", probs, val)  # B x H x N x D
        else:
            out = F.scaled_dot_product_attention(
                q + u[None, :, None, :],
                k,
                val,
                attn_mask=bias.to(q.dtype),
                dropout_p=self.attention_dropout if self.training else 0.0,
                scale=self.scale,
            )  # (prod lead) x H x N x D
        return linear("out_proj", out.transpose(1, 2).reshape(*lead, N, H * D))  # ... x N x C


class PositionBias(nn.Module):
    """XL's content and position biases u, v (r_w_bias, r_r_bias), shared by all layers (untie_r=False).
    Read through a module call that returns copies, so ZeRO-3 gathers them like any other parameter."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.u = nn.Parameter(torch.zeros(num_heads, head_dim))  # H x D
        self.v = nn.Parameter(torch.zeros(num_heads, head_dim))  # H x D

    def forward(self):
        return self.u.clone(), self.v.clone()


class RelativeDecoderLayer(nn.Module):
    """Post-norm Transformer-XL layer (the XL default): x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, embed_dim, num_heads, head_dim, ffn_dim, dropout, attention_dropout, activation_dropout):
        super().__init__()
        self.attn = RelativeMultiheadAttention(embed_dim, num_heads, head_dim, attention_dropout)
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dim, ffn_dim),
            nn.ReLU(),
            nn.Dropout(activation_dropout),
            nn.Linear(ffn_dim, embed_dim),
        )
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cache, pos_emb, rel_index, mask_bias, u, v, past=None, ops=None):
        """x B x N x C (with `ops`, StackedLayers: G x B x N x C through G layers shaped like this one, each with its
        own weights; cache G x B x L x C) -> the same shape. The one implementation of the layer: the sequential
        forward, generation's steps and the diagonal schedule all run it."""
        linear = ops.linear if ops is not None else (lambda name, t: self.get_submodule(name)(t))
        norm = ops.norm if ops is not None else (lambda name, t: self.get_submodule(name)(t))
        attn_ops = ops.within("attn") if ops is not None else None
        x = norm("attn_norm", x + self.dropout(self.attn(x, cache, pos_emb, rel_index, mask_bias, u, v, past,
                                                         ops=attn_ops)))
        f = linear("ffn.3", self.ffn[2](self.ffn[1](linear("ffn.0", x))))  # Linear, ReLU, Dropout, Linear
        return norm("ffn_norm", x + self.dropout(f))


class StackedLayers:
    """The weights of G layers shaped like one module (recurrence.stack_layers: G x the parameter's shape, under the
    module's parameter names) as the operations its forward calls: `linear(name, x)` (x G x ... x C_in, each layer's
    rows times its own weight: one bmm / baddbmm, which rounds as F.linear's mm / addmm on one layer's rows) and
    `norm(name, x)` (LayerNorm, one fused call per layer, as the module's own). For the diagonal schedule."""

    def __init__(self, template: nn.Module, weights, prefix: str = ""):
        self.template, self.w, self.prefix = template, weights, prefix

    def within(self, name: str) -> "StackedLayers":
        return StackedLayers(self.template.get_submodule(name), self.w, self.prefix + name + ".")

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w, b = self.w[self.prefix + name + ".weight"], self.w.get(self.prefix + name + ".bias")
        G = w.size(0)
        flat = x.reshape(G, -1, x.size(-1))
        y = torch.bmm(flat, w.transpose(-1, -2)) if b is None else torch.baddbmm(b.unsqueeze(1), flat,
                                                                                    w.transpose(-1, -2))
        return y.view(*x.shape[:-1], y.size(-1))

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w, b = self.w[self.prefix + name + ".weight"], self.w[self.prefix + name + ".bias"]
        eps, shape = self.template.get_submodule(name).eps, (x.size(-1),)
        return torch.stack([F.layer_norm(x[g], shape, w[g], b[g], eps) for g in range(w.size(0))])
