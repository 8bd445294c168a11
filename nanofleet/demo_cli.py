"""`nanofleet demo`: the main job (see issue: fleet service). For now it exports the default model."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
