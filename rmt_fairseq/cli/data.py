r"""`rmt-data`: write generated datasets as plain text splits for fairseq-preprocess.

    rmt-data copy      --out DIR [--src-len 24] [--vocab-size 10]      (target: the source twice)
    rmt-data reverse   --out DIR [--src-len 24] [--vocab-size 10]      (target: the source reversed)
    rmt-data associative_retrieval --out DIR [--num-pairs 4]           (target: the queried key's value)
    rmt-data associative_retrieval --out DIR --num-pairs N --pairs-per-segment P [--key-len K]
                                                                       (ARMT's capacity setting: P pairs a
                                                                        segment, the query in the last one)
    rmt-data equations --out DIR                                       (Appendix A.3, 180 chars a sample)
    rmt-data recall    --out DIR [--gap 31] [--num-keys 8]             (LM stream: key recalled later)
    rmt-data memorization {fact_memorization,fact_detection,reasoning} --out DIR [--noise-file TEXT]
                                                                       (1M-token report §3: for
                                                                        --task rmt_long_classification)
    rmt-data classification-dict DIR                                   (dict.txt + labels.txt from DIR's
                                                                        raw-text train split)

Each writes DIR/train.txt, DIR/valid.txt, DIR/test.txt (one sample per line; algorithmic samples are
"source <gen> target", char-level tokens), deterministic from --seed, then binarize with
    fairseq-preprocess --only-source --trainpref DIR/train.txt --validpref DIR/valid.txt \
        --testpref DIR/test.txt --destdir DATA-BIN
Default sizes are the paper's: 100000/5000/10000 samples (equations 100000/10000/20000).

`associative_retrieval --pairs-per-segment P` writes every sample in segments of T = P * (K + 1) + 1 tokens
(P pairs of a K-symbol key and a value, then `|`; the last segment: `|` filler, the queried key, <gen>, its
value) and prints T: train with `--task rmt_algorithmic --tokens-per-sample T`, and each pair stays in its own
segment (rmt_fairseq/data/algorithmic.py's docstring shows the layout).

`memorization` writes no documents: DIR/generator.json (task, noise file, seed, split sizes), DIR/dict.txt
(template and noise words) and DIR/labels.txt; --task rmt_long_classification generates the documents on the
fly at whatever length (--num-segments x --tokens-per-sample) training or evaluation asks for.
"""

import argparse
import json
import os
import sys
from collections import Counter

