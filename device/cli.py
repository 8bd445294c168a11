"""CLI commands of the device side. Module-level imports stay light: onnxruntime loads inside commands."""

from __future__ import annotations

import typer

device_app = typer.Typer(help="Run models and the update agent on a board.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Mount `nanofleet device ...` and the top-level `nanofleet bench`."""
    from . import engine_cli
    from .agent import cli as agent_cli

    engine_cli.register(app, device_app)
    agent_cli.register(app, device_app)
    from .offline import cli as offline_cli

    offline_cli.register(device_app)
    app.add_typer(device_app, name="device")
