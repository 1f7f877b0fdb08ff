"""examples/recall/run.sh's report: each model's test bits/token against the bounds, a verdict per model,
OUT/results.json.

    python examples/recall/report.py OUT --updates N --seed S --segment-len T --num-keys K

Bounds: rmt_fairseq/data/synthetic.py recall_bounds (per document: the first key is a guess, the repeat a guess
too without memory). The test split as fairseq-eval-lm streams it (--batch-size streams, segments of T, every
token scored) lets a model without memory do slightly better than that bound: a key that opens a segment is
still in context when its repeat (the target of the segment's last token) is predicted, while a key that opens
a segment leaves "first key or repeat?" open. stream_floors() counts both exactly, so a model is said to beat
the no-memory bound only if it is below the bound and below what a model without memory can reach on this
stream.
"""

import argparse
import datetime
import json
import math
import os
import re
import subprocess
from collections import Counter

from rmt_fairseq.data.synthetic import recall_bounds

MODELS = ("rmt", "transformer_xl", "no_memory")


def stream_floors(test_txt: str, streams: int, seg_len: int, num_keys: int) -> dict:
    """Best bits/token on test_txt (recall documents with --gap seg_len - 1) cut into `streams` streams of
    segments of seg_len as rmt_lm's StreamDataset cuts it (source = tokens[:-1], target = tokens[1:], the tail
    that does not fill a stream dropped), for a model that sees only the current segment and for one that sees
    the whole stream so far."""
    tokens = [t for line in open(test_txt) for t in line.split() + ["</s>"]]
    n = (len(tokens) - 1) // streams
    key_bits = math.log2(num_keys)
    cost = {"no_memory": 0.0, "memory": 0.0}
    ambiguous = {"no_memory": [], "memory": []}  # outcomes after a key whose role the context does not show
    for r in range(streams):
        src, tgt = tokens[r * n : (r + 1) * n], tokens[r * n + 1 : (r + 1) * n + 1]
        for j in range(n):
            start = j - j % seg_len  # first input of this segment
            if tgt[j].startswith("K"):
                if src[j] == "</s>":  # a new document's key: a guess for everyone
                    cost["no_memory"] += key_bits
                    cost["memory"] += key_bits
                else:  # the repeat: its key is the input seg_len - 1 before j
                    key_at = j - (seg_len - 1)
                    cost["no_memory"] += 0.0 if key_at >= start else key_bits
                    cost["memory"] += 0.0 if key_at >= 0 else key_bits
            elif src[j].startswith("K"):  # after a key: a filler if it was the first, </s> if the repeat
                if j == start:
                    ambiguous["no_memory"].append(tgt[j])
                if j == 0:
                    ambiguous["memory"].append(tgt[j])
    total = streams * n
    floors = {}
    for kind in cost:
        counts = Counter(ambiguous[kind])
        bits = sum(-c * math.log2(c / len(ambiguous[kind])) for c in counts.values())
        floors[f"{kind}_bits"] = (cost[kind] + bits) / total
    return floors


def verdict(loss: float, bound: float, floor: float) -> str:
    if loss < min(bound, floor):
        return f"beats the no-memory bound by {bound - loss:.4f} bits"
    if loss < bound:
        return (
            f"does not: {bound - loss:.4f} bits under the no-memory bound, but not under {floor:.4f}, which a "
            f"model without memory can reach on this test stream"
        )
    return f"does not beat the no-memory bound ({loss - bound:.4f} bits above it)"


def _model(out: str, name: str) -> dict:
    ev = open(f"{out}/eval_{name}.log").read()
    train = open(f"{out}/train_{name}.log").read()
    t0, t1 = map(float, open(f"{out}/wall_{name}.txt").read().split())
    # fairseq-train's validation loss is in bits (base 2), as fairseq-eval-lm's
    curve = [
        {"update": int(u), "valid_loss_bits": float(v)}
        for v, u in re.findall(r"valid on 'valid' subset \| loss ([0-9.]+) \|.*?num_updates (\d+)", train)
    ]
    best = min(curve, key=lambda p: p["valid_loss_bits"]) if curve else None
    flags = re.search(r"--bptt-unroll \d+ (.*?) --optimizer", open(f"{out}/cmd_{name}.txt").read())[1]
    return {
        "flags": flags,
        "test_loss_bits": float(re.search(r"Loss \(base 2\): ([0-9.]+)", ev)[1]),
        "best_valid_loss_bits": best["valid_loss_bits"] if best else None,
        "best_update": best["update"] if best else None,
        "updates": int(re.findall(r"num_updates (\d+)", train)[-1]),
        "wall_seconds": round(t1 - t0, 1),
        "commands": [c.strip() for c in open(f"{out}/cmd_{name}.txt").read().strip().split("\n")],
        "valid_curve": curve,
    }


def _git(*args) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="run.sh's output directory")
    ap.add_argument("--updates", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--segment-len", type=int, required=True)
    ap.add_argument("--num-keys", type=int, required=True)
    ap.add_argument("--streams", type=int, default=16, help="fairseq-eval-lm's --batch-size")
    a = ap.parse_args(argv)
    bounds = recall_bounds(a.segment_len - 1, a.num_keys)
    floors = stream_floors(os.path.join(a.out, "raw", "test.txt"), a.streams, a.segment_len, a.num_keys)
    models = {name: _model(a.out, name) for name in MODELS}
    for r in models.values():
        r["verdict"] = verdict(r["test_loss_bits"], bounds["no_memory_bits"], floors["no_memory_bits"])

    print(f"\n{'model':<16}{'memory flags':<28}{'best update':>12}{'test bits/token':>17}")
    for name, r in models.items():
        print(f"{name:<16}{r['flags']:<28}{str(r['best_update']):>12}{r['test_loss_bits']:>17.4f}")
    print(
        f"\nbest possible without cross-segment memory: {bounds['no_memory_bits']:.4f} bits/token; with it: "
        f"{bounds['memory_bits']:.4f} (on this test stream's segment alignment exactly: "
        f"{floors['no_memory_bits']:.4f} and {floors['memory_bits']:.4f})"
    )
    print("(the key sits exactly one segment before its repeat: only RMT memory or the XL cache can carry it)")
    for name, r in models.items():
        print(f"{name}: {r['verdict']}")

    results = {
        "experiment": "recall",
        "segment_len": a.segment_len,
        "gap": a.segment_len - 1,
        "num_keys": a.num_keys,
        "updates": a.updates,
        "seed": a.seed,
        "bounds_bits": bounds,
        "test_stream_floors_bits": floors,
        "models": models,
        "data_commands": [c.strip() for c in open(f"{a.out}/cmd_data.txt").read().strip().split("\n")],
        "commit": _git("rev-parse", "HEAD") or None,
        "uncommitted_changes": _git("status", "--porcelain", "--", "rmt_fairseq", "user_dir", "examples/recall") != "",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n[recall] wrote {a.out}/results.json")


if __name__ == "__main__":
    main()
