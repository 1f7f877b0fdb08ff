"""Split a raw text file 90/5/5 in order and tokenize it for fairseq-preprocess (called by prepare.sh).

    python prepare_text.py RAW OUT --level word|bpe|char [--lang en] [--vocab-size 8000] [--workers N]

Writes OUT/text/{train,valid,test}.txt (the raw splits), OUT/tok/{train,valid,test}.txt (one token sequence per
line, tokens separated by single spaces: what fairseq-preprocess reads), OUT/splits.json (lines and characters
per split) and, for --level bpe, OUT/spm.model, OUT/spm.vocab and OUT/spm.dict.txt (every piece, as a fairseq
dictionary for fairseq-preprocess --srcdict).

The split is by characters, cut at line boundaries: train ends at the line boundary nearest to 90% of the
file's characters, valid at the one nearest to 95%, test is the rest. Lines are never reordered or shuffled, so
valid and test are text the model has not seen, continuing where train stops.
"""

import argparse
import bisect
import json
import os
import sys
from collections import Counter

SPLITS = ("train", "valid", "test")
FRACTIONS = (0.90, 0.95)  # cumulative character fractions where train and valid end
SPACE = "\u2581"  # "▁": a visible space for char level (fairseq splits lines on whitespace)


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def split_lines(lines):
    """Cut the lines at the boundaries nearest to 90% and 95% of the characters. Every split gets >= 1 line."""
    n = len(lines)
    if n < 3:
        fail(f"the raw text has {n} line(s): at least 3 are needed for train/valid/test (the split is at line ends)")
    cum = [0]  # cum[i] = characters in lines[:i] (newlines included)
    for line in lines:
        cum.append(cum[-1] + len(line))
    cuts = []
    for frac in FRACTIONS:
        target = frac * cum[-1]
        i = bisect.bisect_left(cum, target)  # nearest boundary: i or i - 1
        if i > 0 and (i == len(cum) or target - cum[i - 1] <= cum[i] - target):
            i -= 1
        cuts.append(i)
    a, b = cuts
    a = min(max(a, 1), n - 2)  # a line too long to cut near 90%/95% still leaves valid and test one line each
    b = min(max(b, a + 1), n - 1)
    return lines[:a], lines[a:b], lines[b:]


def tokenize_word(lines, lang: str, workers: int):
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    # escape=False: keep & < > ' " as they are (escape=True writes &amp; &lt; ... into the vocabulary)
    fn = _MosesLine(tok)
    if workers > 1 and len(lines) > 10000:
        from multiprocessing import Pool

        with Pool(workers) as pool:
            return pool.map(fn, lines, chunksize=2000)
    return [fn(line) for line in lines]


class _MosesLine:  # a picklable callable for multiprocessing
    def __init__(self, tok):
        self.tok = tok

    def __call__(self, line: str) -> str:
        return self.tok.tokenize(line, escape=False, return_str=True)


def tokenize_char(lines):
    # every whitespace character inside a line (space, tab, no-break space ...) becomes "▁"; the newline is the
    # line end, which fairseq-preprocess turns into the end-of-sentence token
    return [" ".join(SPACE if c.isspace() else c for c in line) for line in lines]


