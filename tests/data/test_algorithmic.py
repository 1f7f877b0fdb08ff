"""Generators of the algorithmic tasks: formats, Appendix A.3's worked example, determinism, no-root rate, and
the associative-retrieval capacity layout (ARMT paper) cut into segments by rmt_algorithmic's dataset."""

import random

import pytest

from rmt_fairseq.data.algorithmic import (
    EQ_PAD,
    GEN,
    SEP,
    capacity_segment_len,
    equation_sample,
    equation_with_roots,
    generate,
)


def _split(line):
    toks = line.split()
    g = toks.index(GEN)
    return toks[:g], toks[g + 1 :]


def test_copy_and_reverse_format():
    for src, tgt in map(_split, generate("copy", 50, seed=3, src_len=24, vocab_size=10)):
        assert len(src) == 24 and tgt == src + src and len(set(src)) <= 10
    for src, tgt in map(_split, generate("reverse", 50, seed=3, src_len=24)):
        assert tgt == src[::-1]


def test_associative_retrieval_answer_is_the_queried_value():
    for src, tgt in map(_split, generate("associative_retrieval", 200, seed=5, num_pairs=4)):
        keys, values, query = src[0:8:2], src[1:8:2], src[8]
        assert len(src) == 9 and len(set(keys)) == 4 and tgt == [values[keys.index(query)]]


