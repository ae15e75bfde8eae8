"""The README and the docs pages as a newcomer reads them, on GitHub too: the README opens with the two commands
and stays short, and every relative link in it and in docs/ names a file that exists. (`make docs` checks the
site itself: links, anchors and the API pages, with warnings as errors.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    """Link targets that are files of the repository (no URL, no in-page anchor), without their anchor."""
    targets = [t.split("#")[0] for t in LINK.findall(page.read_text())]
    return [t for t in targets if t and "://" not in t and not t.startswith("mailto:")]


def test_readme_opens_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    first_block = lines[lines.index("```bash") + 1:lines.index("```", lines.index("```bash") + 1)]
    assert lines[0] == "# geosoc" and lines[2] == "```bash", "the two commands must come first, right after the title"
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert all("#" in line for line in first_block), "each command says what it does"


def test_readme_stays_short() -> None:
    assert len(README.read_text().splitlines()) < 200, "the manual belongs in docs/; the README makes people try it"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file(page: Path) -> None:
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_every_page_is_in_the_site() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    absent = [p.relative_to(ROOT / "docs").as_posix() for p in PAGES if p.relative_to(ROOT / "docs").as_posix() not in nav]
    assert not absent, f"pages no one can reach from the site's navigation: {absent}"
