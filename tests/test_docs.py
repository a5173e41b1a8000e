"""Every ``math.md §N`` cited in the code and docs names a section of docs/math.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def math_sections() -> set[str]:
    """``"3"``, ``"3.7"``, ...: the ``## N.`` headings and the numbered items under them."""
    found: set[str] = set()
    top = None
    for line in (ROOT / "docs" / "math.md").read_text().splitlines():
        m = re.match(r"## (\d+)\. ", line)
        if m:
            top = m.group(1)
            found.add(top)
            continue
        m = re.match(r"(\d+)\. ", line)
        if m and top is not None:
            found.add(f"{top}.{m.group(1)}")
    return found


def test_every_math_citation_resolves():
    sections = math_sections()
    assert {"1", "2", "3.7", "4.5", "7.4"} <= sections
    cited: dict[str, list[str]] = {}
    files = [*ROOT.glob("ultramem/**/*.py"), *ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("docs/*.md"),
             ROOT / "README.md"]
    for path in files:
        for ref in re.findall(r"math\.md §(\d+(?:\.\d+)?)", path.read_text()):
            cited.setdefault(ref, []).append(str(path.relative_to(ROOT)))
    assert len(cited) > 10
    missing = {ref: where[:3] for ref, where in cited.items() if ref not in sections}
    assert not missing, f"citations of math.md sections that do not exist: {missing}"
