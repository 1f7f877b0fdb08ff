"""Labelled long documents: raw-text formats, labels, the batch layout (target on each document's last segment),
the text and generated datasets, and the `rmt-data memorization` / `classification-dict` commands."""

import json
import math
import os

import pytest
import torch
from fairseq.data import Dictionary

from rmt_fairseq.cli.data import main as rmt_data
from rmt_fairseq.data.documents import (
    IGNORE,
    GeneratedDocumentDataset,
    TextDocumentDataset,
    collate,
    encode,
    generator_noise,
    read_documents,
    read_generator,
    read_labels,
)
from rmt_fairseq.data.memorization import LOCATIONS, Noise, template_words
from rmt_fairseq.errors import RMTConfigError

DOCS = [
    ("pos", "a good film , really good"),
    ("neg", "a bad film"),
    ("pos", "fine acting and a fine plot"),
    ("mid", "neither good nor bad"),
    ("neg", "bad bad bad plot"),
]


def _write_tsv(data, split, docs):
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, f"{split}.tsv"), "w") as f:
        f.writelines(f"{lab}\t{text}\n" for lab, text in docs)


def _write_dirs(data, split, docs):
    for i, (lab, text) in enumerate(docs):
        os.makedirs(os.path.join(data, split, lab), exist_ok=True)
        with open(os.path.join(data, split, lab, f"doc{i}.txt"), "w") as f:
            f.write(text)


def _dictionary(docs):
    d = Dictionary()
    for _, text in docs:
        for w in text.split():
            d.add_symbol(w)
    return d


def test_tsv_and_directory_per_class_read_the_same(tmp_path):
    _write_tsv(str(tmp_path / "a"), "train", DOCS)
    _write_dirs(str(tmp_path / "b"), "train", DOCS)
    a, b = read_documents(str(tmp_path / "a"), "train"), read_documents(str(tmp_path / "b"), "train")
    assert sorted(a) == sorted(b) == sorted(DOCS)
    assert read_documents(str(tmp_path / "a"), "valid") is None  # a missing split


def test_tsv_blank_lines_skipped_and_text_keeps_its_tabs(tmp_path):
    (tmp_path / "train.tsv").write_text("pos\tgood\n\nneg\tbad\tworse\n")
    assert read_documents(str(tmp_path), "train") == [("pos", "good"), ("neg", "bad\tworse")]


def test_tsv_line_without_tab_names_file_and_line(tmp_path):
    (tmp_path / "train.tsv").write_text("pos\tgood film\n\nneg bad film\n")
    with pytest.raises(RMTConfigError) as e:
        read_documents(str(tmp_path), "train")
    assert str(tmp_path / "train.tsv") in str(e.value) and "line 3" in str(e.value)


def test_labels_default_to_sorted_train_labels_and_labels_txt_overrides(tmp_path):
    data = str(tmp_path)
    assert read_labels(data, DOCS) == ["mid", "neg", "pos"]
    (tmp_path / "labels.txt").write_text("pos\nneg\n\nmid\n")
    assert read_labels(data, DOCS) == ["pos", "neg", "mid"]
    assert read_labels(data, None) == ["pos", "neg", "mid"]
    os.remove(tmp_path / "labels.txt")
    with pytest.raises(RMTConfigError, match="labels.txt"):
        read_labels(data, None)


def test_unknown_label_in_a_split_is_named(tmp_path):
    docs = DOCS + [("sarcastic", "oh great another film")]
    with pytest.raises(RMTConfigError, match="sarcastic"):
        TextDocumentDataset(docs, ["mid", "neg", "pos"], _dictionary(docs), 8, None, source=str(tmp_path / "valid"))


