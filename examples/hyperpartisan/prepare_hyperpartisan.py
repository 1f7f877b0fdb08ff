"""SemEval-2019 Task 4 (Hyperpartisan News Detection, by-article) -> --task rmt_long_classification data.

    python examples/hyperpartisan/prepare_hyperpartisan.py \\
        --articles articles-training-byarticle-20181122.xml \\
        --ground-truth ground-truth-training-byarticle-20181122.xml \\
        --roberta-dir roberta.base --encoder-json encoder.json --vocab-bpe vocab.bpe \\
        [--splits hp-splits.json] --out DATA

Writes DATA/{train,valid,test}.tsv (`true|false<TAB>GPT-2 BPE ids`, the encoding fairseq's RoBERTa reads, as
fairseq's examples/roberta/multiprocessing_bpe_encoder.py writes it), DATA/dict.txt (roberta.base's own) and
DATA/labels.txt (false, true). --splits takes the Longformer paper's split file (a JSON {"train": [ids], "dev":
[ids], "test": [ids]}; Beltagy et al. 2020 used 516/64/65 of the 645 articles); without it, a seeded 80/10/10
split. --no-bpe writes whitespace words instead (then build dict.txt with `rmt-data classification-dict`).
"""

import argparse
import json
import os
import random
import re
import shutil
import sys
import xml.etree.ElementTree as ET


def norm(i):
    """Article ids: "0000123" in the XML, 123 in the split file; compared as integers."""
    return int(i) if str(i).isdigit() else str(i)


def read_articles(path):
    """{id: text} from the articles XML: the title, then the paragraphs' text, whitespace collapsed."""
    out = {}
    for _, el in ET.iterparse(path, events=("end",)):
        if el.tag == "article":
            text = " ".join([el.get("title", "")] + ["".join(el.itertext())])
            out[norm(el.get("id"))] = re.sub(r"\s+", " ", text).strip()
            el.clear()
    return out


def read_labels(path):
    """{id: "true"|"false"} from the ground-truth XML."""
    return {norm(el.get("id")): el.get("hyperpartisan") for el in ET.parse(path).getroot().iter("article")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--articles", required=True, help="articles-training-byarticle-*.xml")
    ap.add_argument("--ground-truth", required=True, help="ground-truth-training-byarticle-*.xml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--splits", help="split file with train/dev/test article ids (JSON)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--roberta-dir", help="the unpacked roberta.base (for its dict.txt)")
    ap.add_argument("--encoder-json", help="GPT-2 BPE encoder.json")
    ap.add_argument("--vocab-bpe", help="GPT-2 BPE vocab.bpe")
    ap.add_argument("--no-bpe", action="store_true", help="whitespace words instead of GPT-2 BPE ids")
    a = ap.parse_args(argv)
    for flag, path in [("--articles", a.articles), ("--ground-truth", a.ground_truth), ("--splits", a.splits)]:
        if path and not os.path.isfile(path):
            ap.error(f"{flag} {path}: no such file")
    if not a.no_bpe:
        for flag, path in [("--encoder-json", a.encoder_json), ("--vocab-bpe", a.vocab_bpe),
                           ("--roberta-dir", a.roberta_dir and os.path.join(a.roberta_dir, "dict.txt"))]:
            if not path or not os.path.isfile(path):
                ap.error(f"{flag}: {path or 'missing'} (needed for GPT-2 BPE; or pass --no-bpe)")

    texts, labels = read_articles(a.articles), read_labels(a.ground_truth)
    missing = sorted(set(labels) - set(texts))
    if missing:
        ap.error(f"--ground-truth names {len(missing)} articles not in --articles, e.g. {missing[:3]}")
    ids = sorted(labels, key=str)
    if a.splits:
        with open(a.splits) as f:
            sp = json.load(f)
        splits = {"train": sp["train"], "valid": sp.get("dev", sp.get("valid")), "test": sp["test"]}
        splits = {k: [norm(i) for i in v] for k, v in splits.items()}
    else:
        rng = random.Random(a.seed)
        rng.shuffle(ids)
        n = len(ids)
        splits = {"train": ids[: int(0.8 * n)], "valid": ids[int(0.8 * n) : int(0.9 * n)], "test": ids[int(0.9 * n) :]}

    if a.no_bpe:
        encode = str.split
    else:
        from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

        bpe = get_encoder(a.encoder_json, a.vocab_bpe)
        encode = lambda text: [str(t) for t in bpe.encode(text)]  # noqa: E731
    os.makedirs(a.out, exist_ok=True)
    for split, members in splits.items():
        unknown = [i for i in members if i not in labels]
        if unknown:
            ap.error(f"--splits: {split} has ids not in --ground-truth, e.g. {unknown[:3]}")
        tmp = os.path.join(a.out, f"{split}.tsv.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for i in members:
                f.write(f"{labels[i]}\t{' '.join(encode(texts[i]))}\n")
        os.replace(tmp, os.path.join(a.out, f"{split}.tsv"))
        print(f"{split}: {len(members)} articles")
    with open(os.path.join(a.out, "labels.txt"), "w") as f:
        f.write("false\ntrue\n")
    if not a.no_bpe:
        shutil.copy(os.path.join(a.roberta_dir, "dict.txt"), os.path.join(a.out, "dict.txt"))
    print(f"wrote {a.out}/{{train,valid,test}}.tsv and labels.txt" + ("" if a.no_bpe else " and dict.txt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
