"""Devices: the registry (admin), each device's own record, credentials, desired state, telemetry, events."""

import base64
import binascii
import datetime as dt
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import and_, or_, select

from .. import commands
from .. import schemas as S
from ..db import Device, DeviceEvent, aware
from ..errors import FleetError
from ..views import credentials_out, device_out, event_out, telemetry_points
from .deps import Admin, Db, SelfOrAdmin, Svc, device_or_404

router = APIRouter(tags=["devices"])
MINE = {403: {"model": S.ErrorBody}, 404: {"model": S.ErrorBody}}


class BadCursor(FleetError):
    reason = "bad_cursor"


def _cursor(d: Device) -> str:
    raw = json.dumps([aware(d.enrolled_at).isoformat(), d.id]).encode()  # type: ignore[union-attr]
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(cursor: str) -> tuple[dt.datetime, str]:
    try:
        enrolled, device_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return dt.datetime.fromisoformat(enrolled), str(device_id)
    except (ValueError, TypeError, binascii.Error):
        raise BadCursor("cursor is not one this API returned (take it from the Link header)") from None


@router.get(
    "/api/v1/devices",
    response_model=list[S.DeviceOut],
    responses={400: {"model": S.ErrorBody}},
)
def list_devices(
    request: Request,
    response: Response,
    session: Db,
    p: Admin,
    limit: Annotated[int | None, Query(ge=1, le=5000, description="page size (default: every device)")] = None,
    cursor: Annotated[str | None, Query(max_length=512, description="from a previous page's Link header")] = None,
) -> list[S.DeviceOut]:
    """Every device in enrolment order; with ``limit``, one page of it. A page that is not the last says
    where the next starts: ``Link: <...?limit=N&cursor=C>; rel="next"`` (and ``X-Next-Cursor: C``). The
    body is the same list either way."""
    q = select(Device).order_by(Device.enrolled_at, Device.id)
    if cursor is not None:
        enrolled, device_id = _after(cursor)
        q = q.where(or_(Device.enrolled_at > enrolled, and_(Device.enrolled_at == enrolled, Device.id > device_id)))
    if limit is None:
        return [device_out(d) for d in session.scalars(q)]
    rows = list(session.scalars(q.limit(limit + 1)))
    if len(rows) > limit:
        rows = rows[:limit]
        nxt = _cursor(rows[-1])
        url = request.url.include_query_params(limit=limit, cursor=nxt)
        response.headers["link"] = f'<{url}>; rel="next"'
        response.headers["x-next-cursor"] = nxt
    return [device_out(d) for d in rows]


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
