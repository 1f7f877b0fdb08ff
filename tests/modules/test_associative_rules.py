"""ARMT's write and read rules, each by a behaviour of its own (modules/associative.py; Rodkin et al. 2024 §3):
the correction term gamma, the read's denominator, and phi's L2 normalisation. The reference test
(tests/models/test_armt.py) checks the whole against the authors' code; these name which rule broke."""

import torch

from rmt_fairseq.modules.associative import DEN_FLOOR, feature, read, update

NU, D, C = 3, 4, 5


def _key(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(1, 1, D, generator=g)  # B=1, M=1


def _write(k, v, A=None, z=None):
    return update(feature(k, NU), v, torch.ones(1, 1, 1), A, z)


def test_rewriting_a_stored_key_replaces_its_value_and_leaves_the_normaliser():
    """Correction term and delta rule: k -> v1, then k -> v2; z counts k once (gamma = 0 for a stored key), and a
    read at k returns v2, not (v1 + v2) / 2 or v2 / 2."""
    k, v1, v2 = _key(0), torch.randn(1, 1, C), torch.randn(1, 1, C)
    A1, z1 = _write(k, v1)
    A2, z2 = _write(k, v2, A1, z1)
    assert torch.allclose(z2, z1, atol=1e-4)
    got = read(torch.zeros(1, 1, C), feature(k, NU), A2, z2)
    assert torch.allclose(got, v2, atol=1e-3), (got, v2)


def test_a_new_key_counts_once_in_the_normaliser():
    """gamma is 1 for a key nothing has been written to (phi of two different keys here barely overlap)."""
    k1, k2 = _key(1), _key(2)
    _, z1 = _write(k1, torch.randn(1, 1, C))
    _, z2 = _write(k2, torch.randn(1, 1, C), *_write(k1, torch.randn(1, 1, C)))
    gamma = 1 - (feature(k2, NU)[0, 0] @ z1[0] + 1e-5)
    assert torch.allclose(z2[0] - z1[0], gamma * feature(k2, NU)[0, 0], atol=1e-5) and gamma > 0.5


def test_the_read_divides_by_the_normaliser():
    """A read is a normalised average of the stored values: scaling A and z together leaves it unchanged (q: a
    stored key, so that z . phi(q) is far above eps)."""
    q = feature(_key(4), NU)
    A, z = _write(_key(4), torch.randn(1, 1, C), *_write(_key(5), torch.randn(1, 1, C)))
    x = torch.zeros(1, 1, C)
    assert torch.allclose(read(x, q, 4 * A, 4 * z), read(x, q, A, z), rtol=1e-3, atol=1e-6)


def test_phi_is_unit_norm_so_a_keys_scale_does_not_change_what_it_writes():
    k, v = _key(6), torch.randn(1, 1, C)
    assert torch.allclose(feature(k, NU).norm(dim=-1), torch.ones(1, 1))
    for a, b in zip(_write(k, v), _write(3 * k, v)):
        assert torch.allclose(a, b, atol=1e-5)


def _orthogonal_state():
    """A != 0 where z = 0: feature index 0 carries a value in A but nothing in z (what a key written with
    gamma = 0 leaves behind); q = e_0 so z . phi(q) = 0 and A^T phi(q) = A[0]."""
    F_ = 2 * NU * D
    A = torch.zeros(1, F_, C)
    A[0, 0] = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    z = torch.zeros(1, F_)
    z[0, 1:] = 1.0
    q = torch.zeros(1, 1, F_)
    q[0, 0, 0] = 1.0
    return q, A, z


def test_the_read_stays_bounded_where_the_normaliser_has_not_seen_the_query():
    """z . phi(q) = 0 with A^T phi(q) != 0: the paper's formula would add A[0] / eps (3e5 here); the floored
    denominator adds A[0] / DEN_FLOOR, and its gradient is finite."""
    q, A, z = _orthogonal_state()
    A.requires_grad_(True)
    got = read(torch.zeros(1, 1, C), q, A, z)
    assert torch.allclose(got[0, 0], A[0, 0] / DEN_FLOOR)
    assert float(got.abs().max()) <= 3.0 / DEN_FLOOR + 1e-3
    got.pow(2).sum().backward()
    assert torch.isfinite(A.grad).all()
    # the write's vbar uses the same floor: the delta stays within |v| + |A[0]| / DEN_FLOOR
    v = torch.zeros(1, 1, C)
    A2, _ = update(q, v, torch.ones(1, 1, 1), A.detach(), z)
    assert torch.allclose(A2[0, 0], A[0, 0].detach() - A[0, 0].detach() / DEN_FLOOR)


def test_the_floor_leaves_the_papers_formula_where_the_query_is_known():
    """Wherever z . phi(q) + eps >= DEN_FLOOR the read is A^T phi(q) / (z . phi(q) + eps) exactly (float64)."""
    g = torch.Generator().manual_seed(7)
    k = torch.randn(1, 3, D, generator=g, dtype=torch.float64)
    A, z = update(feature(k, NU), torch.randn(1, 3, C, generator=g, dtype=torch.float64),
                  torch.ones(1, 3, 1, dtype=torch.float64), None, None)
    q = feature(torch.randn(1, 6, D, generator=g, dtype=torch.float64), NU)
    den = q @ z.unsqueeze(-1) + 1e-5
    assert bool((den >= DEN_FLOOR).all()), den  # the case this test is about
    x = torch.zeros(1, 6, C, dtype=torch.float64)
    assert torch.equal(read(x, q, A, z), (q @ A) / den)


def _rewrites_of_a_known_key(rule, segments):
    """Segment 0 writes key k0 once among M - 1 others (so z . phi(k0) is about 1 and gamma clips to 0 after it);
    every later segment's M memory tokens all write k0 again, with fresh values and beta = 1 -> max |A| per segment."""
    M = 4
    g = torch.Generator().manual_seed(1)
    k0 = torch.randn(1, 1, D, generator=g, dtype=torch.float64)
    ones = torch.ones(1, M, 1, dtype=torch.float64)
    keys = torch.cat([k0, torch.randn(1, M - 1, D, generator=g, dtype=torch.float64)], 1)
    A, z = update(feature(keys, NU), torch.randn(1, M, C, generator=g, dtype=torch.float64), ones, None, None, rule)
    sizes = []
    for _ in range(segments):
        v = torch.randn(1, M, C, generator=g, dtype=torch.float64)
        A, z = update(feature(k0.expand(1, M, D), NU), v, ones, A, z, rule)
        sizes.append(float(A.abs().max()))
    return sizes


def test_the_sequential_write_stays_bounded_where_the_parallel_write_overshoots():
    """M tokens rewriting a key the memory holds: written at once against the segment's starting state (parallel,
    the authors' code) each corrects the same stored value, so it is scaled by 1 - M beta / (z . phi) ~ -3 per
    segment and grows without bound (what stopped armt_tiny on never-restarted streams, issue 29); written one
    after another (sequential) each sees the value the one before stored, and the memory holds the last one."""
    parallel, sequential = _rewrites_of_a_known_key("parallel", 30), _rewrites_of_a_known_key("sequential", 30)
    assert parallel[-1] > 1e10 and parallel[-1] > 100 * parallel[10]  # geometric growth
    assert max(sequential) < 10.0, sequential


def test_the_two_write_rules_agree_on_orthogonal_keys():
    """Where the memory tokens' features do not overlap, no token's write changes what another reads back, so
    the sequential and parallel rules store the same (A, z) bitwise (float64, 3 segments from a state that holds
    something; at a stream's start the paper sets gamma = 1 where the formula a later token meets gives 1 - eps)."""
    F_, M = 2 * NU * D, 4
    g = torch.Generator().manual_seed(5)
    A0, z0 = torch.randn(1, F_, C, generator=g, dtype=torch.float64), torch.rand(1, F_, generator=g).double()
    states = {}
    for rule in ("parallel", "sequential"):
        A, z = A0, z0
        for seg in range(3):
            mk = torch.zeros(1, M, F_, dtype=torch.float64)
            mk[0, torch.arange(M), torch.arange(M) + seg] = 1.0  # unit, disjoint within the segment
            gg = torch.Generator().manual_seed(seg)
            v, beta = torch.randn(1, M, C, generator=gg, dtype=torch.float64), torch.rand(1, M, 1, generator=gg)
            A, z = update(mk, v, beta.double(), A, z, rule)
        states[rule] = (A, z)
    assert torch.equal(states["parallel"][0], states["sequential"][0])
    assert torch.equal(states["parallel"][1], states["sequential"][1])
