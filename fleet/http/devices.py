"""Devices: the registry (admin), each device's own record, credentials, desired state, telemetry, events."""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from sqlalchemy import select

from .. import commands
from .. import schemas as S
from ..db import Device, DeviceEvent
from ..views import credentials_out, device_out, event_out, telemetry_points
from .deps import Admin, Db, SelfOrAdmin, Svc, device_or_404

router = APIRouter(tags=["devices"])
MINE = {403: {"model": S.ErrorBody}, 404: {"model": S.ErrorBody}}


@router.get("/api/v1/devices", response_model=list[S.DeviceOut])
def list_devices(session: Db, p: Admin) -> list[S.DeviceOut]:
    return [device_out(d) for d in session.scalars(select(Device).order_by(Device.enrolled_at, Device.id))]


@router.get("/api/v1/devices/{device_id}", response_model=S.DeviceOut, responses=MINE)
def get_device(device_id: str, session: Db, p: SelfOrAdmin) -> S.DeviceOut:
    return device_out(device_or_404(session, device_id))


@router.patch("/api/v1/devices/{device_id}", response_model=S.DeviceOut, responses={404: {"model": S.ErrorBody}})
def patch_device(device_id: str, body: S.DevicePatch, svc: Svc, p: Admin) -> S.DeviceOut:
    return svc.execute(commands.update_device, device_id, body, actor=p.name).value


@router.delete("/api/v1/devices/{device_id}", status_code=204, responses={404: {"model": S.ErrorBody}})
def delete_device(device_id: str, svc: Svc, p: Admin) -> Response:
    svc.execute(commands.delete_device, device_id, actor=p.name)
    return Response(status_code=204)


@router.get("/api/v1/devices/{device_id}/credentials", response_model=S.CredentialsOut, responses=MINE)
def get_credentials(device_id: str, session: Db, svc: Svc, p: SelfOrAdmin) -> S.CredentialsOut:
    """A device's connection details. The secret is never readable again (only its hash is kept)."""
    device_or_404(session, device_id)
    return credentials_out(svc, device_id)


@router.post("/api/v1/devices/{device_id}/credentials/rotate", response_model=S.EnrollResponse, responses=MINE)
def rotate_credentials(device_id: str, svc: Svc, p: SelfOrAdmin) -> S.EnrollResponse:
    return svc.execute(commands.rotate_credentials, device_id, actor=p.name).value


@router.get("/api/v1/devices/{device_id}/desired", responses=MINE)
def get_desired(device_id: str, session: Db, p: SelfOrAdmin) -> dict[str, Any] | None:
    """The desired state also published (retained) on MQTT; for agents that poll over HTTP."""
    return device_or_404(session, device_id).desired


@router.get("/api/v1/devices/{device_id}/telemetry", response_model=list[S.TelemetryPoint], responses=MINE)
def telemetry(
    device_id: str,
    session: Db,
    svc: Svc,
    p: SelfOrAdmin,
    limit: Annotated[int, Query(ge=1, le=10000)] = 500,
) -> list[S.TelemetryPoint]:
    """Newest first: raw samples within the retention window, then downsampled rollups."""
    device_or_404(session, device_id)
    return telemetry_points(session, device_id, limit, svc.config.telemetry.rollup_bucket_s)


@router.get("/api/v1/devices/{device_id}/events", response_model=list[S.EventOut], responses=MINE)
def events(
    device_id: str, session: Db, p: SelfOrAdmin, limit: Annotated[int, Query(ge=1, le=10000)] = 200
) -> list[S.EventOut]:
    device_or_404(session, device_id)
    rows = session.scalars(
        select(DeviceEvent).where(DeviceEvent.device_id == device_id).order_by(DeviceEvent.seq.desc()).limit(limit)
    ).all()
    return [event_out(r) for r in rows]
