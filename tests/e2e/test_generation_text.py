"""Issue 16: a prompt given as plain text is continued into readable text by fairseq-interactive, for the char and
BPE data of examples/custom-corpus/prepare.sh (the commands of that README's "3. Generate").

- With the encoding flag of the data's level (`--bpe characters`; `--bpe sentencepiece --sentencepiece-model
  OUT/spm.model`) the prompt's tokens (S- line, and the start of the H- line) are exactly the ones prepare.sh
  writes for that text, none is <unk>, and the D- line is the decoded text: it starts with the prompt as typed.
- With the continuation flags (`--sampling --sampling-topk 10 --beam 1 --min-len N`) a whole-line prompt, after
  which the model's likeliest token is the line end </s> (which ends a hypothesis), still gets a continuation:
  the hypothesis has at least N tokens.
- Without the encoding flag a character model's prompt is whole words, none in its dictionary: one warning per
  prompt says how many tokens became <unk> and names `--bpe characters` (fairseq itself says nothing).

One prepare.sh run and one tiny rmt_tiny training (60 updates) per level, shared by the module."""

import os
import random
import re
import subprocess

import pytest

from helpers import REPO, THREADS, bin_path, cli, command

EXAMPLE = os.path.join(REPO, "examples", "custom-corpus")
SPACE = "\u2581"
WORDS = "the king queen shall not go to rome my lord good night sweet prince we have corn at our own price".split()
TRAIN = (
    "--user-dir user_dir --task rmt_lm --arch rmt_tiny --criterion rmt_cross_entropy --batch-size 4 --max-update 60 "
    "--optimizer adam --lr 3e-3 --cpu --seed 1 --num-workers 0 --log-format simple --log-interval 20 "
    "--disable-validation --no-epoch-checkpoints"
).split()
MIN_LEN, MAX_LEN = 80, 100  # tokens, prompt included (--min-len, --max-len-b); every prompt here is shorter
CONTINUE = ["--sampling", "--sampling-topk", 10, "--beam", 1, "--min-len", MIN_LEN, "--max-len-b", MAX_LEN]


def encoding(level: str, out) -> list:
    """The fairseq-interactive flags that encode plain text as prepare.sh encoded the data."""
    if level == "char":
        return ["--bpe", "characters"]
    return ["--bpe", "sentencepiece", "--sentencepiece-model", os.path.join(out, "spm.model")]


def raw_text(n_lines: int = 300, seed: int = 0) -> str:
    r = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [r.choice(WORDS) for _ in range(r.randint(3, 10))]
        if r.random() < 0.3:
            words[r.randrange(len(words))] += ","
        lines.append(" ".join(words).capitalize() + r.choice(".?!") if i % 10 != 9 else "")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """level -> (prepare.sh's OUT, the checkpoint), each made once, on first use."""
    root = tmp_path_factory.mktemp("gen")
    raw = root / "input.txt"
    raw.write_text(raw_text(), encoding="utf-8")
    done = {}

    def get(level):
        if level not in done:
            out, save = root / level, root / f"ckpt-{level}"
            env = dict(os.environ, PATH=bin_path() + os.pathsep + os.environ["PATH"], WORKERS="1",
                       OMP_NUM_THREADS=THREADS, LEVEL=level, VOCAB_SIZE="120")
            p = subprocess.run(["bash", os.path.join(EXAMPLE, "prepare.sh"), str(raw), str(out)], env=env,
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
            cli("fairseq-train", out / "bin", *TRAIN, "--save-dir", save)
            done[level] = (out, save / "checkpoint_last.pt")
        return done[level]

    return get


def interactive(out, ckpt, prompts, *flags):
    """fairseq-interactive on `prompts` (one per line on stdin) -> ({id: {"S"/"H"/"D": text}}, its whole output)."""
    args = [out / "bin", "--user-dir", "user_dir", "--task", "rmt_lm", "--path", ckpt, "--cpu", *flags]
    p = subprocess.run([*command("fairseq-interactive"), *map(str, args)], input="\n".join(prompts) + "\n",
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=THREADS))
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-4000:]
    found = {}
    for kind, i, rest in re.findall(r"^([SHD])-(\d+)\t(.*)$", p.stdout, re.M):
        found.setdefault(int(i), {})[kind] = rest.split("\t")[-1]  # H-/D-: id, score, text
    assert sorted(found) == list(range(len(prompts))), text[-3000:]
    return found, text


def expected_tokens(level: str, out, text: str) -> list:
    """What prepare_text.py writes for `text` as one line of the data (examples/custom-corpus/prepare_text.py)."""
    if level == "char":
        return [SPACE if c.isspace() else c for c in text]
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(out / "spm.model")).encode(text, out_type=str)


@pytest.mark.parametrize("level", ["char", "bpe"])
def test_plain_text_prompt_round_trips_and_continues(trained, level):
    out, ckpt = trained(level)
    # whole lines of the valid split as prepare.sh wrote them (raw and tokenized), and part of a line
    raw = (out / "text" / "valid.txt").read_text(encoding="utf-8").split("\n")
    tok = (out / "tok" / "valid.txt").read_text(encoding="utf-8").split("\n")
    lines = [(r, t.split()) for r, t in zip(raw, tok) if r.strip()][:2]
    partial = " ".join(lines[0][0].split()[:2])
    prompts = [r for r, _ in lines] + [partial]
    expect = [t for _, t in lines] + [expected_tokens(level, out, partial)]
    assert all(len(e) < MIN_LEN for e in expect)

    found, log = interactive(out, ckpt, prompts, *encoding(level, out), *CONTINUE)
    assert "map to <unk>" not in log, log[-3000:]
    for i, prompt in enumerate(prompts):
        src, hyp, text = found[i]["S"].split(), found[i]["H"].split(), found[i]["D"]
        assert src == expect[i], (prompt, src, expect[i])  # the round trip: prepare.sh's tokens for this text
        assert "<unk>" not in src and hyp[: len(src)] == src, (src, hyp)
        # a continuation, though a whole line's likeliest next token is its end (</s>): --min-len forbids </s>
        assert len(hyp) >= MIN_LEN > len(src) and len(hyp) <= MAX_LEN, (prompt, hyp)
        # the D- line is readable text: the prompt as typed, then the continuation decoded as prepare.sh encodes
        assert text.startswith(prompt) and len(text) > len(prompt) and SPACE not in text, (prompt, text)
        if level == "char":
            assert text == "".join(" " if t == SPACE else t for t in hyp)
        else:
            import sentencepiece as spm

            assert text == spm.SentencePieceProcessor(model_file=str(out / "spm.model")).decode(hyp)


def test_unencoded_prompt_warns_once_per_prompt(trained):
    """A character model given words (no --bpe characters): every word is one unknown token."""
    out, ckpt = trained("char")
    found, log = interactive(out, ckpt, ["Good night sweet", "Shall go"], "--beam", 1, "--max-len-b", 10)
    assert [found[i]["S"] for i in (0, 1)] == ["<unk> <unk> <unk>", "<unk> <unk>"]
    warnings = [line for line in log.split("\n") if "map to <unk>" in line]
    assert len(warnings) == 2, log[-3000:]
    assert "3 of 3 prompt tokens" in warnings[0] and "2 of 2 prompt tokens" in warnings[1], warnings
    assert all("--bpe characters" in w for w in warnings), warnings
