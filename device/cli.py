"""CLI commands of the device side. Module-level imports stay light: onnxruntime loads inside commands."""

from __future__ import annotations

import os
from pathlib import Path
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
    device_app.command("enroll")(enroll)
    app.add_typer(device_app, name="device")


def _default_data_dir() -> Path:
    return Path("/var/lib/nanofleet") if os.geteuid() == 0 else Path.home() / ".local/share/nanofleet"


def enroll(
    fleet: str = typer.Option(..., "--fleet", help="The fleet service's URL, as this board reaches it."),
    token: str = typer.Option(
        ...,
        "--token",
        envvar="NANOFLEET_ENROLL_TOKEN",
        help="One-time enrolment token (`nanofleet fleet enroll-token`).",
    ),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="The agent's data folder: A/B slots, state, outbox. Default: /var/lib/nanofleet "
        "as root, else ~/.local/share/nanofleet.",
    ),
    config_dir: Path | None = typer.Option(
        None, "--config-dir", help="Where agent.yaml, the credentials and trusted-keys/ go. Default: the data folder."
    ),
    device_id: str | None = typer.Option(None, "--device-id", help="This board's id. Default: its hostname."),
    hardware_class: str | None = typer.Option(
        None, "--hardware-class", help="What deployments select on (pi4, pi5, jetson...). Default: detected."
    ),
    tag: list[str] = typer.Option([], "--tag", help="key=value for deployment selectors; repeatable."),
    group: list[str] = typer.Option([], "--group", help="A group for deployment selectors; repeatable."),
    api_bind: str = typer.Option("127.0.0.1", "--api-bind", help="Address of the local OpenAI-compatible API."),
    api_port: int = typer.Option(8080, "--api-port", min=1, max=65535, help="Port of the local API."),
    mqtt_url: str | None = typer.Option(
        None, "--mqtt-url", help="The broker as this board reaches it. Default: what the fleet announces."
    ),
    trusted_key: list[Path] = typer.Option(
        [], "--trusted-key", help="Another public key to trust for bundles (PEM); repeatable."
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="Any other agent setting, as key.path=value (e.g. limits.threads=2); repeatable."
    ),
    systemd: bool = typer.Option(
        False, "--systemd", help="Also install, enable and start the nanofleet-agent systemd unit (as root)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (errors as JSON too)."),
) -> None:
    """Join a fleet: fetch what the board needs, swap the one-time token for this board's credentials, write
    a validated agent.yaml with its key files, and say what to run next. Refuses to touch a board that is
    already enrolled; on any error nothing is written."""
    from manifests.cli_output import emit_json, fail, out

    from .agent.enroll import EnrollError, EnrollRequest, Systemd, detect_hardware_class, parse_settings
    from .agent.enroll import enroll as do_enroll

    try:
        tags = dict(_key_value(t, "--tag") for t in tag)
        unit = Systemd() if systemd else None
        if unit is not None:
            unit.preflight()
        req = EnrollRequest(
            fleet_url=fleet,
            token=token,
            data_dir=data_dir or _default_data_dir(),
            config_dir=config_dir,
            device_id=device_id,
            hardware_class=hardware_class or detect_hardware_class(),
            tags=tags,
            groups=list(group),
            api_bind=api_bind,
            api_port=api_port,
            mqtt_url=mqtt_url,
            trusted_keys=list(trusted_key),
            settings=parse_settings(list(settings)),
        )
        result = do_enroll(req)
    except EnrollError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    started = None
    if unit is not None:
        try:
            started = unit.install(result)
        except EnrollError as exc:
            fail(
                f"enrolled as {result.device_id} ({result.config}), but the unit was not started: {exc.message}",
                as_json=as_json,
                reason="systemd",
            )
    run_cmd = f"nanofleet device run --config {result.config}"
    status_cmd = f"nanofleet device status --config {result.config}"
    if as_json:
        emit_json(
            {**result.as_dict(), "unit": str(started) if started else None, "next": status_cmd if started else run_cmd}
        )
        return
    lines = [
        f"[green]enrolled[/] {result.device_id} with {result.fleet_url} (broker {result.mqtt_url})",
        f"  config        {result.config}",
        f"  credentials   {result.config.parent}/mqtt.password, api.token (mode 0600)",
        f"  trusted keys  {', '.join(result.trusted_key_ids)}",
        f"  data          {result.data_dir}",
        f"  local API     {result.api} (bearer token in api.token)",
        *(f"[yellow]note:[/] {note}" for note in result.notes),
        f"started {started.name}; next: {status_cmd}" if started else f"next: {run_cmd}",
    ]
    # soft_wrap: the commands stay whole lines, to copy and paste.
    out.print("\n".join(lines), soft_wrap=True)


def _key_value(item: str, option: str) -> tuple[str, str]:
    from .agent.enroll import EnrollError

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise EnrollError(f"{option} wants key=value, got {item!r}")
    return key, value
