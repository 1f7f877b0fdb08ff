"""Memory tokens, the [read | segment | write] layout and its attention mask (RMT paper §3.2, Fig 6d).

Legend: B batch, T segment tokens, M memory tokens, L XL-cache length, C model dim, N = M + T + Mw query
positions, K = L + N key positions, P distinct relative distances.

Mask (rows = queries, cols = keys; "all" = the whole block is visible):

                    cache (L) | read mem (M) | segment (T) | write mem (Mw)
    read mem  (M)       -     |     all      |      -      |      -
    segment   (T)      all    |     all      |   causal    |      -
    write mem (Mw)     all    |     all      |     all     |     all

Write memory sees the whole segment, so the memory handed to the next segment summarises it; segment tokens
never see write memory (it has seen their future). Read memory sees only itself: it is the previous
segment's summary and must not change with this segment's tokens. In the MT layout (the paper's "MT"
ablation) there is no write block (Mw = 0) and no recurrence.

The cache columns of the memory rows follow LM-RMT's one switch `--read_mem_from_cache` (mem_transformer.py,
`dec_attn_mask[:M, :mlen]` and `[-M:, :mlen]`): off (its default), neither read nor write memory sees the cache;
on, both do. (Checkpoints written before the switch existed keep their rule: write memory sees the cache, read
memory does not; Layout.mem_cache "write".)

Transformer-XL's evaluation options (Dai et al. 2019; kimiyoung/transformer-xl `--same_length`, `--clamp_len`):
  same length (window W > 0)  segment token t attends the W token positions ending at itself (cache and segment,
                              in stream order), so every token sees the same number of tokens; memory rows and
                              the read-memory columns are unchanged (LM-RMT drops its memory mask under
                              --same_length; here the RMT mask holds and only token keys are windowed)
  clamp (C > 0)               relative distances above C use the sinusoid of C

Positions: the blocks are laid out in this order, [cache | read | segment | write], and relative distances
are taken in that order (as the authors' LM-RMT does by concatenation).
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn

from rmt_fairseq.modules.relative_attention import sinusoid_table


class MemoryTokens(nn.Module):
    """M distinct learned memory vectors. (LM-RMT starts all M from one shared vector; identical slots are
    symmetric under attention and only diverge through position, so we give each its own initialisation.)"""

    def __init__(self, num_tokens: int, embed_dim: int, init_std: float = 1.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.weight = nn.Parameter(torch.randn(num_tokens, embed_dim) * init_std)  # M x C

    def forward(self, batch_size: int) -> torch.Tensor:
        # a module call (not attribute access) and a copy: under ZeRO-3 a parameter is gathered for its own
        # module's forward and released afterwards, so the result must not alias it
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1).clone()  # B x M x C

    initial = forward


MEM_CACHE_RULES = ("none", "both", "write")  # which memory rows see the cache columns (module docstring)


@dataclass(frozen=True)
class Layout:
    """The attention geometry of one segment: block sizes (cache L, read memory M, segment T, write memory Mw),
    which memory rows see the cache (`mem_cache`: "none", "both" or the pre-switch "write"), the same-length
    window (`same_length`: W token keys per segment token, 0 = off) and the distance clamp (`clamp_len`, 0 =
    off). See the module docstring."""

    cache: int
    read: int
    segment: int
    write: int
    mem_cache: str = "none"
    same_length: int = 0
    clamp_len: int = 0

    @property
    def queries(self) -> int:
        return self.read + self.segment + self.write

    @property
    def keys(self) -> int:
        return self.cache + self.queries


def visibility(layout: Layout) -> torch.Tensor:
    """N x K bool, True where query row may attend to key column (the table in the module docstring)."""
    L, M, T = layout.cache, layout.read, layout.segment
    N, K = layout.queries, layout.keys
    vis = torch.zeros(N, K, dtype=torch.bool)
    r_read, r_seg, r_write = slice(0, M), slice(M, M + T), slice(M + T, N)
    c_cache, c_read, c_seg = slice(0, L), slice(L, L + M), slice(L + M, L + M + T)
    if layout.mem_cache not in MEM_CACHE_RULES:
        raise ValueError(f"Layout.mem_cache must be one of {MEM_CACHE_RULES}, got {layout.mem_cache!r}")
    vis[r_read, c_read] = True
    vis[r_seg, c_cache] = True
    vis[r_seg, c_read] = True
    vis[r_seg, c_seg] = torch.ones(T, T, dtype=torch.bool).tril()  # causal within the segment
    vis[r_write, :] = True  # write memory sees cache, read memory, the whole segment and all write memory
    if layout.mem_cache == "both":
        vis[r_read, c_cache] = True
    elif layout.mem_cache == "none":
        vis[r_write, c_cache] = False
    if layout.same_length > 0:
        # token t of the segment sits at stream position L + t, cache column c at c, segment column s at L + s:
        # keep the keys at positions (L + t - W, L + t]
        tok_pos = torch.cat([torch.arange(L), L + torch.arange(T)])  # L + T
        q_pos = L + torch.arange(T)  # T
        inside = tok_pos[None, :] > q_pos[:, None] - layout.same_length  # T x (L + T)
        vis[r_seg, c_cache] &= inside[:, :L]
        vis[r_seg, c_seg] &= inside[:, L:]
    return vis


def relative_distances(layout: Layout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distances (i - j) of query i to key j in [cache | read | segment | write] order.

    Returns (distances P, descending from the largest visible one to the smallest, as float) and the N x K
    long index of each (i, j) into that list. Masked pairs are clamped into range (their score is -inf)."""
    L, N, K = layout.cache, layout.queries, layout.keys
    q_pos = torch.arange(N) + L  # query i sits at key position L + i
    dist = q_pos[:, None] - torch.arange(K)[None, :]  # N x K
    vis = visibility(layout)
    dmax = int(dist[vis].max())
    dmin = int(dist[vis].min())
    distances = torch.arange(dmax, dmin - 1, -1, dtype=torch.float)  # P
    index = (dmax - dist).clamp(0, dmax - dmin)  # N x K
    return distances, index


class LayoutCache:
    """Masks and relative-position tables depend only on the layout sizes: build them once per layout and
    device instead of every step."""

    def __init__(self, embed_dim: int):
        self.embed_dim = embed_dim
        self._tables: Dict[Tuple[Layout, torch.device, torch.dtype], Tuple[torch.Tensor, ...]] = {}
        self._masks: Dict[Tuple[Layout, torch.device, torch.dtype], torch.Tensor] = {}

    def mask(self, layout: Layout, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """N x K additive attention mask: 0 where visibility() allows, -inf elsewhere."""
        key = (layout, device, dtype)
        if key not in self._masks:
            bias = torch.zeros(layout.queries, layout.keys, dtype=dtype)
            self._masks[key] = bias.masked_fill_(~visibility(layout), float("-inf")).to(device)
        return self._masks[key]

    def get(self, layout: Layout, device: torch.device, dtype: torch.dtype):
        """-> (pos_emb P x C, rel_index N x K long, mask_bias N x K with 0 / -inf)."""
        key = (layout, device, dtype)
        if key not in self._tables:
            distances, index = relative_distances(layout)
            if layout.clamp_len > 0:  # Transformer-XL's clamp_len: farther distances share the embedding of C
                distances = distances.clamp(max=float(layout.clamp_len))
            pos_emb = sinusoid_table(distances, self.embed_dim).to(device=device, dtype=dtype)
            self._tables[key] = (pos_emb, index.to(device), self.mask(layout, device, dtype))
        return self._tables[key]
