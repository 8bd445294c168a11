"""`nanofleet device run|status` (owned by the agent work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, device_app: typer.Typer) -> None:
    pass
