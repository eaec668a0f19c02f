"""The docs stay whole: every reason has a troubleshooting entry, and every relative link resolves.

A new Reason without an entry in docs/troubleshooting.md fails here, as does a link in the README or
docs/ to a file or heading that moved.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

import pytest

from checkpointer import reasons

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"(`+)[^`]*?\1")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", page.read_text()))
    return [target for target in LINK.findall(text) if "://" not in target]


# Every enum of reasons users see: an object's Reason, a schedule's ScheduleReason, and any added later.
REASONS = [
    enum
    for name, enum in vars(reasons).items()
    if name.endswith("Reason") and isinstance(enum, type) and issubclass(enum, StrEnum)
]


def test_every_reason_has_a_troubleshooting_entry() -> None:
    assert reasons.Reason in REASONS
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    missing = [reason.value for enum in REASONS for reason in enum if f"\n### `{reason.value}`\n" not in text]
    assert not missing, f"docs/troubleshooting.md has no entry (### `Reason`) for: {', '.join(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        if target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_anchor_rule_is_githubs() -> None:
    page = ROOT / "docs" / "troubleshooting.md"
    found = anchors(page)
    assert "an-object-stays-scheduled" in found and "agentunavailable" in found
    assert "criufeaturemissing" in found


def tenant_field_rows() -> list[list[str]]:
    """The rows of docs/security.md's "Every field a tenant writes" tables, as their cells."""
    text = (ROOT / "docs" / "security.md").read_text()
    section = text.split("## Every field a tenant writes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| field ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_every_row_of_the_tenant_field_table_names_a_test_that_exists() -> None:
    rows = tenant_field_rows()
    assert len(rows) >= 40, "the table lost rows"
    for field, _reaches, rule, test in rows:
        if rule == "—":  # reaches nothing of checkpointer's: nothing to judge
            assert test == "—", field
            continue
        named = re.findall(r"`((?:e2e|unit)/[\w/]+\.py)(?:::(\w+))?`", test)
        assert named, f"the row of {field} names no test"
        for path, name in named:
            source = ROOT / "tests" / path
            assert source.exists(), f"{field}: {path} does not exist"
            if name:
                assert f"def {name}(" in source.read_text(), f"{field}: {path} has no test {name}"


def test_the_architecture_names_every_module_of_the_tree() -> None:
    text = (ROOT / "docs/architecture.md").read_text()
    block = text[text.index("operator/checkpointer/\n") :]
    block = block[: block.index("```")]
    package = ROOT / "operator" / "checkpointer"
    unnamed = [
        str(p.relative_to(package))
        for p in sorted(package.rglob("*.py"))
        if p.name != "__init__.py" or p.parent != package
        if not re.search(rf"\b{re.escape(p.name)}\b", block)
    ]
    assert unnamed == []
