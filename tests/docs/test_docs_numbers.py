"""Measured numbers in the docs are the ones a script wrote (issue 16): each `<!-- measured:NAME begin -->` ...
`<!-- measured:NAME end -->` block equals what benchmarks/docs_blocks.py renders from its committed results JSON
(which carries the command and commit), and every registered block is shown somewhere."""

import glob
import os

from helpers import REPO, load_script

DOCS = [os.path.join(REPO, "README.md"), os.path.join(REPO, "benchmarks", "README.md"),
        *sorted(glob.glob(os.path.join(REPO, "examples", "*", "README.md")))]


def _docs_blocks():
    return load_script("benchmarks/docs_blocks.py")


def test_measured_blocks_are_what_their_json_renders():
    db = _docs_blocks()
    stale = []
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        if db.update(text) != text:
            stale.append(os.path.relpath(path, REPO))
    assert not stale, f"run `python benchmarks/docs_blocks.py {' '.join(stale)}` (blocks differ from their JSON)"


def test_every_registered_block_is_in_the_docs_with_its_results():
    db = _docs_blocks()
    text = "".join(open(p, encoding="utf-8").read() for p in DOCS)
    for name, (path, _) in db.REGISTRY.items():
        assert f"<!-- measured:{name} begin -->" in text, f"block {name} is in no doc"
        assert os.path.isfile(os.path.join(REPO, path)), f"block {name}: {path} missing"


def test_a_changed_number_is_caught(tmp_path):
    """The check is not vacuous: editing a number inside a block makes update() restore it."""
    db = _docs_blocks()
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    begin = text.index("<!-- measured:scaleout begin -->")
    end = text.index("<!-- measured:scaleout end -->")
    block = text[begin:end]
    digit = next(i for i, c in enumerate(block) if c.isdigit() and i > len("<!-- measured:scaleout begin -->"))
    tampered = text[:begin] + block[:digit] + str((int(block[digit]) + 1) % 10) + block[digit + 1:] + text[end:]
    assert db.update(tampered) == text