@pytest.mark.parametrize("n,p,k,vocab", [(5, 1, 1, 36), (7, 3, 1, 36), (6, 2, 2, 4), (36, 4, 1, 36), (1, 1, 1, 2)])
def test_capacity_layout_one_segment_per_group_of_pairs_then_the_query(n, p, k, vocab):
    T, S = capacity_segment_len(p, k), -(-n // p) + 1
    for line in generate("associative_retrieval", 100, seed=3, num_pairs=n, pairs_per_segment=p, key_len=k,
                         vocab_size=vocab):
        toks = line.split()
        assert len(toks) == S * T  # source, <gen> and the value fill S segments of T exactly
        segs = [toks[i : i + T] for i in range(0, S * T, T)]
        pairs = []
        for i, seg in enumerate(segs[:-1]):  # pair segment i: pairs i*P .. i*P+P-1, then only `|`
            m = min(p, n - i * p)
            body, fill = seg[: m * (k + 1)], seg[m * (k + 1) :]
            assert fill == [SEP] * (T - m * (k + 1)) and fill
            pairs += [(tuple(body[j : j + k]), body[j + k]) for j in range(0, len(body), k + 1)]
        assert len(pairs) == n and SEP not in {t for kv in pairs for t in (*kv[0], kv[1])}
        keys = [key for key, _ in pairs]
        assert len(set(keys)) == n and all(len(key) == k for key in keys)  # distinct keys of K symbols
        query = segs[-1]  # `|` filler, the key, <gen>, the value
        assert query[: T - k - 2] == [SEP] * (T - k - 2) and query[-2] == GEN
        assert query[-1] == dict(pairs)[tuple(query[T - k - 2 : -2])]  # the answer: the queried key's value


def test_capacity_layout_is_seeded_and_defaults_are_the_rmt_papers():
    kw = dict(num_pairs=8, pairs_per_segment=1)
    assert generate("associative_retrieval", 50, seed=4, **kw) == generate("associative_retrieval", 50, seed=4, **kw)
    assert generate("associative_retrieval", 50, seed=4, **kw) != generate("associative_retrieval", 50, seed=5, **kw)
    # without --pairs-per-segment: one source (no `|`), as before; the same draws give the same pairs
    flat = [_split(x) for x in generate("associative_retrieval", 50, seed=4, num_pairs=8)]
    capacity = [x.split() for x in generate("associative_retrieval", 50, seed=4, **kw)]
    assert all(SEP not in src and len(src) == 17 for src, _ in flat)
    assert [src[:16] for src, _ in flat] == [[t for t in c[:24] if t != SEP] for c in capacity]
    assert [tgt for _, tgt in flat] == [[c[-1]] for c in capacity]
    with pytest.raises(ValueError, match="at most --vocab-size \\*\\* --key-len \\(16\\)"):
        generate("associative_retrieval", 1, seed=1, num_pairs=17, vocab_size=4, key_len=2, pairs_per_segment=1)


def test_capacity_layout_is_cut_at_its_segment_boundaries_by_the_task():
    """What rmt_algorithmic's dataset feeds the model with --tokens-per-sample T (or --num-segments S): segment i
    holds pair i, the last one the queried key and <gen>, and only the value after <gen> is scored."""
    from fairseq.data import Dictionary

    from rmt_fairseq.data.samples import SegmentedSampleDataset

    n, T = 6, capacity_segment_len(1)
    lines = generate("associative_retrieval", 8, seed=2, num_pairs=n, pairs_per_segment=1)
    d = Dictionary()
    for t in sorted({t for x in lines for t in x.split()}):
        d.add_symbol(t)
    rows = [d.encode_line(x, add_if_not_exist=False) for x in lines]  # + </s>, as fairseq-preprocess

    class Data(list):
        sizes = [len(r) for r in rows]

    for layout in (dict(seg_len=T), dict(num_segments=n + 1)):
        ds = SegmentedSampleDataset(Data(rows), d.index(GEN), d.pad(), d.eos(), "train", **layout)
        b = ds.collater([ds[i] for i in range(len(rows))])
        assert (b["net_input"]["segment_len"], b["num_segments"]) == (T, n + 1)
        segs = b["net_input"]["src_tokens"].view(len(rows), n + 1, T)  # B x S x T
        for r, line in enumerate(lines):
            toks = line.split()
            for i in range(n):
                assert d.string(segs[r, i]).split() == toks[i * T : i * T + T]  # k v |
            assert d.string(segs[r, n]).split() == toks[n * T :]  # q <gen> v
            scored = b["target"][r].ne(d.pad()).nonzero().flatten().tolist()
            assert scored == [n * T + 1]  # predicted at <gen>: the value, from memory of segment i
            assert d[int(b["target"][r, n * T + 1])] == toks[-1]


def test_appendix_a3_worked_example():
    eq, steps, answer = equation_with_roots(6, 92, -4)
    assert eq == "-4*x^2+392*x-2208=0"
    assert ";".join(steps) == "x^2-98*x+552=0;D=98^2-4*1*552=7396=86^2;x=(98-86)/2=6;x=(98+86)/2=92"
    assert answer == "6,92"


def test_equation_samples_are_180_chars_in_30_char_steps_and_consistent():
    rng = random.Random(0)
    for _ in range(300):
        src, tgt = equation_sample(rng)
        assert len(src) == 30 and len(tgt) == 150
        slots = ["".join(src)] + ["".join(tgt[i : i + 30]) for i in range(0, 150, 30)]
        eq, canon, disc, x1, x2, ans = (s.rstrip(EQ_PAD) for s in slots)
        if ans:  # real roots: they solve the equation, and the answer is what the steps derive
            roots = [int(r) for r in ans.split(",")]
            lhs = eq[: -len("=0")].replace("^", "**").replace("x", "({})")
            for r in roots:
                assert eval(lhs.format(*[r] * lhs.count("{}"))) == 0, (eq, r)
            assert x1.endswith(f"={min(roots)}") and x2.endswith(f"={max(roots)}")
        else:
            assert int(disc.split("=")[-1]) < 0 and not x1 and not x2


def test_no_root_rate_and_determinism():
    rng = random.Random(7)
    samples = [equation_sample(rng) for _ in range(4000)]
    no_roots = sum(1 for _, tgt in samples if set(tgt[-30:]) == {EQ_PAD}) / len(samples)
    assert no_roots == pytest.approx(0.2, abs=0.025)
    assert generate("equations", 20, seed=1) == generate("equations", 20, seed=1)
    assert generate("equations", 20, seed=1) != generate("equations", 20, seed=2)
    assert generate("copy", 5, seed=1, src_len=8) == generate("copy", 5, seed=1, src_len=8)
