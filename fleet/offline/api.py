"""REST endpoints for offline media, mounted into the service's app by ``fleet.api.create_app``.

Every write is a command (``fleet.commands.offline``) run on the service's worker, like the others.
(No ``from __future__ import annotations`` here: FastAPI must see the real ``Admin`` dependency type.)
"""

from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from manifests.offline.format import MAX_TELEMETRY_FILE_BYTES

from .. import schemas as S
from ..commands import PackageOptions, import_telemetry_file, prepare_package
from ..service import FleetService
from .service import TelemetryImportError, offline_devices


class PackageRequest(BaseModel):
    devices: list[str] | None = Field(None, description="only these targets (default: all waiting ones)")
    all_waves: bool = Field(False, description="also devices of waves the rollout has not reached yet")
    valid_days: float = Field(30.0, gt=0, le=3650, description="the package expires after this")
    dry_run: bool = Field(False, description="only say which devices and how many bytes; change nothing")


def mount(app: FastAPI, svc: FleetService, admin: Any) -> None:
    @app.post(
        "/api/v1/deployments/{name}/offline-package",
        tags=["offline"],
        responses={404: {"model": S.ErrorBody}, 409: {"model": S.ErrorBody}},
    )
    def offline_package(name: str, body: PackageRequest, p: admin) -> dict[str, Any]:  # type: ignore[valid-type]
        """Sign an offline update package document for this deployment's waiting devices (the CLI
        `nanofleet fleet export-update` then copies it and the bundle onto removable media)."""
        options = PackageOptions(
            devices=body.devices,
            all_waves=body.all_waves,
            valid_for_s=body.valid_days * 86400,
            dry_run=body.dry_run,
        )
        return svc.execute(prepare_package, name, options, actor=p.name).value

    @app.post("/api/v1/offline/telemetry", tags=["offline"])
    async def offline_telemetry(request: Request, p: admin) -> dict[str, Any]:  # type: ignore[valid-type]
        """Import one telemetry export file (the raw bytes of a .nftelemetry file)."""
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_TELEMETRY_FILE_BYTES:
                raise TelemetryImportError(f"the export is over {MAX_TELEMETRY_FILE_BYTES} bytes")
        raw = bytes(data)
        # The worker runs the import; this event loop must not block while it waits.
        result = await run_in_threadpool(svc.execute, import_telemetry_file, raw, actor=p.name)
        return result.value

    @app.get("/api/v1/offline/devices", tags=["offline"])
    def offline_device_list(p: admin) -> list[dict[str, Any]]:  # type: ignore[valid-type]
        """Devices that came home on removable media, with their last import time."""
        with svc.sessions() as session:
            return offline_devices(session)
