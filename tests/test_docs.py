"""The README stays a short guide whose links resolve, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    return [a or b for a, b in LINK.findall(text)]


def test_the_readme_is_at_most_250_lines() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_and_anchor_resolves() -> None:
    broken = []
    for page in PAGES:
        for link in _links(page):
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            target, _, anchor = link.partition("#")
            file = (page.parent / target).resolve() if target else page
            if not file.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_links_are_checked_at_all() -> None:
    """The pattern finds the README's links to the docs pages (a regex that matched nothing would pass above)."""
    links = _links(ROOT / "README.md")
    assert "docs/performance.md" in links and "bench/RESULTS.md" in links
    assert {p.name for p in (ROOT / "docs").glob("*.md")} <= {Path(x.partition("#")[0]).name for x in links}


def test_ci_runs_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line).replace(" -q", "")
    assert command in readme, command


def test_every_result_file_named_in_the_docs_and_notes_exists() -> None:
    """`bench/results/...` and `results/...` paths (bench/NOTES.md's form) point at stored runs."""
    missing = []
    for page in [*PAGES, ROOT / "bench" / "NOTES.md"]:
        for path in re.findall(r"`((?:bench/)?results/[^`\s]*)`", page.read_text()):
            if "*" in path or "DATE" in path:  # a pattern, not a file
                continue
            if not (ROOT / "bench" / path.removeprefix("bench/")).exists():
                missing.append(f"{page.name}: {path}")
    assert not missing, "\n".join(missing)
