"""The mask table of paper §3.2 / Fig 6d, entry by entry, and the relative-distance index."""

import torch

from rmt_fairseq.modules.memory import Layout, relative_distances, visibility


def test_mask_table_entries():
    L, M, T, W = 2, 3, 4, 3
    vis = visibility(Layout(L, M, T, W))
    cache, read, seg, write = range(0, 2), range(2, 5), range(5, 9), range(9, 12)
    rows_read, rows_seg, rows_write = range(0, 3), range(3, 7), range(7, 10)
    for i in rows_read:  # read memory sees read memory only
        assert all(vis[i, j] for j in read)
        assert not any(vis[i, j] for j in [*cache, *seg, *write])
    for t, i in enumerate(rows_seg):  # segment: cache, read memory, causal segment, never write memory
        assert all(vis[i, j] for j in [*cache, *read])
        assert [bool(vis[i, j]) for j in seg] == [k <= t for k in range(T)]
        assert not any(vis[i, j] for j in write)
    for i in rows_write:  # write memory sees everything, including all write memory
        assert vis[i].all()


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
