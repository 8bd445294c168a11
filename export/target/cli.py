"""`nanofleet verify-target` (owned by the target-verification work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
