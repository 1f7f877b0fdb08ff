"""examples/custom-corpus through the real scripts and CLIs: prepare.sh (word, bpe, char) on a raw text generated
here, then fairseq-train --user-dir user_dir --task rmt_lm --arch rmt_tiny and fairseq-eval-lm on the char-level
data-bin, and run.sh on the BPE one."""

import json
import math
import os
import random
import re
import subprocess

import pytest
from fairseq.data import Dictionary
from fairseq.data.indexed_dataset import MMapIndexedDataset

from helpers import REPO, THREADS, bin_path, cli

EXAMPLE = os.path.join(REPO, "examples", "custom-corpus")
SPLITS = ("train", "valid", "test")
WORDS = "the king queen shall not go to rome my lord good night sweet prince we have corn at our own price".split()
SPACE = "\u2581"
# as tests/e2e: --user-dir user_dir relative to the checkout, the working directory of helpers.cli
TRAIN = (
    "--user-dir user_dir --task rmt_lm --arch rmt_tiny --criterion rmt_cross_entropy --batch-size 2 --max-update 3 "
    "--optimizer adam --lr 1e-3 --cpu --seed 1 --num-workers 0 --log-format simple --log-interval 1"
).split()
EVAL = "--user-dir user_dir --task rmt_lm --batch-size 2 --gen-subset test --cpu --num-workers 0".split()


def raw_text(n_lines: int = 400, seed: int = 0) -> str:
    """Sentences of varied length with commas, '&', "don't" and a blank line every 10 lines; one line with a tab."""
    r = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 10 == 9:
            lines.append("")
            continue
        words = [r.choice(WORDS) for _ in range(r.randint(3, 12))]
        if r.random() < 0.3:
            words[r.randrange(len(words))] += ","
        if r.random() < 0.15:
            words.insert(r.randrange(len(words)), "&")
        if r.random() < 0.15:
            words.append("don't")
        lines.append(" ".join(words).capitalize() + r.choice(".?!"))
    lines[5] = "Good\tnight."  # in train
    return "\n".join(lines) + "\n"


