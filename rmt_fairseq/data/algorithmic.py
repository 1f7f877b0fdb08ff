"""Generators of the RMT paper's algorithmic tasks (§4.1, Appendix A), deterministic from a seed.

Every sample is one line of space-separated tokens: the source, the start-to-generate token `<gen>`, then the
target. fairseq-preprocess turns the lines into ordinary binarized data (it appends </s>); the loss and the
accuracies of `--task rmt_algorithmic` cover only what follows `<gen>`.

Associative retrieval has two layouts. The RMT paper's (§4.1): every pair and the query in one source, split
however --num-segments says. The ARMT paper's capacity setting (Rodkin et al. 2024, §4.1; the authors' scripts
give every pair a segment of its own: segment size key + value + 2, N + 1 segments), with `pairs_per_segment`
P: the N pairs are written P to a segment, and the query gets the last segment, so every segment has exactly
T = P * (K + 1) + 1 tokens for keys of K symbols and the sample S * T tokens for S = ceil(N / P) + 1:

    k v k v ... |            P pairs, then `|` (fewer pairs and more `|` in the last pair segment when P does
                             not divide N)
    | ... | q <gen> v        the queried key, <gen>, its value, with `|` in front up to T tokens

`--task rmt_algorithmic --tokens-per-sample T` (or `--num-segments S`) then cuts the sample at exactly these
boundaries, so the value must come through memory from the segment that held its pair.
"""

import random
import string
from typing import Callable, Dict, List, Optional, Tuple

GEN = "<gen>"

SYMBOLS = list(string.ascii_lowercase + string.digits)


def _alphabet(vocab_size: int) -> List[str]:
    if not 2 <= vocab_size <= len(SYMBOLS):
        raise ValueError(f"--vocab-size must be in [2, {len(SYMBOLS)}], got {vocab_size}")
    return SYMBOLS[:vocab_size]


def copy_sample(rng: random.Random, src_len: int, vocab_size: int = 10) -> Tuple[List[str], List[str]]:
    """Copy: the target is the source written twice (§4.1)."""
    src = [rng.choice(_alphabet(vocab_size)) for _ in range(src_len)]
    return src, src + src


def reverse_sample(rng: random.Random, src_len: int, vocab_size: int = 10) -> Tuple[List[str], List[str]]:
    """Reverse: the target is the source reversed."""
    src = [rng.choice(_alphabet(vocab_size)) for _ in range(src_len)]
    return src, src[::-1]


SEP = "|"  # ends a pair segment of the capacity layout, and fills its query segment up to T tokens


