"""`rmt-data`: write generated corpora as plain text splits for fairseq-preprocess.

    rmt-data recall --out DIR [--gap 31] [--num-keys 8] [--train-docs 4000] [--valid-docs 400] [--seed 1]

writes DIR/train.txt, DIR/valid.txt, DIR/test.txt (one document per line).
"""

import argparse
import os
import sys

from rmt_fairseq.data.synthetic import recall_bounds, recall_documents


def _write(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="rmt-data", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    r = sub.add_parser("recall", help="key recalled one segment later (LM memory test)")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--gap", type=int, default=31, help="fillers between key and repeat (use T-1)")
    r.add_argument("--num-keys", type=int, default=8)
    r.add_argument("--train-docs", type=int, default=4000)
    r.add_argument("--valid-docs", type=int, default=400)
    r.add_argument("--test-docs", type=int, default=400)
    r.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    for flag, v, low in [("--gap", a.gap, 0), ("--num-keys", a.num_keys, 2), ("--train-docs", a.train_docs, 1),
                         ("--valid-docs", a.valid_docs, 1), ("--test-docs", a.test_docs, 1)]:
        if v < low:
            p.error(f"{flag} must be >= {low}, got {v}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} exists and is not a directory")
    os.makedirs(a.out, exist_ok=True)
    for i, (split, n) in enumerate([("train", a.train_docs), ("valid", a.valid_docs), ("test", a.test_docs)]):
        _write(os.path.join(a.out, f"{split}.txt"), recall_documents(n, a.gap, a.num_keys, seed=a.seed * 1000 + i))
    b = recall_bounds(a.gap, a.num_keys)
    print(f"wrote {a.out}/{{train,valid,test}}.txt; best loss without memory {b['no_memory_bits']:.4f} bits/token, "
          f"with memory {b['memory_bits']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
