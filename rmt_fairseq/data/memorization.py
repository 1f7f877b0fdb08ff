"""Generators of the memorization tasks of "Scaling Transformer to 1M tokens and beyond with RMT" (§3).

Every sample is a document of exactly `length` whitespace tokens: background noise with one or two facts
inserted, and a question at the very end. The answer is one of the six bAbI locations (6-way
classification). Facts and questions follow bAbI templates:

  fact_memorization   QA1 fact at the start:            "mary went to the kitchen ." ... "where is mary ?"
  fact_detection      QA1 fact at a random position:    ... "mary went to the kitchen ." ... "where is mary ?"
  reasoning           QA4 (two-argument relations), two facts at random positions, the question is about
                      one of them, phrased directly or inverted, so the model must keep both:
                      "the hallway is east of the bathroom ." ... "the bedroom is west of the bathroom ." ...
                      "what is the bathroom east of ?" -> bedroom   (the paper's Fig. 2 example)

Noise is read from any text file (lower-cased whitespace tokens, from a per-sample random offset, wrapping
around) or, without a file, generated: words `n0`..`n{V-1}` from a hash of the position (no template word can
appear in generated noise). Nothing depends on holding the document: `Document.tokens(start, end)` produces
any slice, so a 2,000,000-token document is streamed segment by segment with constant memory.

Deterministic: sample i of a split is a function of (seed, i) only.
"""

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

LOCATIONS = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]  # the six answers (bAbI QA1/QA4)
PEOPLE = ["mary", "john", "daniel", "sandra"]
MOVES = [["went", "to"], ["travelled", "to"], ["journeyed", "to"], ["moved", "to"], ["went", "back", "to"]]
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
TASKS = ("fact_memorization", "fact_detection", "reasoning")
GENERATED_NOISE_VOCAB = 1000


def template_words() -> List[str]:
    words = set(LOCATIONS + PEOPLE + list(OPPOSITE) + [w for m in MOVES for w in m])
    words |= {"the", "is", "of", "where", "what", ".", "?"}
    return sorted(words)


@dataclass(frozen=True)
class Fact:
    """One fact. QA1: subject `person`, `location`. QA4: `location` is `direction` of `anchor`."""

    tokens: Tuple[str, ...]
    person: Optional[str] = None
    location: Optional[str] = None
    direction: Optional[str] = None
    anchor: Optional[str] = None


@dataclass(frozen=True)
class Question:
    tokens: Tuple[str, ...]
    person: Optional[str] = None  # QA1: "where is <person> ?"
    direction: Optional[str] = None  # QA4
    anchor: Optional[str] = None
    inverted: bool = False  # QA4: False "what is <d> of the <a> ?", True "what is the <a> <d> of ?"


def answer(facts: Sequence[Fact], question: Question) -> str:
    """The answer derived from the facts alone (what a reader of the document would conclude)."""
    if question.person is not None:  # QA1: the person's (last) location
        locs = [f.location for f in facts if f.person == question.person]
        if not locs:
            raise ValueError(f"no fact about {question.person}")
        return locs[-1]
    for f in facts:  # QA4
        if f.anchor != question.anchor:
            continue
        # "X is d of A" answers "what is d of the A ?" and, inverted, "what is the A opposite(d) of ?"
        want = OPPOSITE[question.direction] if question.inverted else question.direction
        if f.direction == want:
            return f.location
    raise ValueError(f"no fact answers {' '.join(question.tokens)!r}")


def _qa1_fact(rng: random.Random) -> Fact:
    person, location = rng.choice(PEOPLE), rng.choice(LOCATIONS)
    return Fact(tuple([person, *rng.choice(MOVES), "the", location, "."]), person=person, location=location)


def _qa4_facts(rng: random.Random) -> Tuple[List[Fact], Question]:
    anchor, a, b = rng.sample(LOCATIONS, 3)
    d1, d2 = rng.sample(list(OPPOSITE), 2)
    facts = [Fact(("the", loc, "is", d, "of", "the", anchor, "."), location=loc, direction=d, anchor=anchor)
             for loc, d in [(a, d1), (b, d2)]]
    target = rng.choice(facts)
    if rng.random() < 0.5:
        q = Question(("what", "is", target.direction, "of", "the", anchor, "?"), direction=target.direction,
                     anchor=anchor)
    else:
        d = OPPOSITE[target.direction]
        q = Question(("what", "is", "the", anchor, d, "of", "?"), direction=d, anchor=anchor, inverted=True)
    return facts, q


