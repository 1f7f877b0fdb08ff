"""The README reads like fairseq's for a fairseq user (issue 27): its contents line links every section, the box
of what differs from stock fairseq is at the top, and every link inside README.md and docs/ points to a heading or
a file that exists."""

import glob
import os
import re

from helpers import REPO

README = os.path.join(REPO, "README.md")
DOCS = [README, *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))),
        *sorted(glob.glob(os.path.join(REPO, "examples", "*", "README.md")))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path):
    """GitHub's heading anchors of a markdown file: lower case, punctuation other than - and _ dropped, spaces to
    -, a repeated one suffixed -1, -2, ... (fenced code skipped)."""
    seen, out, fenced = {}, set(), False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_the_contents_line_links_every_section_and_the_box_comes_first():
    text = open(README, encoding="utf-8").read()
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    contents = text[text.index("**Contents:**"): text.index("\n\n", text.index("**Contents:**"))]
    linked = set(re.findall(r"\]\(#([^)]+)\)", contents))
    slugs = {re.sub(r"[^\w\- ]", "", s.strip().lower()).replace(" ", "-") for s in sections}
    assert slugs <= linked, f"sections missing from the contents line: {slugs - linked}"
    assert sections[0] == "For fairseq users: what differs", sections[:2]
    box = text[text.index("## For fairseq users"): text.index("## ", text.index("## For fairseq users") + 3)]
    for point in ("--batch-size", "--max-tokens", "rmt_cross_entropy", "--user-dir user_dir", "import rmt_fairseq"):
        assert point in box, point


def test_every_link_inside_the_docs_resolves():
    broken = []
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http(s), mailto
                continue
            file, _, anchor = target.partition("#")
            dest = (os.path.join(REPO, file.lstrip("/")) if file.startswith("/") else
                    os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path)
            if not os.path.exists(dest):
                broken.append(f"{os.path.relpath(path, REPO)}: {target} (no file)")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                broken.append(f"{os.path.relpath(path, REPO)}: {target} (no heading)")
    assert not broken, broken
