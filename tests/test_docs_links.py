"""Every relative link in the user's guide and docs/ reaches a file, and a #fragment a heading there."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("examples/*/README.md"))]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation but `-` and `_` dropped, spaces to `-`,
    a repeated slug numbered `-1`, `-2`, ..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_guides_exist():
    assert len(GUIDES) > 5 and all(p.exists() for p in GUIDES)


def test_relative_links_resolve():
    broken = []
    for guide in GUIDES:
        text = re.sub(r"```.*?```", "", guide.read_text(), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                continue
            path, _, fragment = link.partition("#")
            target = (guide.parent / path) if path else guide
            if not target.exists():
                broken.append(f"{guide.relative_to(ROOT)}: {link} (no such file)")
            elif fragment and target.suffix == ".md" and fragment not in heading_anchors(target):
                broken.append(f"{guide.relative_to(ROOT)}: {link} (no such heading)")
    assert broken == []
