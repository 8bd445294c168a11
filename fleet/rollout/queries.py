"""The rollout engine's reads, as set-based SQL: a tick of a 10,000-device deployment reads the rows that
can change something (targets whose device reported a result, targets past their timeout, the next
pending step) and counts the rest, instead of loading every target and device.

The JSON paths (``reported ->> 'deployment_id'``) are SQLAlchemy's portable JSON element access, so the
same queries run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from manifests.mqtt import UpdateState

from ..db import Deployment, DeploymentTarget, Device
from .reports import COMMITTED_RESULT, FAILED_RESULTS
from .states import ACTIVE, TargetState

T = DeploymentTarget


def state_counts(session: Session, dep_id: str, wave: int | None = None) -> Counter[str]:
    """How many of the deployment's targets (of one wave) are in each state."""
    q = select(T.state, func.count()).where(T.deployment_id == dep_id).group_by(T.state)
    if wave is not None:
        q = q.where(T.wave == wave)
    return Counter({state: n for state, n in session.execute(q)})


def reports_result_for(command_id: ColumnElement[str] | str) -> ColumnElement[bool]:
    """The device's reported state carries a result for ``command_id`` (``reports.command_outcome`` is
    the exact reading; this narrows the rows it needs to look at)."""
    rep = Device.reported
    result = rep["last_result"].as_string()
    done = or_(
        result.in_([COMMITTED_RESULT, *FAILED_RESULTS]),
        and_(result.is_(None), rep["state"].as_string() == UpdateState.COMMITTED.value),
    )
    return and_(rep["deployment_id"].as_string() == command_id, done)


def with_results(session: Session, dep_id: str, state: TargetState) -> list[tuple[DeploymentTarget, Device]]:
    """Targets in ``state`` whose device reported a result for the target's command id."""
    q = (
        select(T, Device)
        .join(Device, Device.id == T.device_id)
        .where(T.deployment_id == dep_id, T.state == state.value, reports_result_for(T.command_id))
        .order_by(T.position)
    )
    return [(t, d) for t, d in session.execute(q).all()]


def back_on_previous(session: Session, dep_id: str) -> list[tuple[DeploymentTarget, Device]]:
    """Rolling-back targets whose device runs its previous model again (``reports.back_on`` decides)."""
    q = (
        select(T, Device)
        .join(Device, Device.id == T.device_id)
        .where(
            T.deployment_id == dep_id,
            T.state == TargetState.ROLLING_BACK.value,
            T.assigned_at.is_not(None),
            Device.current_name == T.previous_name,
            Device.current_version == T.previous_version,
        )
    )
    return [(t, d) for t, d in session.execute(q).all()]


def assigned_before(session: Session, dep_id: str, state: TargetState, cutoff: dt.datetime) -> list[DeploymentTarget]:
    """Targets in ``state`` given their command before ``cutoff`` (timeout candidates)."""
    q = select(T).where(T.deployment_id == dep_id, T.state == state.value, T.assigned_at < cutoff)
    return list(session.scalars(q.order_by(T.position)))


def not_yet_started(session: Session, dep_id: str, cutoff: dt.datetime, limit: int) -> list[str]:
    """Online devices of in-flight targets, given their command before ``cutoff``, that have not reported
    it yet: their desired state may have been lost on the way (a broker node failing over)."""
    reported = Device.reported["deployment_id"].as_string()
    q = (
        select(T.device_id)
        .join(Device, Device.id == T.device_id)
        .where(
            T.deployment_id == dep_id,
            T.state == TargetState.IN_FLIGHT.value,
            T.assigned_at < cutoff,
            Device.online.is_(True),
            or_(reported.is_(None), reported != T.command_id),
        )
        .order_by(T.assigned_at)
        .limit(limit)
    )
    return list(session.scalars(q))


def next_pending(session: Session, dep_id: str, wave: int, limit: int) -> list[DeploymentTarget]:
    q = (
        select(T)
        .where(T.deployment_id == dep_id, T.wave == wave, T.state == TargetState.PENDING.value)
        .order_by(T.position)
        .limit(limit)
    )
    return list(session.scalars(q))


def unsent_rollbacks(session: Session, dep_id: str, limit: int) -> list[DeploymentTarget]:
    q = (
        select(T)
        .where(T.deployment_id == dep_id, T.state == TargetState.ROLLING_BACK.value, T.assigned_at.is_(None))
        .order_by(T.position)
        .limit(limit)
    )
    return list(session.scalars(q))


def devices_by_id(session: Session, ids: Iterable[str]) -> dict[str, Device]:
    wanted = sorted(set(ids))
    out: dict[str, Device] = {}
    for i in range(0, len(wanted), 5000):  # bounded IN lists
        chunk = wanted[i : i + 5000]
        out |= {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(chunk)))}
    return out


def held_elsewhere(
    session: Session, dep_id: str, device_ids: list[str], states: tuple[str, ...]
) -> list[DeploymentTarget]:
    """Targets of other active deployments, in ``states``, for these devices (a takeover lets go of them)."""
    if not device_ids:
        return []
    q = (
        select(T)
        .join(Deployment)
        .where(
            T.device_id.in_(device_ids),
            T.deployment_id != dep_id,
            T.state.in_(states),
            Deployment.status.in_([s.value for s in ACTIVE]),
        )
    )
    return list(session.scalars(q))


def known_devices(session: Session, dep_id: str, device_ids: list[str]) -> set[str]:
    if not device_ids:
        return set()
    q = select(T.device_id).where(T.deployment_id == dep_id, T.device_id.in_(device_ids))
    return set(session.scalars(q))


def last_position(session: Session, dep_id: str) -> int:
    last = session.scalar(select(func.max(T.position)).where(T.deployment_id == dep_id))
    return -1 if last is None else int(last)


def unjudged(session: Session, dep_id: str, wave: int) -> int:
    """Succeeded targets of one wave that no health check has judged yet (no sample on their new model)."""
    q = select(func.count()).where(
        T.deployment_id == dep_id, T.wave == wave, T.state == TargetState.SUCCEEDED.value, T.health.is_(None)
    )
    return int(session.scalar(q) or 0)
