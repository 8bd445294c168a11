"""CLI commands of the device side. Module-level imports stay light: onnxruntime loads inside commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from .agent.agent import ExtensionFactory

device_app = typer.Typer(help="Run models and the update agent on a board.", no_args_is_help=True)


def agent_extensions() -> list[ExtensionFactory]:
    """What runs beside the agent: the removable-media watcher (device.offline builds on device.agent, so
    it is plugged in here, the one module above both)."""
    from .offline.watcher import OfflineWatcher

    return [OfflineWatcher.for_agent]


def register(app: typer.Typer) -> None:
    """Mount `nanofleet device ...` and the top-level `nanofleet bench`."""
    from . import engine_cli
    from .agent import cli as agent_cli
    from .offline import cli as offline_cli

    engine_cli.register(app, device_app)
    agent_cli.register(app, device_app, extensions=agent_extensions)
    offline_cli.register(device_app)
    app.add_typer(device_app, name="device")
