"""Every command block of README.md and examples/*/README.md is run (issue 16: docs that cannot go stale).

Each ```bash block carries a comment on the line above it saying how it is tested:

  <!-- docs-test: run -->            run as written, shrunk to CPU size by tests/docs/shim.py (flags appended,
                                     argparse keeps the last value; see that file for the exact rules)
  <!-- docs-test: parse REASON -->   needs hardware, downloads or files the tests do not have (8 GPUs, several
                                     nodes, WikiText-103, RoBERTa weights): every fairseq command in it goes
                                     through the real fairseq parser with the plugin loaded, nothing runs
  <!-- docs-test: covered TEST -->   run by the named test (the demo, the test suite itself)

A block without one fails `test_every_block_says_how_it_is_tested` (in `make test`). The blocks of one README
run in order in one bash session in a scratch copy of the checkout (links to its code, a small word-level corpus
as train.txt/valid.txt/test.txt and data-bin/wikitext-103, tinyshakespeare for downloads), as a reader would
run them one after another; `run` blocks under `set -euo pipefail`. This runs in `make test-docs` (marker
`docs`), which CI runs after `make test`.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass

import pytest

from helpers import REPO, THREADS, cli

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "examples", "*",
                                                                                      "README.md")))]
ANNOTATION = re.compile(r"^<!-- docs-test: (run|parse|covered)\b ?(.*?) ?-->$")
SHIMMED = ["fairseq-train", "fairseq-hydra-train", "fairseq-eval-lm", "fairseq-validate", "fairseq-interactive",
           "fairseq-preprocess", "rmt-deepspeed-train", "deepspeed", "torchrun", "rmt-data", "curl", "wget"]
LINKED = ["user_dir", "rmt_fairseq", "examples", "ds_configs", "scripts", "benchmarks", "tests", "Makefile",
          "pyproject.toml"]


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    mode: str  # run | parse | covered | None
    note: str
    body: str


def blocks(doc: str) -> list:
    lines = open(os.path.join(REPO, doc), encoding="utf-8").read().split("\n")
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```bash"):
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = ANNOTATION.match(lines[k].strip()) if k >= 0 else None
            out.append(Block(doc, i + 1, m.group(1) if m else None, m.group(2) if m else "",
                             "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


def test_every_block_says_how_it_is_tested():
    missing, bad = [], []
    for doc in DOCS:
        for b in blocks(doc):
            if b.mode is None:
                missing.append(f"{doc}:{b.line}")
            elif b.mode == "covered" and not os.path.exists(os.path.join(REPO, b.note.split()[0] if b.note else "-")):
                bad.append(f"{doc}:{b.line} covered by {b.note!r}: no such test file")
            elif b.mode == "parse" and not b.note:
                bad.append(f"{doc}:{b.line}: parse needs a reason")
            elif b.mode == "run" and re.search(r"(^|\s)\.\.\.(\s|$)", b.body):
                bad.append(f"{doc}:{b.line}: a `run` block cannot hold '...'")
    assert not missing, f"blocks without <!-- docs-test: run|parse|covered --> above them: {missing}"
    assert not bad, bad


def _corpus() -> str:
    for path in (os.environ.get("RMT_TINYSHAKESPEARE", ""), os.path.join(REPO, "..", "shared", "data",
                                                                        "tinyshakespeare", "input.txt"),
                 "/work/shared/data/tinyshakespeare/input.txt"):
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    pytest.fail("tinyshakespeare not found: set RMT_TINYSHAKESPEARE to its input.txt")


@pytest.fixture(scope="module")
def word_data(tmp_path_factory):
    """train/valid/test.txt (word level, 20000/2000/2000 non-empty lines of tinyshakespeare) and their data-bin."""
    root = tmp_path_factory.mktemp("words")
    lines = [line for line in open(_corpus(), encoding="utf-8").read().split("\n") if line.strip()]
    for split, (a, b) in {"train": (0, 20000), "valid": (20000, 22000), "test": (22000, 24000)}.items():
        (root / f"{split}.txt").write_text("\n".join(lines[a:b]) + "\n", encoding="utf-8")
    cli("fairseq-preprocess", "--only-source", "--trainpref", root / "train.txt", "--validpref", root / "valid.txt",
        "--testpref", root / "test.txt", "--destdir", root / "bin", "--workers", 1)
    # the same lines one token per character: the stand-in for data-bin/enwik8
    for split in ("train", "valid", "test"):
        text = (root / f"{split}.txt").read_text(encoding="utf-8").split("\n")
        (root / f"{split}.char").write_text("\n".join(" ".join(c if c != " " else "\u2581" for c in line)
                                                     for line in text), encoding="utf-8")
    cli("fairseq-preprocess", "--only-source", "--trainpref", root / "train.char", "--validpref", root / "valid.char",
        "--testpref", root / "test.char", "--destdir", root / "char-bin", "--workers", 1, "--padding-factor", 1)
    # a stand-in for wikitext-103-v1.zip (what the tests' wget/curl return for its URL)
    with zipfile.ZipFile(root / "wikitext-103-v1.zip", "w") as z:
        for split in ("train", "valid", "test"):
            z.write(root / f"{split}.txt", f"wikitext-103/wiki.{split}.tokens")
    return root


def _sandbox(doc, tmp_path, word_data) -> str:
    parent = tmp_path / "ws"
    repo = parent / "checkout"
    repo.mkdir(parents=True)
    for name in LINKED:
        os.symlink(os.path.join(REPO, name), repo / name)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text("# the tests' environment is already active\n")
    for split in ("train", "valid", "test"):
        shutil.copy(word_data / f"{split}.txt", repo / f"{split}.txt")
    (repo / "data-bin").mkdir()
    if doc != "examples/wikitext-103/README.md":  # that README's prepare.sh makes it (from WIKITEXT_ZIP)
        shutil.copytree(word_data / "bin", repo / "data-bin" / "wikitext-103")
    shutil.copytree(word_data / "char-bin", repo / "data-bin" / "enwik8")
    shutil.copy(_corpus(), repo / "input.txt")
    corpus_dir = parent / "shared" / "data" / "tinyshakespeare"  # ../shared as in this repository's workplace
    corpus_dir.mkdir(parents=True)
    shutil.copy(_corpus(), corpus_dir / "input.txt")
    (parent / "home").mkdir()
    shimbin = parent / "shimbin"
    shimbin.mkdir()
    for name in SHIMMED:
        os.symlink(os.path.join(REPO, "tests", "docs", "shim.py"), shimbin / name)
    return str(repo)


def _script(doc_blocks) -> str:
    parts = []
    for i, b in enumerate(doc_blocks):
        if b.mode == "covered":
            continue
        strict = "set -euo pipefail" if b.mode == "run" else "set +eu +o pipefail"
        parts.append(f"echo '##docs-block {i} {b.doc}:{b.line} {b.mode}'\nexport DOCS_BLOCK={i} DOCS_MODE={b.mode}\n"
                     f"{strict}\n{b.body}\nset +eu +o pipefail\n")
    return "\n".join(parts)


@pytest.mark.docs
@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_run(doc, word_data, tmp_path):
    doc_blocks = blocks(doc)
    repo = _sandbox(doc, tmp_path, word_data)
    log = tmp_path / "calls.jsonl"
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, HOME=str(tmp_path / "ws" / "home"), DOCS_LOG=str(log), DOCS_REAL_BIN=bindir,
               PATH=os.pathsep.join([str(tmp_path / "ws" / "shimbin"), bindir, os.environ["PATH"]]),
               OMP_NUM_THREADS=THREADS, DOCS_MIRROR_input_txt=_corpus(), WORKERS="1",
               DOCS_MIRROR_wikitext_103_v1_zip=str(word_data / "wikitext-103-v1.zip"),
               DOCS_CUDA="1" if _cuda() else "0")
    env.pop("VIRTUAL_ENV", None)
    p = subprocess.run(["bash", "-c", _script(doc_blocks)], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=1800)
    out = p.stdout + p.stderr
    reached = re.findall(r"##docs-block (\d+) (\S+) (\w+)", p.stdout)
    last = reached[-1][1] if reached else "before the first block"
    assert p.returncode == 0, f"{doc}: the block at {last} failed (exit {p.returncode}):\n{out[-6000:]}"
    calls = [json.loads(line) for line in open(log)] if log.exists() else []
    for i, b in enumerate(doc_blocks):
        if b.mode == "covered":
            continue
        mine = [c for c in calls if c.get("block") == i]
        assert mine, f"{doc}:{b.line} ({b.mode}) reached none of the documented commands:\n{out[-3000:]}"
        failed = [c for c in mine if not c.get("ok", True)]
        assert not failed, f"{doc}:{b.line}: {failed}\n{out[-3000:]}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
