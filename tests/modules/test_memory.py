"""The mask table of paper §3.2 / Fig 6d, entry by entry, and the relative-distance index."""

import pytest
import torch

from rmt_fairseq.modules.memory import Layout, relative_distances, visibility


@pytest.mark.parametrize("mem_cache", ["none", "both", "write"])
def test_mask_table_entries(mem_cache):
    """LM-RMT's --read_mem_from_cache: off ("none", its default), neither memory block sees the cache; on
    ("both"), both do; "write" is the rule of checkpoints written before the switch."""
    L, M, T, W = 2, 3, 4, 3
    vis = visibility(Layout(L, M, T, W, mem_cache=mem_cache))
    cache, read, seg, write = range(0, 2), range(2, 5), range(5, 9), range(9, 12)
    rows_read, rows_seg, rows_write = range(0, 3), range(3, 7), range(7, 10)
    for i in rows_read:  # read memory sees read memory (and the cache iff the switch is on)
        assert all(vis[i, j] for j in read)
        assert not any(vis[i, j] for j in [*seg, *write])
        assert [bool(vis[i, j]) for j in cache] == [mem_cache == "both"] * L
    for t, i in enumerate(rows_seg):  # segment: cache, read memory, causal segment, never write memory
        assert all(vis[i, j] for j in [*cache, *read])
        assert [bool(vis[i, j]) for j in seg] == [k <= t for k in range(T)]
        assert not any(vis[i, j] for j in write)
    for i in rows_write:  # write memory sees read memory, the whole segment, all write memory (cache: the rule)
        assert all(vis[i, j] for j in [*read, *seg, *write])
        assert [bool(vis[i, j]) for j in cache] == [mem_cache in ("both", "write")] * L


@pytest.mark.parametrize("L,T,window", [(6, 4, 6), (6, 4, 3), (2, 4, 6), (0, 5, 3), (9, 3, 9)])
def test_same_length_window(L, T, window):
    """Transformer-XL's --same_length: segment token t (stream position L + t) sees exactly the token keys at
    positions (L + t - window, L + t], read memory always, write memory never; memory rows are unchanged."""
    M = 2
    plain = visibility(Layout(L, M, T, M))
    vis = visibility(Layout(L, M, T, M, same_length=window))
    tok_cols = list(range(L)) + list(range(L + M, L + M + T))  # stream positions 0 .. L+T-1
    for t in range(T):
        row = M + t
        seen = [p for p, j in enumerate(tok_cols) if vis[row, j]]
        assert seen == list(range(max(0, L + t - window + 1), L + t + 1)), (t, seen)
        assert vis[row, L : L + M].all() and not vis[row, L + M + T :].any()
    assert torch.equal(vis[:M], plain[:M]) and torch.equal(vis[M + T :], plain[M + T :])


def test_transformer_xl_same_length_mask_is_reproduced():
    """Without memory, the window equals XL's own construction (mem_transformer.py `_forward`, same_length)."""
    for mlen, qlen, mem_len in [(6, 4, 6), (0, 4, 6), (3, 4, 6), (8, 8, 8)]:
        klen = mlen + qlen
        ones = torch.ones(qlen, klen)
        mask_len = klen - mem_len
        shift = qlen - mask_len if mask_len > 0 else qlen
        xl_masked = (torch.triu(ones, 1 + mlen) + torch.tril(ones, -shift)).bool()
        assert torch.equal(visibility(Layout(mlen, 0, qlen, 0, same_length=mem_len)), ~xl_masked)


def test_clamp_len_shares_the_embedding_of_far_distances():
    from rmt_fairseq.modules.memory import LayoutCache
    from rmt_fairseq.modules.relative_attention import sinusoid_table

    layout = Layout(10, 2, 4, 2, clamp_len=5)
    pos_emb, index, _ = LayoutCache(8).get(layout, torch.device("cpu"), torch.float32)
    distances, index2 = relative_distances(layout)
    assert torch.equal(index, index2)
    for d, row in zip(distances.tolist(), pos_emb):
        assert torch.allclose(row, sinusoid_table(torch.tensor([min(d, 5.0)]), 8)[0])


def test_no_memory_no_cache_is_causal():
    vis = visibility(Layout(0, 0, 5, 0))
    assert torch.equal(vis, torch.ones(5, 5, dtype=torch.bool).tril())


def test_relative_index_gives_query_minus_key_distance():
    layout = Layout(3, 2, 4, 2)
    distances, index = relative_distances(layout)
    vis = visibility(layout)
    for i in range(layout.queries):
        for j in range(layout.keys):
            if vis[i, j]:
                assert distances[index[i, j]] == (i + layout.cache) - j
    # write memory attends to later write memory: a negative distance with its own embedding
    assert distances.min() < 0
