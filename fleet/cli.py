"""CLI commands of the fleet service (`nanofleet fleet ...`). Module-level imports stay light."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
