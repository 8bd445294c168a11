"""Offline-media commands: sign an update package for a deployment's waiting devices (starting those
still pending, as the rollout would), and import a telemetry export (``fleet/offline/service.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..offline import service as offline
from ..rollout import ensure_planned, get_deployment
from .base import CommandContext, CommandResult


@dataclass(frozen=True)
class PackageOptions:
    devices: list[str] | None = None  # only these targets (default: every waiting one)
    all_waves: bool = False  # also devices of waves the rollout has not reached yet
    valid_for_s: float = 30 * 24 * 3600
    dry_run: bool = False  # only say which devices and how many bytes; change nothing


def prepare_package(
    ctx: CommandContext, deployment: str, options: PackageOptions, *, actor: str
) -> CommandResult[dict[str, Any]]:
    """The signed package document (the CLI copies it and the bundle onto the stick). A deployment still
    ``planning`` is planned first (its targets are what the package is for)."""
    ensure_planned(ctx.session, get_deployment(ctx.session, deployment), actor, ctx.now)
    prepared = offline.prepare_package(
        ctx.session,
        ctx.env.rollouts,
        ctx.env.signing_key,
        deployment,
        actor=actor,
        now=ctx.now,
        devices=options.devices,
        all_waves=options.all_waves,
        valid_for_s=options.valid_for_s,
        dry_run=options.dry_run,
    )
    return CommandResult(prepared.body, prepared.changed_devices)


def import_telemetry_file(ctx: CommandContext, data: bytes, *, actor: str) -> CommandResult[dict[str, Any]]:
    """Verify and ingest one telemetry export; importing the same export again ingests nothing."""
    result = offline.import_telemetry_file(
        ctx.session, data, actor=actor, now=ctx.now, pause_dir=ctx.env.config.data_dir
    )
    return CommandResult(result)