def train_bpe(train_file: str, prefix: str, vocab_size: int, coverage: float, workers: int) -> int:
    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.train(
            input=train_file,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=coverage,
            # vocab_size is an upper bound: a small corpus gets the pieces it supports instead of an error
            hard_vocab_limit=False,
            num_threads=workers,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. fewer pieces allowed than the corpus has characters
        fail(
            f"sentencepiece training failed (VOCAB_SIZE={vocab_size}, COVERAGE={coverage}): "
            f"{str(e).splitlines()[0].split('] ')[-1]}"
        )
    return spm.SentencePieceProcessor(model_file=prefix + ".model").get_piece_size()


def write_bpe_dict(sp, train_tok, path: str):
    """fairseq dict.txt holding every sentencepiece piece (counts from train). Built from train's tokens alone,
    the dictionary would lack pieces that valid/test use but train's segmentation never produces: <unk>s."""
    counts = Counter(t for line in train_tok for t in line.split())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]
    with open(path, "w", encoding="utf-8") as f:
        for piece in sorted(pieces, key=lambda x: -counts[x]):  # stable: unseen pieces keep spm's order
            f.write(f"{piece} {counts[piece]}\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raw", help="raw text file (UTF-8)")
    p.add_argument("out", help="output directory")
    p.add_argument("--level", required=True, help="word (Moses), bpe (sentencepiece) or char")
    p.add_argument("--lang", default="en", help="Moses tokenizer language (word level)")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size, upper bound (bpe)")
    p.add_argument("--character-coverage", type=float, default=1.0, help="sentencepiece character coverage (bpe)")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()

    if a.level not in ("word", "bpe", "char"):
        fail(f"LEVEL must be word, bpe or char, got {a.level!r}")
    if not os.path.isfile(a.raw):
        fail(f"raw text file not found: {a.raw}")
    if a.vocab_size < 4:
        fail(f"VOCAB_SIZE must be >= 4, got {a.vocab_size}")
    try:
        with open(a.raw, encoding="utf-8") as f:  # universal newlines: \r\n and \r end lines too
            text = f.read()
    except UnicodeDecodeError as e:
        fail(f"{a.raw} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not text.strip():
        fail(f"raw text file is empty (whitespace only): {a.raw}")
    if a.level == "char" and SPACE in text:
        print(f"warning: {a.raw} contains {SPACE!r}, which char level also uses for spaces", file=sys.stderr)
    # lines end at "\n" only, as fairseq-preprocess reads them (not at str.splitlines' \x0b, \u2028 ...)
    lines = [line + "\n" for line in text.removesuffix("\n").split("\n")]

    splits = dict(zip(SPLITS, split_lines(lines)))
    for d in ("text", "tok"):
        os.makedirs(os.path.join(a.out, d), exist_ok=True)
    for name, part in splits.items():
        with open(os.path.join(a.out, "text", f"{name}.txt"), "w", encoding="utf-8") as f:
            f.writelines(part)
    total = sum(len(line) for line in lines)
    stats = {name: {"lines": len(part), "chars": sum(len(x) for x in part)} for name, part in splits.items()}
    for name in SPLITS:
        stats[name]["fraction"] = round(stats[name]["chars"] / total, 4)
    with open(os.path.join(a.out, "splits.json"), "w") as f:
        json.dump({"raw": os.path.abspath(a.raw), "level": a.level, **stats}, f, indent=1)
    print(
        "split (by characters, at line ends): "
        + ", ".join(
            f"{n} {stats[n]['lines']} lines / {stats[n]['chars']} chars ({100 * stats[n]['fraction']:.1f}%)"
            for n in SPLITS
        )
    )

    if a.level == "bpe":
        import sentencepiece as spm

        prefix = os.path.join(a.out, "spm")
        size = train_bpe(
            os.path.join(a.out, "text", "train.txt"), prefix, a.vocab_size, a.character_coverage, a.workers
        )
        print(f"sentencepiece BPE trained on train: {size} pieces (asked for at most {a.vocab_size})")
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    for name, part in splits.items():
        part = [line[:-1] for line in part]  # without the newline
        if a.level == "word":
            tok = tokenize_word(part, a.lang, a.workers)
        elif a.level == "char":
            tok = tokenize_char(part)
        else:
            tok = [" ".join(pieces) for pieces in sp.encode(part, out_type=str)]
            if name == "train":
                write_bpe_dict(sp, tok, os.path.join(a.out, "spm.dict.txt"))
        with open(os.path.join(a.out, "tok", f"{name}.txt"), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in tok)


if __name__ == "__main__":
    main()
