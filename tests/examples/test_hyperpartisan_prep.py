"""examples/hyperpartisan/prepare_hyperpartisan.py on a synthetic miniature of the SemEval-2019 by-article files
(same XML shapes, a Longformer-style split file, a byte-level GPT-2 BPE without merges); the output trains
with --task rmt_long_classification."""

import json
import subprocess
import sys

from helpers import REPO, cli

SCRIPT = f"{REPO}/examples/hyperpartisan/prepare_hyperpartisan.py"


def _miniature(tmp_path, n=20):
    arts, truth = ["<articles>"], ["<articles>"]
    for i in range(n):
        hp = "true" if i % 2 else "false"
        body = "<p>Outrageous elites betray us!</p><p>Wake up.</p>" if hp == "true" else "<p>The council met.</p>"
        arts.append(f'<article id="{i:07d}" published-at="2018-01-01" title="Story {i}">{body}</article>')
        truth.append(f'<article id="{i:07d}" hyperpartisan="{hp}" bias="x" url="u" labeled-by="crowd"/>')
    (tmp_path / "articles.xml").write_text("\n".join(arts + ["</articles>"]))
    (tmp_path / "truth.xml").write_text("\n".join(truth + ["</articles>"]))
    # Longformer's hp-splits.json uses integer ids
    (tmp_path / "splits.json").write_text(json.dumps({"train": list(range(14)), "dev": [14, 15, 16],
                                                      "test": [17, 18, 19]}))
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    enc = {ch: b for b, ch in bytes_to_unicode().items()}  # one token per byte: id = the byte value
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    rob = tmp_path / "roberta.base"
    rob.mkdir()
    (rob / "dict.txt").write_text("".join(f"{b} 1\n" for b in range(256)))


def _prep(tmp_path, *extra):
    return subprocess.run([sys.executable, SCRIPT, "--articles", tmp_path / "articles.xml", "--ground-truth",
                           tmp_path / "truth.xml", "--out", tmp_path / "data", *extra], capture_output=True, text=True)


def test_split_file_bpe_ids_and_training(tmp_path):
    _miniature(tmp_path)
    p = _prep(tmp_path, "--splits", tmp_path / "splits.json", "--roberta-dir", tmp_path / "roberta.base",
              "--encoder-json", tmp_path / "encoder.json", "--vocab-bpe", tmp_path / "vocab.bpe")
    assert p.returncode == 0, p.stderr
    data = tmp_path / "data"
    rows = {s: (data / f"{s}.tsv").read_text().splitlines() for s in ("train", "valid", "test")}
    assert [len(rows[s]) for s in ("train", "valid", "test")] == [14, 3, 3]
    label, ids = rows["test"][0].split("\t")  # article 17: hyperpartisan
    assert label == "true"
    assert bytes(int(t) for t in ids.split()).decode() == "Story 17 Outrageous elites betray us!Wake up."
    assert (data / "labels.txt").read_text() == "false\ntrue\n"
    assert (data / "dict.txt").read_text() == (tmp_path / "roberta.base" / "dict.txt").read_text()
    t = cli("fairseq-train", data, "--user-dir", "user_dir", "--task", "rmt_long_classification", "--arch",
            "rmt_encoder_tiny", "--criterion", "rmt_classification", "--tokens-per-sample", 16, "--batch-size", 4,
            "--optimizer", "adam", "--lr", "1e-3", "--max-update", 3, "--cpu", "--save-dir", tmp_path / "ckpt",
            "--num-workers", 0)
    assert "2 classes: false true" in t.stdout + t.stderr


def test_missing_bpe_files_name_the_flag(tmp_path):
    _miniature(tmp_path)
    p = _prep(tmp_path, "--roberta-dir", tmp_path / "roberta.base", "--vocab-bpe", tmp_path / "vocab.bpe")
    assert p.returncode == 2 and "--encoder-json" in p.stderr and not (tmp_path / "data").exists()


def test_seeded_split_without_bpe(tmp_path):
    _miniature(tmp_path)
    assert _prep(tmp_path, "--no-bpe").returncode == 0
    lines = [ln for s in ("train", "valid", "test") for ln in (tmp_path / "data" / f"{s}.tsv").read_text().splitlines()]
    assert len(lines) == 20 and len(set(lines)) == 20  # every article once
    assert any(ln == "false\tStory 0 The council met." for ln in lines)
