"""Generators of the memorization tasks (1M-token report §3): determinism, layout of facts and question, answers
derivable from the document alone (an independent solver), lazy slices, noise sources, errors."""

import collections
import random
import time

import pytest

from rmt_fairseq.data.memorization import LOCATIONS, TASKS, Noise, sample, template_words

# The test's own copy of the bAbI templates: the solver below reads documents with these, not the module's.
LOCS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
PEOPLE = ["mary", "john", "daniel", "sandra"]
VERBS = ["went", "travelled", "journeyed", "moved"]
OPP = {"north": "south", "south": "north", "east": "west", "west": "east"}
TEMPLATE = set(LOCS + PEOPLE + VERBS + list(OPP) + ["back", "to", "the", "is", "of", "where", "what", ".", "?"])
NEED = {"fact_memorization": 11, "fact_detection": 11, "reasoning": 23}  # longest facts + question


def _qa1_facts(toks):
    """[(start, end, person, location)] of every "X went [back] to the LOC ." in the token list."""
    out = []
    for i, t in enumerate(toks):
        if t not in PEOPLE or i + 1 >= len(toks) or toks[i + 1] not in VERBS:
            continue
        j = i + 2 + (toks[i + 1] == "went" and i + 2 < len(toks) and toks[i + 2] == "back")
        if toks[j : j + 2] == ["to", "the"] and j + 3 < len(toks) and toks[j + 2] in LOCS and toks[j + 3] == ".":
            out.append((i, j + 4, t, toks[j + 2]))
    return out


def _qa4_facts(toks):
    """[(start, end, a, direction, b)] of every "the A is D of the B ." in the token list."""
    out = []
    for i in range(len(toks) - 7):
        w = toks[i : i + 8]
        if (w[0] == "the" and w[1] in LOCS and w[2] == "is" and w[3] in OPP and w[4:6] == ["of", "the"]
                and w[6] in LOCS and w[7] == "."):
            out.append((i, i + 8, w[1], w[3], w[6]))
    return out


def _question(toks):
    """(start, kind, args) of the question that ends the document."""
    if toks[-4:-2] == ["where", "is"] and toks[-2] in PEOPLE and toks[-1] == "?":
        return len(toks) - 4, "where", (toks[-2],)
    q = toks[-7:]
    if q[:2] == ["what", "is"] and q[2] in OPP and q[3:5] == ["of", "the"] and q[5] in LOCS and q[6] == "?":
        return len(toks) - 7, "direct", (q[2], q[5])  # what is D of the B ?
    if q[:3] == ["what", "is", "the"] and q[3] in LOCS and q[4] in OPP and q[5:] == ["of", "?"]:
        return len(toks) - 7, "inverted", (q[4], q[3])  # what is the B D of ?
    raise AssertionError(f"no question at the end of {toks[-8:]}")


def solve(toks):
    """The answer a reader derives from the token list alone."""
    _, kind, args = _question(toks)
    if kind == "where":
        locs = [loc for _, _, p, loc in _qa1_facts(toks) if p == args[0]]
        assert locs, "no fact about the person asked about"
        return locs[-1]
    d, b = args
    if kind == "direct":  # "the A is D of the B" answers "what is D of the B ?"
        answers = [a for _, _, a, dd, bb in _qa4_facts(toks) if (dd, bb) == (d, b)]
    else:  # "the B is D of Y" <=> "Y is opposite(D) of the B"
        answers = [a for _, _, a, dd, bb in _qa4_facts(toks) if (dd, bb) == (OPP[d], b)]
    assert len(answers) == 1, f"{len(answers)} facts answer the question"
    return answers[0]


