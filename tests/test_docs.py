"""The documentation's relative links (README.md, docs/*.md) lead to files, and anchors, that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens; repeats get -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            where = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest.name
            bad.append(f"{target}: no heading #{anchor} in {where}")
    return bad


def test_relative_links_resolve():
    assert PAGES[1:], "docs/*.md not found"
    problems = {str(p.relative_to(REPO)): broken_links(p) for p in PAGES}
    assert not {k: v for k, v in problems.items() if v}


def test_the_checker_catches_a_missing_file_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A title, here\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-title-here) [web](https://example.com/x) [self](#top)\n"
        "# Top\n```\n[in code](nowhere.md)\n```\n[gone](missing.md) [bad anchor](there.md#nope)\n"
    )
    assert broken_links(page) == ["missing.md: no such file", "there.md#nope: no heading #nope in there.md"]