def test_collate_target_on_the_first_position_of_each_last_segment():
    T, pad = 8, 1
    lengths, labels = [5, 16, 17, 8, 9], [2, 0, 1, 3, 4]
    items = [{"id": i, "tokens": torch.arange(10, 10 + n), "label": lab}
             for i, (n, lab) in enumerate(zip(lengths, labels))]
    batch = collate(items, T, pad)
    S = 3
    src, tgt = batch["net_input"]["src_tokens"], batch["target"]
    assert src.shape == tgt.shape == (5, S * T) and batch["net_input"]["segment_len"] == T
    assert batch["num_segments"] == S and batch["nsentences"] == 5 and batch["ntokens"] == sum(lengths)
    assert batch["labels"].tolist() == labels and batch["id"].tolist() == [0, 1, 2, 3, 4]
    for b, (n, lab) in enumerate(zip(lengths, labels)):
        assert src[b, :n].tolist() == list(range(10, 10 + n))
        assert (src[b, n:] == pad).all()
        last = (math.ceil(n / T) - 1) * T  # first position of the document's last segment
        scored = (tgt[b] != IGNORE).nonzero().flatten().tolist()
        assert scored == [last] and tgt[b, last] == lab
    assert collate([], T, pad) == {}


def test_text_dataset_crops_to_num_segments():
    docs = [("pos", " ".join(f"w{i}" for i in range(30))), ("neg", "w1 w2 w3")]
    d = Dictionary()
    for i in range(30):
        d.add_symbol(f"w{i}")
    ds = TextDocumentDataset(docs, ["neg", "pos"], d, 8, 2, source="train")
    assert ds[0]["tokens"].tolist() == [d.index(f"w{i}") for i in range(16)] and ds[0]["label"] == 1
    assert ds[1]["tokens"].tolist() == [d.index(w) for w in "w1 w2 w3".split()] and ds[1]["label"] == 0
    assert ds.size(0) == 16 and ds.size(1) == 3
    ds.num_segments = None  # whole documents
    assert len(ds[0]["tokens"]) == 30 and ds.size(0) == 30
    batch = ds.collater([ds[0], ds[1]])
    assert batch["num_segments"] == 4 and batch["target"][0, 24] == 1 and batch["target"][1, 0] == 0


def test_memorization_cli_writes_generator_dict_and_labels(tmp_path, capsys):
    out = str(tmp_path / "mem")
    assert rmt_data(["memorization", "fact_detection", "--out", out, "--train-size", "50", "--seed", "3"]) == 0
    spec = read_generator(out)
    assert spec["task"] == "fact_detection" and spec["seed"] == 3 and spec["noise_file"] is None
    assert spec["sizes"] == {"train": 50, "valid": 1000, "test": 1000}
    with open(os.path.join(out, "generator.json")) as f:
        assert json.load(f) == spec
    d = Dictionary.load(os.path.join(out, "dict.txt"))
    missing = [w for w in template_words() + Noise().vocabulary() if d.index(w) == d.unk()]
    assert not missing
    assert len(Noise().vocabulary()) == 1000
    with open(os.path.join(out, "labels.txt")) as f:
        labels = f.read().split()
    assert labels == LOCATIONS and read_labels(out, None) == LOCATIONS


