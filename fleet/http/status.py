"""The service itself: health, a fleet summary, and the audit log."""

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from manifests.signing import key_id_of

from .. import schemas as S
from ..db import AuditEntry, BundleRecord, Deployment, Device
from ..views import audit_out
from .deps import Admin, Db, Svc

health = APIRouter(tags=["service"])  # mounted first, as it always was
router = APIRouter(tags=["service"])


@health.get("/healthz")
def healthz(svc: Svc) -> dict[str, Any]:
    return {
        "ok": True,
        "mqtt_connected": bool(svc.bridge and svc.bridge.connected.is_set()),
        "node": svc.node_id,
        "leader": svc.lease.is_leader(),  # holds the rollout lease (fleet/lease.py)
        "queue": svc.inbox.depths(),
    }


@router.get("/api/v1/audit", response_model=list[S.AuditOut])
def audit_log(
    session: Db,
    p: Admin,
    deployment: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 200,
) -> list[S.AuditOut]:
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if deployment:
        q = q.where(AuditEntry.deployment == deployment)
    return [audit_out(a) for a in session.scalars(q)]


@router.get("/api/v1/status", response_model=S.StatusOut)
def status(session: Db, svc: Svc, p: Admin) -> S.StatusOut:
    counts = session.execute(select(Deployment.status, func.count()).group_by(Deployment.status))
    deps = {st: n for st, n in counts}
    return S.StatusOut(
        devices=session.scalar(select(func.count()).select_from(Device)) or 0,
        online=session.scalar(select(func.count()).select_from(Device).where(Device.online.is_(True))) or 0,
        models=session.scalar(select(func.count()).select_from(BundleRecord)) or 0,
        deployments=deps,
        mqtt_url=svc.mqtt_url,
        mqtt_connected=bool(svc.bridge and svc.bridge.connected.is_set()),
        public_url=svc.public_url,
        fleet_key_id=key_id_of(svc.signing_key.public_key),
    )
