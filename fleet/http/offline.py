"""Offline media: sign update packages for devices that are reached by stick, import their telemetry
exports, and list them (``fleet/offline/``, docs/offline.md)."""

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from manifests.offline.format import MAX_TELEMETRY_FILE_BYTES

from .. import commands
from .. import schemas as S
from ..offline.service import TelemetryImportError, offline_devices
from .deps import Admin, Db, Svc

router = APIRouter(tags=["offline"])


class PackageRequest(BaseModel):
    devices: list[str] | None = Field(None, description="only these targets (default: all waiting ones)")
    all_waves: bool = Field(False, description="also devices of waves the rollout has not reached yet")
    valid_days: float = Field(30.0, gt=0, le=3650, description="the package expires after this")
    dry_run: bool = Field(False, description="only say which devices and how many bytes; change nothing")


@router.post(
    "/api/v1/deployments/{name}/offline-package",
    responses={404: {"model": S.ErrorBody}, 409: {"model": S.ErrorBody}},
)
def offline_package(name: str, body: PackageRequest, svc: Svc, p: Admin) -> dict[str, Any]:
    """Sign an offline update package document for this deployment's waiting devices (the CLI
    `nanofleet fleet export-update` then copies it and the bundle onto removable media)."""
    options = commands.PackageOptions(
        devices=body.devices,
        all_waves=body.all_waves,
        valid_for_s=body.valid_days * 86400,
        dry_run=body.dry_run,
    )
    return svc.execute(commands.prepare_package, name, options, actor=p.name).value


@router.post("/api/v1/offline/telemetry")
async def offline_telemetry(request: Request, svc: Svc, p: Admin) -> dict[str, Any]:
    """Import one telemetry export file (the raw bytes of a .nftelemetry file)."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_TELEMETRY_FILE_BYTES:
            raise TelemetryImportError(f"the export is over {MAX_TELEMETRY_FILE_BYTES} bytes")
    # The worker runs the import; this event loop must not block while it waits.
    result = await run_in_threadpool(svc.execute, commands.import_telemetry_file, bytes(data), actor=p.name)
    return result.value


@router.get("/api/v1/offline/devices")
def offline_device_list(session: Db, p: Admin) -> list[dict[str, Any]]:
    """Devices that came home on removable media, with their last import time."""
    return offline_devices(session)
