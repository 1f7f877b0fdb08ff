"""Labelled long documents for --task rmt_long_classification: raw-text formats and generated memorization data.

Legend: B documents, S segments, T segment length.

Raw text (what users bring, e.g. Hyperpartisan), in the data directory next to dict.txt:
  {split}.tsv                 one document per line: `label<TAB>text`
  {split}/{label}/*.txt       or a directory per class, one document per file
Text is split on whitespace and looked up in dict.txt (fairseq's default tokenizer); pre-encode with BPE
first when the dictionary is a BPE one (examples/hyperpartisan).

Generated (rmt-data memorization): {data}/generator.json names the task, the noise file and the split sizes;
documents are made on the fly at the current number of segments (the curriculum's stage), so the same data
directory serves 1 to millions of tokens.

Batches (the segment loop's input): src_tokens B x S*T (pad after each document's end), target B x S*T holding
IGNORE everywhere except the first position of each document's last segment, which holds the class index:
the loss of a document is taken on the segment that ends it (rmt_encoder.segment_loss).
"""

import json
import math
import os
import random
from typing import List, Optional, Tuple

import numpy as np
import torch
from fairseq.data import FairseqDataset

from rmt_fairseq.data.memorization import Noise, sample
from rmt_fairseq.errors import RMTConfigError

IGNORE = -100  # target value that is not scored (torch's cross-entropy default)
GENERATOR_FILE = "generator.json"


def read_labels(data: str, train_docs: Optional[List[Tuple[str, str]]]) -> List[str]:
    """labels.txt (one label per line, in class-index order) if present, else the sorted train labels."""
    path = os.path.join(data, "labels.txt")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            labels = [ln.strip() for ln in f if ln.strip()]
    elif train_docs is not None:
        labels = sorted({lab for lab, _ in train_docs})
    else:
        raise RMTConfigError(f"{path} does not exist and there is no train split to read labels from: write the "
                             f"class labels one per line in {path}")
    if len(labels) < 2:
        raise RMTConfigError(f"{path if os.path.exists(path) else data}: need at least 2 classes, got {labels}")
    return labels


def read_documents(data: str, split: str) -> Optional[List[Tuple[str, str]]]:
    """[(label, text)] of a raw-text split, or None when the split does not exist."""
    tsv, folder = os.path.join(data, f"{split}.tsv"), os.path.join(data, split)
    if os.path.isfile(tsv):
        docs = []
        with open(tsv, encoding="utf-8") as f:
            for n, ln in enumerate(f, 1):
                ln = ln.rstrip("\n")
                if not ln.strip():
                    continue
                if "\t" not in ln:
                    raise RMTConfigError(f"{tsv}, line {n}: expected `label<TAB>text`, got {ln[:60]!r}")
                label, text = ln.split("\t", 1)
                docs.append((label.strip(), text))
        return docs
    if os.path.isdir(folder):
        docs = []
        for label in sorted(os.listdir(folder)):
            d = os.path.join(folder, label)
            if not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d)):
                with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                    docs.append((label, f.read()))
        if not docs:
            raise RMTConfigError(f"{folder}: no documents (expected {folder}/<label>/<file>)")
        return docs
    return None


def encode(dictionary, words: List[str]) -> torch.Tensor:
    return torch.tensor([dictionary.index(w) for w in words], dtype=torch.long)


def collate(items: List[dict], seg_len: int, pad: int) -> dict:
    """Documents -> one batch of whole segments (see the module docstring for the target layout)."""
    if not items:
        return {}
    T = seg_len
    n_seg = [max(1, math.ceil(len(it["tokens"]) / T)) for it in items]
    S = max(n_seg)
    src = torch.full((len(items), S * T), pad, dtype=torch.long)  # B x S*T
    tgt = torch.full((len(items), S * T), IGNORE, dtype=torch.long)  # B x S*T
    for b, (it, n) in enumerate(zip(items, n_seg)):
        src[b, : len(it["tokens"])] = it["tokens"]
        tgt[b, (n - 1) * T] = it["label"]
    return {
        "id": torch.tensor([it["id"] for it in items]),
        "nsentences": len(items),
        "ntokens": int(src.ne(pad).sum()),
        "net_input": {"src_tokens": src, "segment_len": T},
        "target": tgt,
        "labels": torch.tensor([it["label"] for it in items]),
        "num_segments": S,
    }