def test_memorization_cli_with_a_noise_file(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(" ".join(f"Word{i % 150}" for i in range(400)))
    out = str(tmp_path / "mem")
    assert rmt_data(["memorization", "reasoning", "--out", out, "--noise-file", str(text)]) == 0
    d = Dictionary.load(os.path.join(out, "dict.txt"))
    assert all(d.index(f"word{i}") != d.unk() for i in range(150))
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(SystemExit) as e:
        rmt_data(["memorization", "reasoning", "--out", str(tmp_path / "other"), "--noise-file", str(short)])
    assert e.value.code == 2 and not os.path.exists(tmp_path / "other")


def test_generated_dataset_length_follows_num_segments(tmp_path):
    out = str(tmp_path / "mem")
    rmt_data(["memorization", "fact_detection", "--out", out, "--train-size", "20", "--valid-size", "5"])
    spec, d = read_generator(out), Dictionary.load(os.path.join(out, "dict.txt"))
    noise = generator_noise(spec, out)
    T = 16
    ds = GeneratedDocumentDataset(spec, "train", LOCATIONS, d, T, 2, noise)
    assert len(ds) == 20 and list(ds.sizes) == [32] * 20 and ds.size(3) == 32
    first = [ds[i] for i in range(20)]
    for it in first:
        assert len(it["tokens"]) == 32 and 0 <= it["label"] < 6
        assert not (it["tokens"] == d.unk()).any()  # every word is in dict.txt
    assert [ds[i]["tokens"].tolist() for i in range(3)] == [it["tokens"].tolist() for it in first[:3]]
    ds.num_segments = 5  # the curriculum's next stage
    assert len(ds[0]["tokens"]) == 80 and list(ds.sizes) == [80] * 20
    batch = ds.collater([ds[0], ds[1]])
    assert batch["net_input"]["src_tokens"].shape == (2, 80) and batch["num_segments"] == 5
    assert (batch["target"] != IGNORE).sum() == 2 and (batch["target"][:, 64] != IGNORE).all()
    valid = GeneratedDocumentDataset(spec, "valid", LOCATIONS, d, T, 2, noise)
    assert len(valid) == 5 and valid[0]["tokens"].tolist() != first[0]["tokens"].tolist()


@pytest.mark.parametrize("fmt", ["tsv", "dirs"])
def test_classification_dict_writes_dict_and_labels(tmp_path, fmt, capsys):
    data = str(tmp_path)
    (_write_tsv if fmt == "tsv" else _write_dirs)(data, "train", DOCS)
    assert rmt_data(["classification-dict", data]) == 0
    d = Dictionary.load(os.path.join(data, "dict.txt"))
    words = {w for _, text in DOCS for w in text.split()}
    assert all(d.index(w) != d.unk() for w in words) and len(d) == d.nspecial + len(words)
    assert d.count[d.index("bad")] == 5 and d.symbols[d.nspecial] == "bad"  # most frequent first
    with open(os.path.join(data, "labels.txt")) as f:
        assert f.read().split() == ["mid", "neg", "pos"]


def test_classification_dict_refuses_to_overwrite(tmp_path, capsys):
    data = str(tmp_path)
    _write_tsv(data, "train", DOCS)
    (tmp_path / "dict.txt").write_text("mine 1\n")
    with pytest.raises(SystemExit) as e:
        rmt_data(["classification-dict", data])
    assert e.value.code == 2 and "dict.txt" in capsys.readouterr().err
    assert (tmp_path / "dict.txt").read_text() == "mine 1\n" and not (tmp_path / "labels.txt").exists()


def test_classification_dict_without_a_train_split(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rmt_data(["classification-dict", str(tmp_path)])
    assert e.value.code == 2 and "train" in capsys.readouterr().err
    assert not (tmp_path / "dict.txt").exists()


def test_curriculum_mix_draws_each_training_document_a_length_up_to_the_stage(tmp_path):
    """--curriculum-mix: document i of the training split has 1..stage segments (its own draw, the same every
    time it is read), the labels sit on each document's own last segment, and the fact is still in it."""
    out = str(tmp_path / "mem")
    rmt_data(["memorization", "fact_memorization", "--out", out, "--train-size", "200", "--valid-size", "5"])
    spec, d = read_generator(out), Dictionary.load(os.path.join(out, "dict.txt"))
    noise, T = generator_noise(spec, out), 16
    mixed = GeneratedDocumentDataset(spec, "train", LOCATIONS, d, T, 4, noise, mix=True)
    plain = GeneratedDocumentDataset(spec, "train", LOCATIONS, d, T, 4, noise)
    n_seg = [len(mixed[i]["tokens"]) // T for i in range(200)]
    assert [len(mixed[i]["tokens"]) % T for i in range(200)] == [0] * 200
    assert set(n_seg) == {1, 2, 3, 4} and all(n_seg.count(k) > 25 for k in range(1, 5))  # about uniform
    assert n_seg == [len(mixed[i]["tokens"]) // T for i in range(200)]  # deterministic per document
    assert all(len(plain[i]["tokens"]) == 4 * T for i in range(20))  # without the flag: the stage's length
    # a document's own segments are the unmixed document's at that length (the same fact, question, label)
    i = n_seg.index(2)
    assert mixed[i]["tokens"].tolist() == encode(d, plain.document(i, 2 * T).tokens()).tolist()
    batch = mixed.collater([mixed[j] for j in range(8)])
    assert batch["num_segments"] == max(n_seg[:8])
    assert [int((batch["target"][b] != IGNORE).nonzero()) for b in range(8)] == [(n - 1) * T for n in n_seg[:8]]
