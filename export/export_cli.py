"""`nanofleet export` and `nanofleet eval` (owned by the build-side work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
