"""Device commands: enrolment tokens, enrolment, tag/group changes, deletion, credential rotation."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import select

from .. import schemas as S
from ..audit import audit
from ..credentials import hash_secret, new_device_token, new_enrollment_token
from ..db import Device, EnrollmentToken, aware
from ..errors import ConflictError, EnrollmentError, NotFoundError
from ..views import device_out, enroll_response
from .base import CommandContext, CommandResult


def get_device(ctx: CommandContext, device_id: str) -> Device:
    d = ctx.session.get(Device, device_id)
    if d is None:
        raise NotFoundError(f"no device {device_id!r}")
    return d


def create_enrollment_token(
    ctx: CommandContext, req: S.EnrollmentTokenRequest, *, actor: str
) -> CommandResult[S.EnrollmentTokenOut]:
    token = new_enrollment_token()
    rec = EnrollmentToken(
        id=uuid.uuid4().hex[:12],
        token_hash=hash_secret(token),
        expires_at=ctx.now + dt.timedelta(seconds=req.ttl_s),
        uses_left=req.uses,
        tags=req.tags,
        groups=req.groups,
        hardware_class=req.hardware_class,
        used_by=[],
    )
    ctx.session.add(rec)
    audit(ctx.session, actor, "enrollment_token_created", id=rec.id, uses=req.uses)
    return CommandResult(S.EnrollmentTokenOut(id=rec.id, token=token, expires_at=rec.expires_at, uses=req.uses))


def enroll(ctx: CommandContext, req: S.EnrollRequest) -> CommandResult[S.EnrollResponse]:
    """Exchange a one-time enrolment token for a device's own credentials."""
    session = ctx.session
    rec = session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_secret(req.token)).with_for_update()
    )
    if rec is None or rec.uses_left <= 0 or aware(rec.expires_at) <= ctx.now:  # type: ignore[operator]
        raise EnrollmentError("enrolment token unknown, used up or expired")
    device_id = req.device_id or f"dev-{uuid.uuid4().hex[:10]}"
    if session.get(Device, device_id) is not None:
        raise ConflictError(f"device {device_id} is already enrolled")
    token = new_device_token()
    tags = {**(rec.tags or {}), **req.tags}
    groups = sorted(set(rec.groups or []) | set(req.groups))
    session.add(
        Device(
            id=device_id,
            hardware_class=req.hardware_class or rec.hardware_class,
            cpu_arch=req.cpu_arch,
            ram_bytes=req.ram_bytes,
            tags=tags,
            groups=groups,
            secret_hash=hash_secret(token),
            public_key=req.device_public_key,
            capabilities=req.capabilities.to_json() if req.capabilities else None,
            enrolled_at=ctx.now,
            online=False,
        )
    )
    rec.uses_left -= 1
    rec.used_by = [*(rec.used_by or []), device_id]
    session.flush()  # conflicts surface before the broker is told
    ctx.env.accounts.add_device(device_id, token)  # a broker that refuses fails the enrolment
    audit(
        session,
        f"device:{device_id}",
        "enrolled",
        device_id=device_id,
        token_id=rec.id,
        tags=tags,
        groups=groups,
        device_key=req.device_public_key is not None,
    )
    return CommandResult(enroll_response(ctx.env, device_id, token))


def update_device(
    ctx: CommandContext, device_id: str, patch: S.DevicePatch, *, actor: str
) -> CommandResult[S.DeviceOut]:
    d = get_device(ctx, device_id)
    changes = patch.model_dump(exclude_none=True)
    for k, v in changes.items():
        setattr(d, k, v)
    audit(ctx.session, actor, "device_updated", device_id=device_id, **changes)
    ctx.session.flush()
    return CommandResult(device_out(d))


def delete_device(ctx: CommandContext, device_id: str, *, actor: str) -> CommandResult[None]:
    ctx.session.delete(get_device(ctx, device_id))
    ctx.env.accounts.remove_device(device_id)  # the broker login goes, and its sessions, at once
    audit(ctx.session, actor, "device_deleted", device_id=device_id)
    return CommandResult(None)


def rotate_credentials(ctx: CommandContext, device_id: str, *, actor: str) -> CommandResult[S.EnrollResponse]:
    """A new device token; the old one stops working for the API and the broker at once."""
    d = get_device(ctx, device_id)
    token = new_device_token()
    d.secret_hash = hash_secret(token)
    ctx.env.accounts.set_password(device_id, token)  # sessions on the old token are disconnected
    audit(ctx.session, actor, "credentials_rotated", device_id=device_id)
    return CommandResult(enroll_response(ctx.env, device_id, token))