def _noise_file(tmp_path, words):
    path = tmp_path / "noise.txt"
    path.write_text("\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)) + "\n")
    return str(path)


def test_the_answers_are_the_six_locations():
    assert sorted(LOCATIONS) == LOCS and set(TASKS) == set(NEED)
    assert TEMPLATE == set(template_words())


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_exact_length(task):
    noise = Noise()
    a, b = sample(task, 7, 3, 100, noise), sample(task, 7, 3, 100, Noise())
    assert a.tokens() == b.tokens() and a.label == b.label
    assert len(a.tokens()) == 100
    assert sample(task, 8, 3, 100, noise).tokens() != a.tokens()
    assert sample(task, 7, 4, 100, noise).tokens() != a.tokens()
    for length in (NEED[task], NEED[task] + 1, 64, 257, 1000):
        for i in range(20):
            assert len(sample(task, i, 1, length, noise).tokens()) == length


def test_fact_memorization_layout():
    noise = Noise()
    for i in range(100):
        toks = sample("fact_memorization", i, 1, 50, noise).tokens()
        facts = _qa1_facts(toks)
        assert len(facts) == 1 and facts[0][0] == 0, toks
        q_start, kind, (person,) = _question(toks)
        assert kind == "where" and q_start == 46 and person == facts[0][2]


def test_fact_detection_fact_at_varying_positions_inside_before_the_question():
    noise, starts = Noise(), []
    for i in range(300):
        toks = sample("fact_detection", i, 1, 60, noise).tokens()
        facts = _qa1_facts(toks)
        assert len(facts) == 1, toks
        start, end, person, _ = facts[0]
        q_start, kind, args = _question(toks)
        assert kind == "where" and args == (person,)
        assert 0 <= start and end <= q_start == 56
        starts.append(start)
    assert len(set(starts)) > 20 and sum(s == 0 for s in starts) < 30
    assert max(starts) > 40  # also near the question


def test_reasoning_two_facts_before_the_question_non_overlapping():
    noise, starts = Noise(), set()
    for i in range(300):
        toks = sample("reasoning", i, 1, 60, noise).tokens()
        facts = _qa4_facts(toks)
        assert len(facts) == 2, toks
        (s1, e1, a1, d1, b1), (s2, e2, a2, d2, b2) = sorted(facts)
        q_start, kind, (_, b) = _question(toks)
        assert kind in ("direct", "inverted") and q_start == 53
        assert e1 <= s2 and e2 <= q_start  # disjoint, both before the question
        assert b1 == b2 == b and len({a1, a2, b}) == 3 and d1 != d2
        starts.update([s1, s2])
    assert len(starts) > 30


@pytest.mark.parametrize("task", TASKS)
def test_answer_is_derivable_and_labels_balanced(task):
    noise, counts, kinds = Noise(), collections.Counter(), collections.Counter()
    n = 600
    for i in range(n):
        doc = sample(task, i, 2, 48, noise)
        toks = doc.tokens()
        assert doc.label in LOCS
        assert solve(toks) == doc.label, (toks, doc.label)
        counts[doc.label] += 1
        kinds[_question(toks)[1]] += 1
    assert set(counts) == set(LOCS)
    assert min(counts.values()) >= 0.10 * n, counts
    if task == "reasoning":  # both phrasings occur
        assert kinds["direct"] > 0.3 * n and kinds["inverted"] > 0.3 * n, kinds


@pytest.mark.parametrize("task", TASKS)
def test_lazy_slices_equal_slices_of_the_whole(task):
    rng = random.Random(0)
    for i in range(15):
        for noise in (Noise(),):
            doc = sample(task, i, 1, 120, noise)
            whole = doc.tokens()
            q_start = _question(whole)[0]
            spans = [(s, e) for s, e, *_ in (_qa1_facts(whole) if task != "reasoning" else _qa4_facts(whole))]
            cuts = [(rng.randint(0, 130), rng.randint(0, 130)) for _ in range(30)]
            for s, e in spans:  # through a fact: its start, middle, end
                cuts += [(s + 1, e - 1), (s - 3, s + 2), (e - 2, e + 5), (s + 2, q_start + 3)]
            cuts += [(q_start + 2, 120), (q_start - 5, q_start + 1), (q_start + 1, q_start + 3), (0, 120), (5, 5)]
            for a, b in cuts:
                a = max(a, 0)
                assert doc.tokens(a, b) == whole[a:b], (a, b)
            assert doc.tokens(0, None) == whole and doc.tokens(100) == whole[100:]


def test_segments_concatenate_to_the_document():
    doc = sample("reasoning", 5, 1, 10_000, Noise())
    T = 512
    streamed = [t for s in range(0, 10_000, T) for t in doc.tokens(s, s + T)]
    assert streamed == doc.tokens()
    assert solve(streamed) == doc.label


@pytest.mark.parametrize("task", TASKS)
def test_two_million_token_document_is_sliced_fast(task):
    L = 2_000_000
    t0 = time.perf_counter()
    doc = sample(task, 0, 1, L, Noise())
    tail = doc.tokens(L - 64, L)
    head = doc.tokens(0, 64)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"{elapsed:.2f}s for two 64-token slices"
    assert len(tail) == 64 and len(head) == 64
    q_start, kind, args = _question(tail)
    assert q_start == 64 - (4 if task != "reasoning" else 7)
    if task == "fact_memorization":  # fact at the start, question at the end
        (s, e, person, loc), = _qa1_facts(head)
        assert s == 0 and args == (person,) and loc == doc.label
    # the fact(s), wherever they are in the 2M tokens, are in the slices at the inserted positions
    starts = [pos for pos, _ in doc.inserts[:-1]]
    pieces = [doc.tokens(pos - 3, pos + 11) for pos in starts]
    found = _qa1_facts(sum(pieces, [])) if task != "reasoning" else _qa4_facts(sum(pieces, []))
    assert len(found) == len(starts) == (2 if task == "reasoning" else 1)
    assert solve(sum(pieces, []) + tail) == doc.label
    if task != "fact_memorization":
        assert max(starts) > 1000


def test_generated_noise_has_no_template_word():
    noise = Noise()
    words = set()
    for offset in (0, 12345, (1 << 31) - 5000):
        words |= set(noise.slice(offset, 0, 5000).tolist())
    assert not words & TEMPLATE and len(words) > 500
    for task in TASKS:  # in documents, template words are exactly the facts' and the question's
        for i in range(20):
            toks = sample(task, i, 1, 200, noise).tokens()
            q_start = _question(toks)[0]
            facts = _qa1_facts(toks) if task != "reasoning" else _qa4_facts(toks)
            inserted = sum(e - s for s, e, *_ in facts) + len(toks) - q_start
            assert sum(t in TEMPLATE for t in toks) == inserted


def test_noise_from_a_file_is_its_lower_cased_words(tmp_path):
    base = ["Alpha", "BRAVO", "Charlie", "delta", "Echo", "FOXTROT", "golf", "Hotel", "india", "Juliett", "KILO"]
    words = [f"{w}{i // len(base)}" for i, w in enumerate(base * 12)]  # 132 distinct words, mixed case
    path = _noise_file(tmp_path, words)
    lower = [w.lower() for w in words]
    noise = Noise(path)
    assert noise.vocabulary() == sorted(lower)
    for i in range(30):
        toks = sample("fact_memorization", i, 1, 80, noise).tokens()
        fact_end = _qa1_facts(toks)[0][1]
        background = toks[fact_end:-4]
        assert set(background) <= set(lower)
        # consecutive text of the file, wrapping around at its end
        k = lower.index(background[0])
        assert background == [lower[(k + j) % len(lower)] for j in range(len(background))]
        assert solve(toks) == sample("fact_memorization", i, 1, 80, noise).label


@pytest.mark.parametrize("task", TASKS)
def test_too_short_length_names_the_needed_length(task):
    noise = Noise()
    for length in (0, 1, NEED[task] - 1):
        for i in range(40):  # whichever templates the sample draws
            with pytest.raises(ValueError, match=rf"at least {NEED[task]}\b"):
                sample(task, i, 1, length, noise)
    for i in range(40):  # the needed length is enough for every sample
        assert len(sample(task, i, 1, NEED[task], noise).tokens()) == NEED[task]


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="fact_detection"):
        sample("fact_recall", 0, 1, 100, Noise())


def test_noise_file_with_fewer_than_100_words_names_the_flag(tmp_path):
    path = _noise_file(tmp_path, [f"w{i}" for i in range(99)])
    with pytest.raises(ValueError, match=r"--noise-file .*99 words"):
        Noise(path)
    with pytest.raises(ValueError, match="--noise-file"):
        Noise(str(tmp_path / "missing.txt"))
    Noise(_noise_file(tmp_path, [f"w{i}" for i in range(100)]))  # exactly 100 is enough
