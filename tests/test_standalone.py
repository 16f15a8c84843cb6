"""The repository stands alone: a clone with nothing beside it has every document and data file it uses.

No file of the repository may read or cite a folder next to the checkout (a sibling ``shared`` folder of
design notes, acceptance data or seed files), and every ``docs/*.md`` path a file cites must exist, as must
the target of every relative link in a Markdown file. The files checked are those git knows about (tracked,
plus untracked ones that are not ignored, i.e. what the next commit can hold), so the test needs a git
checkout and is skipped outside one.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Written so that this file's own source does not match: "\.\." in the source is not two dots in a row.
SIBLING = "shared"
FORBIDDEN = re.compile(r"\.\./" + SIBLING + r"\b|\b" + SIBLING + r"/(?:docs|acceptance|seed)\b")
# Documents that used to live outside the repository, under their old names.
RETIRED = re.compile(r"\b(?:MINDIE_SERVICE_API|MINDIE_CONTRACT)\.md\b")
# A docs/ path relative to the repository root (not a path inside some other repository: no "/" before it).
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*?\.md\b")
# Markdown links: [text](target).
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _git_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the repository's files")
    try:
        top = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"git failed: {error}")
    if top.returncode != 0:
        pytest.skip(f"not a git checkout: {ROOT}")
    if Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip(f"{ROOT} is not the root of its git checkout ({top.stdout.strip()})")
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, timeout=60, check=True)
    names = sorted({name for name in listing.stdout.decode("utf-8", "surrogateescape").split("\0") if name})
    if not names:
        pytest.skip("git lists no files")
    return names


def _texts() -> dict[str, str]:
    """Path -> text of every listed file that exists and is text (binary files are skipped)."""
    out = {}
    for name in _git_files():
        path = ROOT / name
        if not path.is_file() or path.is_symlink():
            continue  # deleted in the work tree, or a link
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        out[name] = data.decode("utf-8", "replace")
    return out


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return _texts()


def _hits(texts: dict[str, str], pattern: re.Pattern) -> list[str]:
    hits = []
    for name, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:160]}")
    return hits


def test_pattern_does_not_match_itself():
    source = Path(__file__).read_text(encoding="utf-8")
    assert not FORBIDDEN.search(source)
    assert FORBIDDEN.search("../" + SIBLING + "/x") and FORBIDDEN.search(SIBLING + "/docs/MODEL.md")
    assert not FORBIDDEN.search("shared memory") and not FORBIDDEN.search("shared/memory")


def test_no_file_reads_or_cites_a_sibling_folder(texts):
    hits = _hits(texts, FORBIDDEN)
    assert not hits, ("files read or cite a folder outside the repository; move what they need into the "
                      "repository (docs/, tests/data/) and point at it:\n" + "\n".join(hits))


def test_no_file_cites_retired_document_names(texts):
    hits = _hits(texts, RETIRED)
    assert not hits, "cite docs/SERVICE_API.md or docs/DESIGN.md instead:\n" + "\n".join(hits)


def test_cited_docs_exist(texts):
    missing = []
    for name, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            for match in DOCS_PATH.finditer(line):
                if not (ROOT / match.group(0)).is_file():
                    missing.append(f"{name}:{number}: {match.group(0)}")
    assert not missing, "cited documents that are not in the repository:\n" + "\n".join(missing)


def test_markdown_links_resolve(texts):
    missing = []
    for name, text in texts.items():
        if not name.endswith(".md"):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in MD_LINK.finditer(line):
                target = match.group(1).split("#", 1)[0]
                if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # an anchor in the same file, or a URL
                if not (ROOT / name).parent.joinpath(target).exists():
                    missing.append(f"{name}:{number}: {match.group(1)}")
    assert not missing, "Markdown links to files that are not in the repository:\n" + "\n".join(missing)
