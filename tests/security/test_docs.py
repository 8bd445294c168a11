"""docs/security.md keeps its promise (issue 15, "Done when"): every row of its fault matrix names a test,
and every test the page names exists, so a renamed or deleted test cannot leave the page pointing at
nothing."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "security.md"
# `tests/part/file.py::name`, or `::name` meaning the file named last on the same line.
NAMED = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def _named_tests(line: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    current: str | None = None
    for m in NAMED.finditer(line):
        path, name = m.groups()
        current = path or current
        if current and (path or name):
            out.append((current, name))
    return out


def _fault_matrix_rows() -> list[str]:
    text = PAGE.read_text()
    section = text[text.index("## Fault matrix") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith(("| fault", "|---"))]


def test_every_fault_matrix_row_names_a_test() -> None:
    rows = _fault_matrix_rows()
    assert len(rows) >= 20, "the fault matrix lost its rows"
    unnamed = [row[:80] for row in rows if not any(name for _, name in _named_tests(row.rsplit("|", 2)[1]))]
    assert unnamed == [], f"rows without a test: {unnamed}"


def test_every_test_the_page_names_exists() -> None:
    missing = []
    for line in PAGE.read_text().splitlines():
        for path, name in _named_tests(line):
            file = REPO / path
            if not file.is_file():
                missing.append(path)
            elif name and not re.search(rf"^(async )?def {name}\b", file.read_text(), re.M):
                missing.append(f"{path}::{name}")
    assert missing == [], f"docs/security.md names tests that do not exist: {missing}"
