"""Every relative link in the project's Markdown files points at a file that exists, and a link
with ``#anchor`` into a Markdown file at one of its headings (GitHub's heading anchors).

Links are read with markdown-it-py (so code blocks and code spans are not taken for links) and
anchors made with mdit-py-plugins' GitHub-style ``slugify``; both are in the ``dev`` extra.
"""
import pathlib
from urllib.parse import unquote, urlparse

import pytest
from markdown_it import MarkdownIt
from mdit_py_plugins.anchors.index import slugify

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_DIRS = {"build", "dist", "mutants", "output", "out", "node_modules"}


def markdown_files():
    files = []
    for path in sorted(ROOT.rglob("*.md")):
        parts = path.relative_to(ROOT).parts[:-1]
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        files.append(path)
    return files


def parse(path):
    return MarkdownIt("commonmark").enable("table").parse(path.read_text(encoding="utf-8"))


def links(path):
    """(line, target) of every link and image in the file."""
    for token in parse(path):
        for child in [token, *(token.children or [])]:
            target = child.attrs.get("href") if child.type == "link_open" else (
                child.attrs.get("src") if child.type == "image" else None)
            if target is not None:
                yield (token.map[0] + 1 if token.map else 0), target


def anchors(path):
    """The heading anchors GitHub gives the file (a repeated heading gets -1, -2, ...)."""
    seen, result = {}, set()
    tokens = parse(path)
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            slug = slugify(tokens[i + 1].content)
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def broken_links(path, root=ROOT):
    problems = []
    for line, target in links(path):
        url = urlparse(target)
        if url.scheme or target.startswith("//"):
            continue  # external: not checked here (no network in the test suite)
        dest = path if not url.path else (path.parent / unquote(url.path)).resolve()
        if not dest.exists():
            problems.append(f"{path.relative_to(root)}:{line}: {target} -> no such file")
        elif url.fragment and dest.suffix == ".md" and url.fragment not in anchors(dest):
            problems.append(f"{path.relative_to(root)}:{line}: {target} -> no heading "
                            f"'#{url.fragment}' in {dest.relative_to(root)}")
    return problems


def test_the_main_documents_are_checked():
    names = {str(p.relative_to(ROOT)) for p in markdown_files()}
    assert {"README.md", "BENCHMARKS.md", "docs/ARCHITECTURE.md"} <= names
    assert any(n.startswith("docs/notes/") for n in names)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_a_broken_link_and_a_missing_anchor_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Some Title: here\n\n## Twice\n\n## Twice\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](other.md#some-title-here) [ok](other.md#twice-1) [ok](#local) [web](https://x.org/a)\n"
        "`[code](missing.md)`\n\n"
        "# Local\n\n[gone](missing.md) [bad](other.md#nowhere) ![img](pics/a.png)\n")
    assert broken_links(doc, root=tmp_path) == [
        "doc.md:6: missing.md -> no such file",
        "doc.md:6: other.md#nowhere -> no heading '#nowhere' in other.md",
        "doc.md:6: pics/a.png -> no such file",
    ]
