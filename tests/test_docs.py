"""The documentation is checked like code: its generated parts equal what generates them, its links
resolve, and the README stays a short newcomer's page."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def between(text: str, start: str, end: str) -> str:
    assert text.count(start) == 1 and text.count(end) == 1, f"expected one '{start}' ... '{end}' block"
    return text.split(start, 1)[1].split(end, 1)[0]


def test_schema_in_docs_is_the_cli_output():
    shown = subprocess.run([sys.executable, "-m", "multitask", "dataset", "schema"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    documented = between((ROOT / "docs" / "datasets.md").read_text(),
                         "<!-- schema: made by multitask dataset schema -->", "<!-- end schema -->")
    assert documented.strip() == shown.strip(), (
        "docs/datasets.md's schema differs from `multitask dataset schema`: paste its output between the markers")


def test_committed_result_tables_match_their_json(run_cli):
    code, out, err = run_cli("report", "docs", "--check", README, ROOT / "docs" / "results.md", ROOT / "docs" / "gridworld.md")
    assert code == 0, err
    assert "README.md: 1 table(s), up to date" in out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name} links to {target}: no such heading"


def test_readme_is_short_and_links_every_doc():
    assert README.stat().st_size <= 12 * 1024, "README.md is over 12 KB: move reference material to docs/"
    text = README.read_text()
    for doc in DOCS:
        assert f"(docs/{doc.name})" in text, f"README.md does not link docs/{doc.name}"
