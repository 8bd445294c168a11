"""`nanofleet fleet export-update`, `import-telemetry` and `offline-devices` (through the REST API,
with the fleet group's --url/--token/--config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def export_update(
    ctx: typer.Context,
    deployment: str = typer.Option(..., "--deployment", "-d", help="The deployment to carry."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder on the stick (created if missing)."),
    device: list[str] = typer.Option([], "--device", help="Only this target device (repeatable)."),
    all_waves: bool = typer.Option(False, "--all-waves", help="Include devices of waves not reached yet."),
    valid_days: float = typer.Option(30.0, "--valid-days", help="The package expires after this many days."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Write a portable update package for a deployment's waiting devices onto removable media.

    The package holds the signed bundle, a deployment document signed by the fleet key that names the
    target devices (and hardware classes) and expires, and the sha256 of every file. It is written
    atomically (temp folder on the stick, fsync, rename); the command refuses when the stick is too small.
    Devices still pending are started now, as the rollout would; their results count once their
    telemetry comes back (`nanofleet fleet import-telemetry`).
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from manifests.cli_output import console, emit_json, fail
    from manifests.cli_output import out as stdout
    from manifests.offline.errors import OfflineError

    from ..errors import FleetError
    from .media import write_package

    try:
        with (
            ctx.obj.client() as client,
            Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(binary_units=True),  # MiB, as every size nanofleet prints
                TransferSpeedColumn(),
                console=console,
                transient=True,
                disable=as_json,
            ) as bar,
        ):
            task = bar.add_task(f"writing {deployment}", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            res = write_package(
                client,
                deployment,
                out,
                devices=device or None,
                all_waves=all_waves,
                valid_days=valid_days,
                progress=progress,
            )
    except FleetError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    except OfflineError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    if as_json:
        emit_json({"ok": True, **res.to_dict()})
        return
    stdout.print(
        f"[green]wrote[/] {res.bundle} for {len(res.devices)} device(s) ({', '.join(res.devices[:8])}"
        f"{' ...' if len(res.devices) > 8 else ''}) to {res.path} ({res.bytes:,} bytes, "
        f"expires {res.expires_at})"
    )


def import_telemetry(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="A .nftelemetry file or a folder (the stick) holding them."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Import telemetry exports written by `nanofleet device export-telemetry`.

    Each file (format 2) is checked against the ed25519 signature its board made with the board's own
    key (the fleet holds only the public half) and imported in one transaction, or not at all; a format-1
    file, a board with no registered key or a bad signature is refused with its reason. Importing the same
    file twice ingests nothing twice. The devices' update results then count
    in their rollouts. Exit code 1 when any file was refused.
    """
    from manifests.cli_output import emit_json, fail, out
    from manifests.offline.errors import OfflineError

    from ..errors import FleetError
    from .media import import_files

    try:
        with ctx.obj.client() as client:
            results = import_files(client, path)
    except (FleetError, OfflineError) as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    ok = all(r["ok"] for r in results)
    if as_json:
        emit_json({"ok": ok, "files": results})
    else:
        for r in results:
            name = Path(r["file"]).name
            if not r["ok"]:
                out.print(f"[red]refused[/] {name}: {r['error']}")
            elif r.get("duplicate"):
                out.print(
                    f"[yellow]already imported[/] {name} (device {r['device_id']}, at {r['imported_at']})"
                )
            else:
                out.print(
                    f"[green]imported[/] {name}: device {r['device_id']}, {r['telemetry']} telemetry, "
                    f"{r['events']} events ({r['already_known']} already known); update state "
                    f"{r['reported_state']} ({r.get('last_result') or '-'})"
                )
    raise typer.Exit(0 if ok else 1)


def offline_devices(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")
) -> None:
    """Devices served by removable media: last package sent, last telemetry import, model, result."""
    from rich.table import Table

    from manifests.cli_output import emit_json, fail, out

    from ..errors import FleetError

    try:
        with ctx.obj.client() as client:
            rows: list[dict[str, Any]] = client.offline_devices()
    except FleetError as exc:
        fail(exc.message, as_json=as_json, reason=exc.reason)
    if as_json:
        emit_json(rows)
        return
    table = Table(
        "device", "last import", "imports", "exported at", "last package", "model", "update", "result"
    )
    for r in rows:
        table.add_row(
            r["device_id"],
            r["last_import"] or "[yellow]never[/]",
            str(r["imports"]),
            r["last_exported_at"] or "-",
            f"{r['last_package'] or '-'} ({r['last_package_at'] or '-'})",
            r["model"] or "-",
            r["update_state"] or "-",
            r["last_result"] or "-",
        )
    out.print(table)


def register(fleet_app: typer.Typer) -> None:
    fleet_app.command("export-update")(export_update)
    fleet_app.command("import-telemetry")(import_telemetry)
    fleet_app.command("offline-devices")(offline_devices)