def associative_retrieval_sample(rng: random.Random, num_pairs: int = 4, vocab_size: int = 36,
                                 pairs_per_segment: Optional[int] = None, key_len: int = 1
                                 ) -> Tuple[List[str], List[str]]:
    """Associative retrieval: N key-value pairs (distinct keys of `key_len` symbols, values one symbol), then a
    queried key; the answer is its value. With `pairs_per_segment` P: the capacity layout of the module
    docstring (segments of capacity_segment_len(P, key_len) tokens)."""
    alphabet = _alphabet(vocab_size)
    if num_pairs > len(alphabet) ** key_len:
        raise ValueError(f"--num-pairs {num_pairs} needs distinct keys: at most --vocab-size ** --key-len "
                         f"({len(alphabet) ** key_len})")
    if key_len == 1:
        keys = [[k] for k in rng.sample(alphabet, num_pairs)]
    else:  # a key is a number < V**K written in base V: rng.sample draws N distinct ones
        keys = [[alphabet[i // len(alphabet) ** j % len(alphabet)] for j in reversed(range(key_len))]
                for i in rng.sample(range(len(alphabet) ** key_len), num_pairs)]
    values = [rng.choice(alphabet) for _ in keys]
    q = rng.randrange(num_pairs)
    pairs = [k + [v] for k, v in zip(keys, values)]
    if pairs_per_segment is None:
        return [t for kv in pairs for t in kv] + keys[q], [values[q]]
    T = capacity_segment_len(pairs_per_segment, key_len)
    src = []
    for i in range(0, num_pairs, pairs_per_segment):
        seg = [t for kv in pairs[i : i + pairs_per_segment] for t in kv]
        src += seg + [SEP] * (T - len(seg))  # T tokens: at least one `|`
    # the query segment: `|` x (T - K - 2), the key, then <gen> and the value (added by line())
    src += [SEP] * (T - key_len - 2) + keys[q]
    return src, [values[q]]


def capacity_segment_len(pairs_per_segment: int, key_len: int = 1) -> int:
    """T of the capacity layout: P pairs of K + 1 symbols and one `|` (also room for the query: K + 2 tokens)."""
    return pairs_per_segment * (key_len + 1) + 1


def line(src: List[str], tgt: List[str]) -> str:
    return " ".join(src + [GEN] + tgt)


GENERATORS: Dict[str, Callable] = {
    "copy": copy_sample,
    "reverse": reverse_sample,
    "associative_retrieval": associative_retrieval_sample,
}


def generate(task: str, num_samples: int, seed: int, **kwargs) -> List[str]:
    rng = random.Random(seed)
    return [line(*GENERATORS[task](rng, **kwargs)) for _ in range(num_samples)]


# ---- quadratic equations (Appendix A.3) ---------------------------------------------------------------------

EQ_SLOT = 30  # every step is padded to 30 characters
EQ_SLOTS = 6  # equation | canonic form | discriminant | x1 | x2 | answer  -> 180 tokens
EQ_PAD = "_"


def _monome(coef: int, power: int) -> str:
    """One term of the polynomial, formatted as the authors' generator (get_monome) does."""
    if coef == 0:
        return ""
    if coef == -1:
        m = "-" if power > 0 else "-1"
    elif coef == 1:
        m = "+1" if power == 0 else ("+" if power < 2 else "")
    else:
        m = f"{coef}" if (coef < 0 or power == 2) else f"+{coef}"
        if power > 0:
            m += "*"
    if power == 1:
        m += "x"
    elif power == 2:
        m += "x^2"
    return m


def _polynomial(a: int, b: int, c: int) -> str:
    return _monome(a, 2) + _monome(b, 1) + _monome(c, 0) + "=0"


def equation_with_roots(x1: int, x2: int, alpha: int) -> Tuple[str, List[str], str]:
    """alpha*(x - x1)(x - x2) = 0 -> (equation, solution steps, answer), as Appendix A.3's example:
    roots 6, 92 and alpha -4 give -4*x^2+392*x-2208=0, x^2-98*x+552=0;D=98^2-4*1*552=7396=86^2;
    x=(98-86)/2=6;x=(98+86)/2=92 and 6,92."""
    b, c = -(x1 + x2), x1 * x2  # canonic x^2 + b x + c
    d = b * b - 4 * c
    sq = int(round(d**0.5))
    lo, hi = min(x1, x2), max(x1, x2)
    steps = [
        _polynomial(1, b, c),
        f"D={abs(b)}^2-4*1*{c}={d}={sq}^2",
        f"x=({-b}-{sq})/2={lo}",
        f"x=({-b}+{sq})/2={hi}",
    ]
    answer = ",".join(str(r) for r in sorted({x1, x2}))
    return _polynomial(alpha, alpha * b, alpha * c), steps, answer


def equation_without_roots(b: int, c: int, alpha: int) -> Tuple[str, List[str], str]:
    """x^2 + b x + c with D = b^2 - 4c < 0: the discriminant step, then empty root and answer steps."""
    d = b * b - 4 * c
    assert d < 0
    return _polynomial(alpha, alpha * b, alpha * c), [_polynomial(1, b, c), f"D={abs(b)}^2-4*1*{c}={d}", "", ""], ""


def equation_sample(rng: random.Random, max_root: int = 100, max_alpha: int = 10, no_roots_rate: float = 0.2
                    ) -> Tuple[List[str], List[str]]:
    """Source: the equation slot; target: canonic, discriminant, x1, x2 and answer slots (5 x 30 chars).
    Roots are uniform integers in [-max_root, max_root]; alpha is uniform in 1..max_alpha with a random sign
    (the authors' generator draws the sign too, hence the paper's example -4)."""
    alpha = rng.randint(1, max_alpha) * rng.choice((-1, 1))
    if rng.random() < no_roots_rate:
        b = rng.randint(-(2 * max_root - 1), 2 * max_root - 1)
        c = rng.randint(b * b // 4 + 1, max_root * max_root)
        eq, steps, answer = equation_without_roots(b, c, alpha)
    else:
        eq, steps, answer = equation_with_roots(rng.randint(-max_root, max_root), rng.randint(-max_root, max_root),
                                                alpha)
    slots = [eq, *steps, answer]
    for s in slots:
        assert len(s) <= EQ_SLOT, s
    chars = [list(s) + [EQ_PAD] * (EQ_SLOT - len(s)) for s in slots]
    return chars[0], [ch for slot in chars[1:] for ch in slot]


GENERATORS["equations"] = equation_sample
