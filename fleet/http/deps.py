"""What the REST API's routes depend on: the service, a read session, and who is calling.

Admin endpoints take the admin token; device endpoints take a device's own token (``nfd_…``); bundle
files are public. (No ``from __future__ import annotations`` in this package: FastAPI reads the real
annotations.)
"""

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..credentials import DEVICE_TOKEN_PREFIX, hash_secret
from ..db import Device
from ..errors import NotFoundError
from ..rollout import MAX_VERSION
from ..service import FleetService

bearer = HTTPBearer(auto_error=False)
# Bundle versions are positive 32-bit integers everywhere (database columns included).
Version = Annotated[int, PathParam(ge=1, le=MAX_VERSION)]


class Principal:
    def __init__(self, kind: str, device_id: str | None = None) -> None:
        self.kind = kind
        self.device_id = device_id

    @property
    def name(self) -> str:
        return "admin" if self.kind == "admin" else f"device:{self.device_id}"


def unauthorized(msg: str = "missing or invalid bearer token") -> HTTPException:
    return HTTPException(401, msg, headers={"WWW-Authenticate": "Bearer"})


def service(request: Request) -> FleetService:
    return request.app.state.service


Svc = Annotated[FleetService, Depends(service)]


def db(svc: Svc) -> Iterator[Session]:
    """A session for reading (writes go through ``svc.execute`` and the worker)."""
    with svc.sessions() as session:
        yield session


Db = Annotated[Session, Depends(db)]


def principal(
    cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], session: Db, svc: Svc
) -> Principal:
    if cred is None or not cred.credentials:
        raise unauthorized()
    token = cred.credentials
    if hmac.compare_digest(token.encode(), svc.admin_token.encode()):
        return Principal("admin")
    if token.startswith(DEVICE_TOKEN_PREFIX):
        dev = session.scalar(select(Device).where(Device.secret_hash == hash_secret(token)))
        if dev is not None:
            return Principal("device", dev.id)
    raise unauthorized()


def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if p.kind != "admin":
        raise HTTPException(403, "this endpoint needs the admin token")
    return p


def self_or_admin(device_id: str, p: Annotated[Principal, Depends(principal)]) -> Principal:
    if p.kind == "admin" or p.device_id == device_id:
        return p
    raise HTTPException(403, "a device may only access its own record")


Admin = Annotated[Principal, Depends(admin)]
SelfOrAdmin = Annotated[Principal, Depends(self_or_admin)]


def device_or_404(session: Session, device_id: str) -> Device:
    d = session.get(Device, device_id)
    if d is None:
        raise NotFoundError(f"no device {device_id!r}")
    return d
