"""CLI commands of the fleet side. Module-level imports must stay light (typer, rich)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Mount this part's commands on the root app."""
