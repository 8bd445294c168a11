"""`nanofleet device serve|chat` and `nanofleet bench` (owned by the engine work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, device_app: typer.Typer) -> None:
    pass
