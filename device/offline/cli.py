"""`nanofleet device install PATH` and `nanofleet device export-telemetry --out DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

CONFIG_HELP = "Agent config YAML (see manifests/examples/agent.yaml)."


def install(
    path: Path = typer.Argument(..., help="An update package folder, or a stick's folder holding packages."),
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds to wait for the running agent."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    log_level: str = typer.Option("WARNING", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Install an update package from removable media, with no network.

    Runs the agent's update state machine (signature, anti-rollback, expiry, size caps, A/B slots, health
    check, rollback). A package for other boards, an expired or a tampered one is refused before anything
    changes. When the agent is running, the package is handed to it and this command waits for the
    result; otherwise the update runs here and the next `nanofleet device run` serves it.
    Exit codes: 0 installed (or already installed), 1 refused or failed.
    """
    import logging

    from device.agent.config import load_config
    from device.agent.errors import AgentError
    from manifests.cli_output import console, emit_json, fail, out
    from manifests.offline.errors import OfflineError

    from .install import install as do_install

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config)
        with console.status(f"installing from {path} ..."):
            result = do_install(cfg, path, timeout_s=timeout)
    except OfflineError as exc:
        fail(
            f"{exc.message} (nothing was changed)" if exc.reason != "timeout" else exc.message,
            as_json=as_json,
            reason=exc.reason,
        )
    except AgentError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    if as_json:
        emit_json(result.to_dict())
    else:
        colour = "green" if result.ok else "red"
        out.print(
            f"[{colour}]{result.outcome}[/]: {result.bundle} from package {result.package_id} "
            f"(deployment {result.deployment}, via {result.via})"
        )
        out.print(
            f"update state: {result.state}; active slot: {result.active_slot or '-'}; "
            f"committed: {result.committed or 'none'}"
        )
        if result.error:
            out.print(f"[red]error ({result.reason}):[/] {result.error}")
        if result.outcome == "duplicate":
            out.print(
                f"this package's command was handled before (result: {result.details.get('previous_result')})"
            )
    raise typer.Exit(0 if result.ok else 1)


def export_telemetry(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder on the stick to write the file into."),
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Write the store-and-forward queue (telemetry, events, update results) to removable media.

    The file is authenticated with the device credential and written atomically. Exported entries leave
    the queue, so the online path never sends them again; a copy stays in <data_dir>/offline/exported.
    Take it to the fleet: `nanofleet fleet import-telemetry DIR`.
    """
    from device.agent.config import load_config
    from device.agent.errors import AgentError
    from manifests.cli_output import emit_json, fail, out
    from manifests.offline.errors import OfflineError

    from .telemetry import export_telemetry as do_export

    try:
        cfg = load_config(config)
        res = do_export(cfg, out_dir, keep=cfg.offline.archive_exports)
    except (OfflineError, AgentError) as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    if as_json:
        emit_json(res.to_dict())
        return
    out.print(
        f"[green]exported[/] {res.telemetry} telemetry samples and {res.events} events "
        f"(update state: {res.reported_state}) to {res.path} ({res.bytes:,} bytes)"
    )


def register(device_app: typer.Typer) -> None:
    device_app.command("install")(install)
    device_app.command("export-telemetry")(export_telemetry)