def run(script, *args, env=None, cwd=None, timeout=300):
    env = dict(os.environ, PATH=bin_path() + os.pathsep + os.environ["PATH"], WORKERS="1", OMP_NUM_THREADS=THREADS,
               **(env or {}))
    return subprocess.run(
        ["bash", os.path.join(EXAMPLE, script), *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text(raw_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    """level -> output directory of prepare.sh (each level prepared once, on first use)."""
    done = {}

    def get(level):
        if level not in done:
            out = tmp_path_factory.mktemp(level)
            p = run("prepare.sh", raw, out, env={"LEVEL": level, "VOCAB_SIZE": "120"})
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
            done[level] = out
        return done[level]

    return get


def _symbols(out):
    d = Dictionary.load(str(out / "bin" / "dict.txt"))
    return [d[i] for i in range(d.nspecial, len(d))]


def _tokens(out, split):
    ds = MMapIndexedDataset(str(out / "bin" / split))  # kept alive: sizes is a view of its mmap
    return int(ds.sizes.sum())  # line ends (eos) included


@pytest.mark.parametrize("level", ["word", "bpe", "char"])
def test_prepare_splits_in_order_90_5_5(raw, prepared, level):
    out = prepared(level)
    for split in SPLITS:
        for ext in ("bin", "idx"):
            assert (out / "bin" / f"{split}.{ext}").stat().st_size > 0
    assert (out / "bin" / "dict.txt").exists()
    text = {s: (out / "text" / f"{s}.txt").read_text(encoding="utf-8") for s in SPLITS}
    assert "".join(text[s] for s in SPLITS) == raw.read_text(encoding="utf-8")  # in order, nothing lost
    total = sum(map(len, text.values()))
    for split, frac in zip(SPLITS, (0.90, 0.05, 0.05)):
        assert len(text[split]) / total == pytest.approx(frac, abs=0.01), split  # cut at a line end
        assert json.loads((out / "splits.json").read_text())[split]["chars"] == len(text[split])
    tokens = {s: _tokens(out, s) for s in SPLITS}
    for split, frac in zip(SPLITS, (0.90, 0.05, 0.05)):
        assert tokens[split] / sum(tokens.values()) == pytest.approx(frac, abs=0.02), (split, tokens)


def test_word_level_is_moses_tokenized_without_escaping(prepared):
    out = prepared("word")
    symbols = set(_symbols(out))
    assert {",", ".", "&", "'t"} <= symbols  # punctuation and clitics split off
    assert not any(s.endswith(",") and s != "," for s in symbols)
    assert not symbols & {"&amp;", "&apos;t"}  # escape=False
    assert "don 't" in (out / "tok" / "train.txt").read_text(encoding="utf-8")


def test_bpe_dictionary_is_the_sentencepiece_pieces(prepared):
    import sentencepiece as spm

    out = prepared("bpe")
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))}
    symbols = _symbols(out)
    assert set(symbols) == pieces and len(symbols) == len(pieces) <= 120
    assert any(s.startswith(SPACE) and len(s) > 2 for s in symbols)  # word-initial merged pieces
    assert "0.0% replaced" in (out / "bin" / "preprocess.log").read_text().split("valid.txt:")[1].split("\n")[0]
    for split in ("valid", "test"):  # encoded with the model trained on train: decodes back to the raw text
        tok = (out / "tok" / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        text = (out / "text" / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        assert [sp.decode_pieces(line.split()) for line in tok] == text


def test_char_level_one_symbol_per_character(prepared):
    out = prepared("char")
    symbols = _symbols(out)
    assert all(len(s) == 1 for s in symbols), symbols  # no padding fillers (madeupword0000) either
    assert SPACE in symbols and "\t" not in symbols
    for split in SPLITS:
        tok = (out / "tok" / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        text = (out / "text" / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        assert ["".join(line.split()).replace(SPACE, " ") for line in tok] == [t.replace("\t", " ") for t in text]
        assert _tokens(out, split) == sum(len(t) + 1 for t in text)  # one token per character, newline = eos


def test_char_level_trains_and_evaluates_with_fairseq(prepared, tmp_path):
    data = prepared("char") / "bin"
    save = tmp_path / "ckpt"
    p = cli("fairseq-train", data, *TRAIN, "--save-dir", save, "--no-epoch-checkpoints")
    log = p.stdout + p.stderr
    valid = re.search(r"valid on 'valid' subset \| loss ([0-9.]+) \| bpc ([0-9.]+)", log)  # char level: bpc
    assert valid and valid.group(1) == valid.group(2), log[-2000:]
    e = cli("fairseq-eval-lm", data, *EVAL, "--path", save / "checkpoint_last.pt")
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", e.stdout + e.stderr).group(1))
    assert math.isfinite(loss) and loss > 0


def test_run_sh_trains_and_evaluates(prepared, tmp_path):
    """run.sh's own flags on the BPE data (shortened by extra flags, which come last and override)."""
    out = prepared("bpe")
    env = {"DATA": str(out / "bin"), "SAVE": str(tmp_path / "ckpt"), "EVAL_BATCH_SIZE": "2"}
    p = run("run.sh", *"--max-update 3 --batch-size 2 --log-interval 1".split(), cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "num_updates=3" in p.stdout
    bits = float(re.search(r"Loss \(base 2\): ([0-9.]+)", p.stdout).group(1))
    bpc = float(re.search(r"test: ([0-9.]+) bits per character of the raw text", p.stdout).group(1))
    assert math.isfinite(bits) and bpc == pytest.approx(
        bits * _tokens(out, "test") / len((out / "text" / "test.txt").read_text(encoding="utf-8")), abs=2e-3
    )


@pytest.mark.parametrize("case", ["missing", "empty", "level"])
def test_prepare_refuses_bad_input_in_one_line(tmp_path, case):
    raw = tmp_path / "input.txt"
    if case != "missing":
        raw.write_text("" if case == "empty" else "a\nb\nc\n")
    p = run("prepare.sh", raw, tmp_path / "out", env={"LEVEL": "words" if case == "level" else "char"})
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr
    assert {"missing": "not found", "empty": "is empty", "level": "LEVEL must be word, bpe or char"}[case] in p.stderr
    assert not (tmp_path / "out").exists()
