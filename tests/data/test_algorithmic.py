"""Generators of the algorithmic tasks: formats, Appendix A.3's worked example, determinism, no-root rate."""

import random

import pytest

from rmt_fairseq.data.algorithmic import EQ_PAD, GEN, equation_sample, equation_with_roots, generate


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
