"""Generated corpora for tests and the demo (deterministic from a seed).

recall: documents "K f1 f2 ... f{gap} K" (one per line; fairseq-preprocess appends </s>). The key K is drawn
from `num_keys` symbols; the fillers are a fixed counting sequence, so everything is predictable except the
first key, and the repeated key is predictable only by a model that remembers it. With gap = T - 1 the key
and its repeat are exactly one segment of T tokens apart: never in the same segment, always in adjacent
ones. Per token, a model without memory cannot do better than 2 ln(num_keys) / (gap + 3) nats; one that
carries the key across the boundary reaches ln(num_keys) / (gap + 3).
"""

import math
import random
from typing import List


def recall_documents(num_docs: int, gap: int, num_keys: int = 8, seed: int = 1) -> List[str]:
    if gap < 0 or num_keys < 2 or num_docs < 1:
        raise ValueError(f"recall: need gap >= 0, num_keys >= 2, num_docs >= 1; got {gap}, {num_keys}, {num_docs}")
    rng = random.Random(seed)
    fillers = " ".join(f"f{i}" for i in range(1, gap + 1))
    docs = []
    for _ in range(num_docs):
        key = f"K{rng.randrange(num_keys)}"
        docs.append(f"{key} {fillers} {key}" if gap else f"{key} {key}")
    return docs


def recall_bounds(gap: int, num_keys: int) -> dict:
    """Best achievable loss (bits/token) with and without cross-segment memory, for the docstring's setting."""
    per_doc = gap + 3  # key, fillers, key, </s>
    return {
        "no_memory_bits": 2 * math.log2(num_keys) / per_doc,
        "memory_bits": math.log2(num_keys) / per_doc,
    }
