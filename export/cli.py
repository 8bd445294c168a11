"""CLI commands of the build side. Module-level imports stay light (typer, rich); torch loads lazily."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Mount the build side's commands: export, eval (export_cli.py), export-adapter (adapters/cli.py) and
    verify-target (target/cli.py)."""
    from . import export_cli

    export_cli.register(app)
    from .adapters import cli as adapters_cli

    adapters_cli.register(app)
    from .target import cli as target_cli

    target_cli.register(app)
