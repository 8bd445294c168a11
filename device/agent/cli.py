"""`nanofleet device run|status` (owned by the agent work). Heavy imports happen inside the commands."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from .agent import ExtensionFactory
    from .config import AgentConfig

# What the composition root (device/cli.py) adds to a running agent; called only by `device run`, so the
# packages behind it are imported only then.
ExtensionsProvider = Callable[[], Sequence["ExtensionFactory"]]

CONFIG_HELP = "Agent config YAML (see manifests/examples/agent.yaml)."


def run_command(extensions: ExtensionsProvider) -> Callable[..., None]:
    """`device run`, running the agent with what ``extensions`` returns beside it."""

    def run(
        config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
        log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
        as_json: bool = typer.Option(False, "--json", help="Start-up errors as a JSON object on stdout."),
    ) -> None:
        """Run the device agent: serve the committed model, take OTA updates, send telemetry over MQTT.

        Runs until SIGTERM. A/B slots and the update state live in the config's data_dir; after a crash
        the agent resumes per the resume map (docs/ota.md). Update packages on removable media under the
        config's offline.watch_dirs are picked up too (docs/offline.md).
        """
        import logging
        import signal

        from manifests.cli_output import fail

        from .config import load_config
        from .errors import AgentError

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            cfg = load_config(config)
            preflight(cfg)
            from .agent import Agent

            agent = Agent(cfg, extensions=extensions())
            logging.getLogger("nanofleet.agent").info("%s", startup_line(cfg, agent.version))
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: agent.stop())
            code = agent.run()
        except AgentError as exc:
            fail(exc.message, as_json=as_json, reason=exc.reason)
        raise typer.Exit(code)

    return run


def preflight(cfg: AgentConfig) -> None:
    """What the agent needs before it creates anything in its data folder: its keys and secrets readable,
    the data folder creatable. Each failure is one ConfigError naming the file."""
    from .errors import ConfigError

    cfg.trust_store()
    cfg.mqtt.resolved_password()
    cfg.api.resolved_token()
    existing = cfg.data_dir
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"data_dir {cfg.data_dir}: {existing} is not writable by this user")


def startup_line(cfg: AgentConfig, version: str) -> str:
    fleet = cfg.artifacts.base_url.removesuffix("/").removesuffix("/bundles")
    return (
        f"nanofleet agent {version} ({cfg.device_id}): data {cfg.data_dir}, broker {cfg.mqtt.url} "
        f"(MQTT {cfg.mqtt.protocol}), local API http://{cfg.api.bind}:{cfg.api.port}/v1, fleet {fleet}/"
    )


def status(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Show the update state, both slots (bundle name, version, manifest hash), the committed version and
    the broker connection (as last written by the running agent)."""
    from manifests.cli_output import emit_json, fail, out

    from .agent import read_status
    from .config import load_config
    from .errors import AgentError
    from .store import StateStore

    try:
        cfg = load_config(config)
        rec = StateStore(cfg.layout.state_file).load()
    except AgentError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    live = read_status(cfg.data_dir)
    running = bool(live and _pid_alive(int(live.get("pid", 0))))
    committed = rec.committed
    doc: dict[str, Any] = {
        "device_id": cfg.device_id,
        "state": rec.state.value,
        "deployment_id": rec.deployment_id,
        "target": rec.target.model_dump() if rec.target else None,
        "active_slot": rec.active_slot,
        "slots": {k: (v.model_dump() if v else None) for k, v in rec.slots.items()},
        "committed": committed.model_dump() if committed else None,
        "highest_committed": rec.highest_committed,
        "last_result": rec.last_result,
        "error": rec.error,
        "error_reason": rec.error_reason,
        "error_state": rec.error_state,
        "agent_running": running,
        "broker": {
            "url": cfg.mqtt.url,
            "connected": bool(running and live and live.get("broker_connected")),
            "last_connect": live.get("last_connect") if live else None,
            "last_error": live.get("last_error") if live else None,
        },
        "outbox": {"pending": live.get("outbox_pending"), "dropped": live.get("outbox_dropped")}
        if live
        else None,
        "serving": live.get("serving") if running and live else None,
        "status_written_at": live.get("ts") if live else None,
    }
    if as_json:
        emit_json(doc)
        return
    from rich.table import Table

    out.print(
        f"[bold]{cfg.device_id}[/]  update state: [bold]{rec.state.value}[/]"
        f"  deployment: {rec.deployment_id or '-'}  last result: {rec.last_result or '-'}"
    )
    if rec.error:
        where = f" in {rec.error_state}" if rec.error_state else ""
        out.print(f"[red]error{where} ({rec.error_reason or 'unknown'}):[/] {rec.error}", soft_wrap=True)
    table = Table("slot", "active", "bundle", "version", "manifest sha256")
    for name, info in rec.slots.items():
        table.add_row(
            name,
            "*" if name == rec.active_slot else "",
            (info.name or "-") if info else "(empty)",
            str(info.version) if info and info.version is not None else "-",
            (info.manifest_sha256 or "-")[:16] if info else "-",
        )
    out.print(table)
    out.print(f"committed: {committed.name}@{committed.version}" if committed else "committed: none")
    conn = doc["broker"]
    state = "connected" if conn["connected"] else ("agent not running" if not running else "disconnected")
    out.print(f"broker {cfg.mqtt.url}: {state}" + (f" ({conn['last_error']})" if conn["last_error"] else ""))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def register(app: typer.Typer, device_app: typer.Typer, *, extensions: ExtensionsProvider = tuple) -> None:
    device_app.command("run")(run_command(extensions))
    device_app.command("status")(status)