from rmt_fairseq.data.algorithmic import SYMBOLS, capacity_segment_len, generate
from rmt_fairseq.data.memorization import LOCATIONS, TASKS, Noise, vocabulary
from rmt_fairseq.data.synthetic import recall_bounds, recall_documents


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `error: <message>`, exit status 2, nothing written."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (it holds example commands); every flag that has a value by default shows it
    after its help, as argparse.ArgumentDefaultsHelpFormatter does, but not `(default: None)` or `False`."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _write(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    p = _Parser(prog="rmt-data", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    r = sub.add_parser("recall", help="key recalled one segment later (LM memory test)",
                       formatter_class=HelpFormatter)
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--gap", type=int, default=31, help="fillers between key and repeat; use T-1")
    r.add_argument("--num-keys", type=int, default=8, help="distinct keys")
    r.add_argument("--train-docs", type=int, default=4000, help="training documents")
    r.add_argument("--valid-docs", type=int, default=400, help="validation documents")
    r.add_argument("--test-docs", type=int, default=400, help="test documents")
    r.add_argument("--seed", type=int, default=1, help="random seed")
    algo = {}
    for name, sizes in [("copy", (100000, 5000, 10000)), ("reverse", (100000, 5000, 10000)),
                        ("associative_retrieval", (100000, 5000, 10000)), ("equations", (100000, 10000, 20000))]:
        q = sub.add_parser(name, help=f"the paper's {name} task", formatter_class=HelpFormatter)
        q.add_argument("--out", required=True, help="output directory")
        if name in ("copy", "reverse"):
            q.add_argument("--src-len", type=int, default=24,
                           help="source length; the paper uses 24, 40, 120, 240, 360")
            q.add_argument("--vocab-size", type=int, default=10, help="number of distinct source symbols")
        if name == "associative_retrieval":
            q.add_argument("--num-pairs", type=int, default=4, help="key-value pairs; the paper uses 4")
            q.add_argument("--vocab-size", type=int, default=36, help="symbols for keys and values")
            q.add_argument("--pairs-per-segment", type=int, default=None,
                           help="P: the ARMT paper's capacity layout, P pairs in each segment of "
                                "T = P * (key-len + 1) + 1 tokens and the query in a segment of its own "
                                "(default: all pairs and the query in one source, the RMT paper's)")
            q.add_argument("--key-len", type=int, default=1,
                           help="K: symbols per key (distinct keys: vocab-size ** K)")
        if name == "equations":
            q.add_argument("--no-roots-rate", type=float, default=0.2, help="share of equations without real roots")
        q.add_argument("--train-size", type=int, default=sizes[0], help="training samples")
        q.add_argument("--valid-size", type=int, default=sizes[1], help="validation samples")
        q.add_argument("--test-size", type=int, default=sizes[2], help="test samples")
        q.add_argument("--seed", type=int, default=1, help="random seed")
        algo[name] = q
    m = sub.add_parser("memorization", help="fact memorization / detection / reasoning in noise (6-way)",
                       formatter_class=HelpFormatter)
    m.add_argument("kind", choices=TASKS, help="which of the three tasks")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--noise-file", help="background text (default: generated noise words)")
    m.add_argument("--train-size", type=int, default=10000, help="training documents")
    m.add_argument("--valid-size", type=int, default=1000, help="validation documents")
    m.add_argument("--test-size", type=int, default=1000, help="test documents")
    m.add_argument("--seed", type=int, default=1, help="random seed of the documents")
    c = sub.add_parser("classification-dict", help="dict.txt and labels.txt for a raw-text classification dir",
                       formatter_class=HelpFormatter)
    c.add_argument("dir", help="directory holding train.tsv or train/<label>/*.txt")
    a = p.parse_args(argv)
    if a.task == "memorization":
        return _memorization(m, a)
    if a.task == "classification-dict":
        return _classification_dict(c, a)
    if a.task in algo:
        return _algorithmic(algo[a.task], a)
    for flag, v, low in [("--gap", a.gap, 0), ("--num-keys", a.num_keys, 2), ("--train-docs", a.train_docs, 1),
                         ("--valid-docs", a.valid_docs, 1), ("--test-docs", a.test_docs, 1)]:
        if v < low:
            r.error(f"{flag} must be >= {low}, got {v}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        r.error(f"--out {a.out} exists and is not a directory")
    os.makedirs(a.out, exist_ok=True)
    for i, (split, n) in enumerate([("train", a.train_docs), ("valid", a.valid_docs), ("test", a.test_docs)]):
        _write(os.path.join(a.out, f"{split}.txt"), recall_documents(n, a.gap, a.num_keys, seed=a.seed * 1000 + i))
    b = recall_bounds(a.gap, a.num_keys)
    print(f"wrote {a.out}/{{train,valid,test}}.txt; best loss without memory {b['no_memory_bits']:.4f} bits/token, "
          f"with memory {b['memory_bits']:.4f}")
    return 0


def _memorization(parser, a):
    for flag, v in [("--train-size", a.train_size), ("--valid-size", a.valid_size), ("--test-size", a.test_size)]:
        if v < 1:
            parser.error(f"{flag} must be >= 1, got {v}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        parser.error(f"--out {a.out} exists and is not a directory")
    try:
        noise = Noise(os.path.abspath(a.noise_file) if a.noise_file else None)
    except ValueError as e:
        parser.error(str(e))
    os.makedirs(a.out, exist_ok=True)
    spec = {"task": a.kind, "noise_file": noise.path, "seed": a.seed,
            "sizes": {"train": a.train_size, "valid": a.valid_size, "test": a.test_size}}
    _write(os.path.join(a.out, "generator.json"), [json.dumps(spec, indent=1)])
    words = vocabulary(noise)
    _write_dict(os.path.join(a.out, "dict.txt"), words)
    _write(os.path.join(a.out, "labels.txt"), LOCATIONS)
    print(f"wrote {a.out}/generator.json, dict.txt ({len(words)} words), labels.txt ({a.kind}: "
          f"{a.train_size}/{a.valid_size}/{a.test_size} documents, generated on the fly)")
    return 0


def _write_dict(path, counts):
    """dict.txt written by fairseq's own Dictionary: most frequent first, its special symbols left out (a
    duplicate would make Dictionary.load fail)."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for w in sorted(counts):  # equal counts stay in alphabetical order
        d.add_symbol(w, n=counts[w])
    d.finalize(padding_factor=1)
    tmp = path + ".tmp"
    d.save(tmp)
    os.replace(tmp, path)


def _classification_dict(parser, a):
    from rmt_fairseq.data.documents import read_documents
    from rmt_fairseq.errors import RMTConfigError

    try:
        docs = read_documents(a.dir, "train")
    except RMTConfigError as e:
        parser.error(str(e))
    if docs is None:
        parser.error(f"{a.dir} has no train split: expected {a.dir}/train.tsv or {a.dir}/train/<label>/*.txt")
    counts = Counter(w for _, text in docs for w in text.split())
    labels = sorted({lab for lab, _ in docs})
    if len(labels) < 2:
        parser.error(f"{a.dir}: the train split has {len(labels)} label(s) {labels}; need at least 2")
    if os.path.exists(os.path.join(a.dir, "dict.txt")):
        parser.error(f"{os.path.join(a.dir, 'dict.txt')} exists; remove it first (nothing was written)")
    _write_dict(os.path.join(a.dir, "dict.txt"), counts)
    if os.path.exists(os.path.join(a.dir, "labels.txt")):  # the user's own class order stays
        print(f"wrote {a.dir}/dict.txt ({len(counts)} words); kept the existing labels.txt")
        return 0
    _write(os.path.join(a.dir, "labels.txt"), labels)
    print(f"wrote {a.dir}/dict.txt ({len(counts)} words) and labels.txt ({len(labels)} classes: {' '.join(labels)})")
    return 0


def _algorithmic(parser, a):
    kwargs = {}
    for flag, key, low in [("--src-len", "src_len", 1), ("--vocab-size", "vocab_size", 2),
                           ("--num-pairs", "num_pairs", 1), ("--pairs-per-segment", "pairs_per_segment", 1),
                           ("--key-len", "key_len", 1)]:
        if getattr(a, key, None) is not None:
            if getattr(a, key) < low:
                parser.error(f"{flag} must be >= {low}, got {getattr(a, key)}")
            kwargs[key] = getattr(a, key)
    if hasattr(a, "vocab_size") and a.vocab_size > len(SYMBOLS):
        parser.error(f"--vocab-size must be in [2, {len(SYMBOLS)}] (the symbols a-z, 0-9), got {a.vocab_size}")
    if hasattr(a, "num_pairs") and a.num_pairs > a.vocab_size ** a.key_len:
        parser.error(f"--num-pairs {a.num_pairs} needs distinct keys: at most --vocab-size ({a.vocab_size}) ** "
                     f"--key-len ({a.key_len}) = {a.vocab_size ** a.key_len}")
    if hasattr(a, "no_roots_rate"):
        if not 0 <= a.no_roots_rate <= 1:
            parser.error(f"--no-roots-rate must be in [0, 1], got {a.no_roots_rate}")
        kwargs["no_roots_rate"] = a.no_roots_rate
    for flag, v in [("--train-size", a.train_size), ("--valid-size", a.valid_size), ("--test-size", a.test_size)]:
        if v < 1:
            parser.error(f"{flag} must be >= 1, got {v}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        parser.error(f"--out {a.out} exists and is not a directory")
    os.makedirs(a.out, exist_ok=True)
    try:
        for i, (split, n) in enumerate([("train", a.train_size), ("valid", a.valid_size), ("test", a.test_size)]):
            _write(os.path.join(a.out, f"{split}.txt"), generate(a.task, n, seed=a.seed * 1000 + i, **kwargs))
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {a.out}/{{train,valid,test}}.txt ({a.task}: {a.train_size}/{a.valid_size}/{a.test_size})")
    if getattr(a, "pairs_per_segment", None):
        T = capacity_segment_len(a.pairs_per_segment, a.key_len)
        S = -(-a.num_pairs // a.pairs_per_segment) + 1
        print(f"capacity layout: {S} segments of {T} tokens ({a.num_pairs} pairs, {a.pairs_per_segment} a segment, "
              f"then the query): train with --task rmt_algorithmic --tokens-per-sample {T}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