class _DocumentDataset(FairseqDataset):
    def __init__(self, seg_len: int, pad: int, num_segments: Optional[int]):
        super().__init__()
        self.seg_len, self.pad = seg_len, pad
        self.num_segments = num_segments  # the curriculum's stage (None: whole documents)

    def collater(self, items):
        return collate(items, self.seg_len, self.pad)

    def num_tokens(self, index):
        return self.size(index)

    def ordered_indices(self):
        return np.arange(len(self))


class TextDocumentDataset(_DocumentDataset):
    """Raw-text documents, cropped to their first `num_segments` segments when that is set."""

    def __init__(self, docs: List[Tuple[str, str]], labels: List[str], dictionary, seg_len: int,
                 num_segments: Optional[int], source: str):
        super().__init__(seg_len, dictionary.pad(), num_segments)
        index = {lab: i for i, lab in enumerate(labels)}
        unknown = sorted({lab for lab, _ in docs if lab not in index})
        if unknown:
            raise RMTConfigError(f"{source}: labels {unknown[:5]} are not among the classes {labels}")
        self.tokens = [encode(dictionary, text.split()) for _, text in docs]
        self.labels = [index[lab] for lab, _ in docs]
        self.sizes = np.array([len(t) for t in self.tokens])

    def __getitem__(self, i):
        tokens = self.tokens[i]
        if self.num_segments:
            tokens = tokens[: self.num_segments * self.seg_len]
        return {"id": i, "tokens": tokens, "label": self.labels[i]}

    def __len__(self):
        return len(self.tokens)

    def size(self, index):
        n = int(self.sizes[index])
        return min(n, self.num_segments * self.seg_len) if self.num_segments else n


class GeneratedDocumentDataset(_DocumentDataset):
    """Memorization documents of exactly num_segments x T tokens, generated when indexed; with `mix`
    (--curriculum-mix), document i has n_i x T tokens, n_i drawn uniformly from 1..num_segments by a generator
    seeded with (split seed, i, num_segments), so a batch mixes lengths (collate pads it to the longest)."""

    def __init__(self, spec: dict, split: str, labels: List[str], dictionary, seg_len: int, num_segments: int,
                 noise: Noise, mix: bool = False):
        super().__init__(seg_len, dictionary.pad(), num_segments)
        self.mix = mix
        self.spec, self.split, self.dictionary, self.noise = spec, split, dictionary, noise
        self.label_index = {lab: i for i, lab in enumerate(labels)}
        self.count = int(spec["sizes"][split])
        self.seed = int(spec["seed"]) + SPLIT_SEED_OFFSET[split]

    def document(self, i: int, length: Optional[int] = None):
        return sample(self.spec["task"], i, self.seed, length or self.num_segments * self.seg_len, self.noise)

    def segments_of(self, i: int) -> int:
        """Document i's length in segments: the stage's, or with `mix` its own draw from 1..stage."""
        if not self.mix:
            return self.num_segments
        return 1 + random.Random(f"mix/{self.seed}/{i}/{self.num_segments}").randrange(self.num_segments)

    def __getitem__(self, i):
        doc = self.document(i, self.segments_of(i) * self.seg_len)
        return {"id": i, "tokens": encode(self.dictionary, doc.tokens()), "label": self.label_index[doc.label]}

    def __len__(self):
        return self.count

    def size(self, index):
        return self.num_segments * self.seg_len

    @property
    def sizes(self):
        return np.full(len(self), self.num_segments * self.seg_len)


SPLIT_SEED_OFFSET = {"train": 0, "valid": 1_000_003, "test": 2_000_003}


def read_generator(data: str) -> Optional[dict]:
    path = os.path.join(data, GENERATOR_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            spec = json.load(f)
        for k in ("task", "seed", "sizes"):
            spec[k]
    except (ValueError, KeyError) as e:
        raise RMTConfigError(f"{path} is not a generator spec written by rmt-data memorization ({e})") from None
    return spec


def generator_noise(spec: dict, data: str) -> Noise:
    path = spec.get("noise_file")
    if path is not None and not os.path.isabs(path):
        path = os.path.join(data, path)
    try:
        return Noise(path)
    except ValueError as e:
        raise RMTConfigError(f"{os.path.join(data, GENERATOR_FILE)}: {e}") from None

