"""enwik8 -> byte-token text files for fairseq-preprocess, as Transformer-XL prepares enwik8 (called by prepare.sh).

    python prepare_enwik8.py INPUT OUT [--train-bytes 90000000] [--valid-bytes 5000000] [--test-bytes 5000000]

INPUT is enwik8.zip (its member "enwik8" is read) or the unzipped enwik8 file. What Transformer-XL's getdata.sh
runs, salesforce/awd-lstm-lm data/enwik8/prep_enwik8.py, is reproduced exactly: train = the first 90,000,000
bytes, valid = the next 5,000,000, test = the last 5,000,000; every byte is written as its decimal value, tokens
separated by single spaces, except the newline byte (10), which is written as a line break, so each original line
is one text line. OUT/{train,valid,test}.txt are byte-identical to that script's train.txt, valid.txt, test.txt.
fairseq-preprocess turns every line end into </s>, so the newline byte is the token </s> (Transformer-XL's own
loader drops line ends for enwik8 instead: add_eos=False in its data_utils.py).

Also written: OUT/dict.txt, every byte value found in any split except 10 (the count is train's), most frequent
first, for fairseq-preprocess --srcdict (Transformer-XL's vocabulary also counts all three splits; a dictionary
built from train alone would turn a byte that only valid or test contains into <unk>), and OUT/splits.json
(bytes and lines per split). The split sizes can be changed for tests on small files; they must add up to the
input's size (enwik8 is 100,000,000 bytes), so a different file is not silently cut like enwik8.
"""

import argparse
import io
import json
import os
import sys
import zipfile

import numpy as np

SPLITS = ("train", "valid", "test")
DEFAULT_BYTES = {"train": 90_000_000, "valid": 5_000_000, "test": 5_000_000}
NEWLINE = 10
TOKENS = [str(b) for b in range(256)]
TOKENS[NEWLINE] = "\n"  # as prep_enwik8.py: the newline byte ends the text line
CHUNK = 1 << 20  # bytes tokenized at a time (the joined file is the same; memory stays small)


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_input(path: str) -> bytes:
    if not os.path.isfile(path):
        fail(f"input not found: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "enwik8" not in names:
                fail(f"{path} is a zip without a member named 'enwik8' (members: {', '.join(names[:5])})")
            return z.read("enwik8")
    with open(path, "rb") as f:
        return f.read()


def write_tokens(part: bytes, path: str):
    """The tokens of all bytes joined by single spaces, written chunk by chunk (prep_enwik8.py joins once)."""
    with io.open(path, "w", encoding="ascii", newline="\n") as f:
        for start in range(0, len(part), CHUNK):
            if start:
                f.write(" ")
            f.write(" ".join([TOKENS[b] for b in part[start : start + CHUNK]]))


def write_dict(data: bytes, train: bytes, path: str) -> int:
    present = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    counts = np.bincount(np.frombuffer(train, dtype=np.uint8), minlength=256)
    symbols = [b for b in range(256) if present[b] and b != NEWLINE]  # newline is </s>, not a symbol
    symbols.sort(key=lambda b: (-counts[b], b))
    with open(path, "w", encoding="ascii") as f:
        f.writelines(f"{b} {counts[b]}\n" for b in symbols)
    return len(symbols)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("input", help="enwik8.zip or the unzipped enwik8 file")
    p.add_argument("out", help="output directory for train.txt, valid.txt, test.txt, dict.txt, splits.json")
    for name in SPLITS:
        p.add_argument(
            f"--{name}-bytes",
            type=int,
            default=DEFAULT_BYTES[name],
            help=f"bytes in {name} (default {DEFAULT_BYTES[name]:,}, as prep_enwik8.py)",
        )
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    sizes = {name: getattr(a, f"{name}_bytes") for name in SPLITS}
    for name, n in sizes.items():
        if n < 1:
            fail(f"--{name}-bytes must be >= 1, got {n}")
    data = read_input(a.input)
    total = sum(sizes.values())
    if len(data) != total:
        fail(
            f"{a.input} has {len(data):,} bytes but --train-bytes + --valid-bytes + --test-bytes = {total:,} "
            f"({sizes['train']:,} + {sizes['valid']:,} + {sizes['test']:,}); enwik8 is 100,000,000 bytes"
        )

    os.makedirs(a.out, exist_ok=True)
    stats, start = {}, 0
    for name in SPLITS:
        part = data[start : start + sizes[name]]
        start += sizes[name]
        write_tokens(part, os.path.join(a.out, f"{name}.txt"))
        stats[name] = {"bytes": len(part), "newlines": part.count(NEWLINE)}
        print(f"{name}: {len(part):,} bytes, {stats[name]['newlines']:,} newline bytes")
    n_symbols = write_dict(data, data[: sizes["train"]], os.path.join(a.out, "dict.txt"))
    with open(os.path.join(a.out, "splits.json"), "w") as f:
        json.dump(
            {"input": os.path.abspath(a.input), "input_bytes": len(data), "symbols": n_symbols, **stats}, f, indent=1
        )
    print(f"dictionary: {n_symbols} byte symbols (+ </s> for the newline byte): {os.path.join(a.out, 'dict.txt')}")


if __name__ == "__main__":
    main()
