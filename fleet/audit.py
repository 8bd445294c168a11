"""The audit log's one writer: every command and every rollout decision records itself here."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.orm import Session

from .db import AuditEntry


def audit(
    session: Session,
    actor: str,
    action: str,
    *,
    deployment: str | None = None,
    device_id: str | None = None,
    ts: dt.datetime | None = None,
    **details: Any,
) -> None:
    entry = AuditEntry(actor=actor, action=action, deployment=deployment, device_id=device_id, details=details)
    if ts is not None:
        entry.ts = ts
    session.add(entry)