class Noise:
    """Background tokens: token i of a document with noise offset o is `words[(o + i) % len(words)]`."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        if path is None:
            self.words = np.array([f"n{i}" for i in range(GENERATED_NOISE_VOCAB)], dtype=object)
            self.size = 1 << 31
        else:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    words = f.read().lower().split()
            except OSError as e:
                raise ValueError(f"--noise-file {path!r} cannot be read: {e.strerror}") from None
            if len(words) < 100:
                raise ValueError(f"--noise-file {path!r} has {len(words)} words; need at least 100")
            self.words = np.array(words, dtype=object)
            self.size = len(words)

    def vocabulary(self) -> List[str]:
        return sorted(set(self.words.tolist()))

    def slice(self, offset: int, start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end, dtype=np.int64) + offset
        if self.path is None:  # a hash of the position picks the word
            return self.words[_splitmix64(pos) % np.uint64(len(self.words))]
        return self.words[pos % self.size]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a well-mixed uint64 per input (vectorised, wraps modulo 2**64)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass
class Document:
    """A generated sample: `length` tokens, facts and question inserted into noise, produced lazily."""

    length: int
    inserts: List[Tuple[int, Tuple[str, ...]]]  # (start, tokens) of each fact then the question, sorted
    noise: Noise
    noise_offset: int
    facts: List[Fact]
    question: Question
    label: str

    def tokens(self, start: int = 0, end: Optional[int] = None) -> List[str]:
        end = self.length if end is None else min(end, self.length)
        out = self.noise.slice(self.noise_offset, start, end)
        for pos, toks in self.inserts:
            lo, hi = max(pos, start), min(pos + len(toks), end)
            if lo < hi:
                out[lo - start : hi - start] = toks[lo - pos : hi - pos]
        return out.tolist()


def min_length(task: str) -> int:
    """Tokens of the longest facts and question a `task` document can draw (the shortest valid length)."""
    if task == "reasoning":
        return 8 + 8 + 7  # two "the A is D of the B ." and "what is D of the B ?" (or "what is the B D of ?")
    return 1 + max(len(m) for m in MOVES) + 3 + 4  # "X went back to the LOC ." and "where is X ?"


def make_document(task: str, length: int, rng: random.Random, noise: Noise) -> Document:
    if task not in TASKS:
        raise ValueError(f"memorization task must be one of {TASKS}, got {task!r}")
    if task == "reasoning":
        facts, question = _qa4_facts(rng)
    else:
        facts = [_qa1_fact(rng)]
        question = Question(("where", "is", facts[0].person, "?"), person=facts[0].person)
    need = min_length(task)  # the longest templates: whether a length fits must not depend on the sample drawn
    if length < need:
        raise ValueError(f"a {task} document needs at least {need} tokens (facts and question), got {length}")
    free = length - sum(len(f.tokens) for f in facts) - len(question.tokens)  # noise tokens
    if task == "fact_memorization":
        gaps = [0, free]  # the fact first, all noise between it and the question
    else:  # facts at uniformly random positions among the noise, in random order
        cuts = sorted(rng.randint(0, free) for _ in facts)
        gaps = [cuts[0]] + [b - a for a, b in zip(cuts, cuts[1:])] + [free - cuts[-1]]
    inserts, pos = [], 0
    for gap, fact in zip(gaps, facts):
        pos += gap
        inserts.append((pos, fact.tokens))
        pos += len(fact.tokens)
    inserts.append((length - len(question.tokens), question.tokens))
    return Document(length, inserts, noise, rng.randrange(noise.size), facts, question, answer(facts, question))


def sample(task: str, index: int, seed: int, length: int, noise: Noise) -> Document:
    """Sample `index` of the stream (task, seed): independent of every other index and of the length's
    history (a string seed hashes deterministically across runs and platforms)."""
    return make_document(task, length, random.Random(f"{task}/{seed}/{index}"), noise)


def vocabulary(noise: Noise) -> Dict[str, int]:
    """Word counts for a fairseq dict.txt: template words first, then noise words."""
    counts = {w: 1_000_000 for w in template_words()}
    for w in noise.vocabulary():
        counts.setdefault(w, 1)
    return counts
