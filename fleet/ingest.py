"""What the fleet does with MQTT messages from devices, a batch at a time, in set-based SQL.

A batch (``ingest_messages``) is applied in the caller's transaction with a fixed number of statements
whatever its size: one ``SELECT ... FOR UPDATE`` of the devices it names (unknown ones are dropped, and
their rows are locked in id order, so two fleet servers ingesting at once cannot deadlock each other), one
multi-row ``INSERT ... ON CONFLICT DO NOTHING`` each for telemetry and events (the ``(device_id, seq)``
unique key rejects duplicates: no per-message duplicate check), and one ``UPDATE`` per shape of device
change (executemany). Every handler is idempotent: QoS 1 may deliver twice and a reconnect replays
retained messages, so duplicates and stale messages change nothing:

- reported: the newest by ``ts`` is kept on the device row; the comparison happens inside the UPDATE,
  against the row as it is then, so an older report ingested later (by another server) loses;
- telemetry and events: stored once per ``(device_id, seq)``; the newest sample is the device's latest;
- status: arrival order (the last will's payload is fixed at connect time).

Each message passes the edge check first (``validation.admit``: identity from the topic, bounded sizes,
strings and integers, ``ts`` clamped to the receive time); a drop is logged and counted with its reason.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import JSON, Boolean, String, Text, bindparam, case, cast, column, func, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from manifests import mqtt as contract

from .db import TS, Device, DeviceEvent, TelemetrySample, utcnow
from .validation import Accepted, Dropped, DropReason, admit, record_drop

log = logging.getLogger(__name__)

DEVICES = Device.__table__
TELEMETRY = TelemetrySample.__table__
EVENTS = DeviceEvent.__table__


class Message(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


@dataclass
class IngestReport:
    """What one batch did: counts by kind, and the devices' send times of what was stored (for the
    end-to-end ingest lag, measured once the batch is committed)."""

    accepted: int = 0
    dropped: int = 0
    telemetry: int = 0
    events: int = 0
    sent_at: list[dt.datetime] = field(default_factory=list)


@dataclass
class _DeviceChange:
    """Everything one batch changes on one device row."""

    seen: bool = False
    reported: contract.ReportedState | None = None
    telemetry: contract.Telemetry | None = None
    status: contract.Status | None = None

    def shape(self) -> tuple[bool, bool, bool, bool]:
        return (self.seen, self.reported is not None, self.telemetry is not None, self.status is not None)


def ingest_messages(session: Session, messages: Sequence[Message]) -> IngestReport:
    """Apply a batch of messages in the caller's transaction (the worker's ``Ingest``)."""
    accepted: list[Accepted] = []
    for m in messages:
        # The edge check first, for every message (fleet/validation.py).
        a = admit(m.topic, m.payload, getattr(m, "received_at", None))
        if a is not None:
            accepted.append(a)
    report = IngestReport(dropped=len(messages) - len(accepted))
    if accepted:
        _apply(session, accepted, report)
    return report


def handle_message(session: Session, topic: str, payload: bytes, *, received_at: float | None = None) -> str | None:
    """Apply one message (a batch of one); returns the device id it concerned (None when dropped)."""
    accepted = admit(topic, payload, received_at)
    if accepted is None:
        return None
    report = IngestReport()
    _apply(session, [accepted], report)
    return accepted.device_id if report.accepted else None


def _utc(ts: dt.datetime) -> dt.datetime:
    # SQLite stores datetimes as text without their offset: every stored ts must be UTC.
    return ts.astimezone(dt.timezone.utc) if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


def _apply(session: Session, accepted: list[Accepted], report: IngestReport) -> None:
    session.flush()  # the ORM's pending writes go first: the statements below bypass it
    ids = sorted({a.device_id for a in accepted})
    known = set(session.scalars(select(Device.id).where(Device.id.in_(ids)).order_by(Device.id).with_for_update()))
    now = utcnow()
    pg = session.get_bind().dialect.name == "postgresql"
    changes: dict[str, _DeviceChange] = {}
    telemetry: dict[tuple[str, int], contract.Telemetry] = {}
    events: dict[tuple[str, int], contract.Event] = {}
    for a in accepted:
        if a.device_id not in known:
            record_drop(
                contract.PREFIX + f"/devices/{a.device_id}/{a.leaf}",
                Dropped(DropReason.UNKNOWN_DEVICE, "no such device (deleted or never enrolled)", a.device_id),
            )
            report.dropped += 1
            continue
        report.accepted += 1
        ch = changes.setdefault(a.device_id, _DeviceChange())
        msg = a.message
        if isinstance(msg, contract.ReportedState):
            ch.seen = True
            if ch.reported is None or _utc(msg.ts) >= _utc(ch.reported.ts):
                ch.reported = msg
        elif isinstance(msg, contract.Telemetry):
            ch.seen = True
            telemetry.setdefault((a.device_id, msg.seq), msg)
            if ch.telemetry is None or _utc(msg.ts) >= _utc(ch.telemetry.ts):
                ch.telemetry = msg
            report.sent_at.append(_utc(msg.ts))
        elif isinstance(msg, contract.Event):
            ch.seen = True
            events.setdefault((a.device_id, msg.seq), msg)
        else:
            ch.status = msg  # arrival order: the last one wins
            ch.seen = ch.seen or msg.online
    if telemetry:
        if pg:
            _insert_json(session, _TELEMETRY_FROM_JSON, telemetry.values())
        else:
            _insert_new(session, TELEMETRY, [_telemetry_row(d, m) for (d, _), m in telemetry.items()])
        report.telemetry = len(telemetry)
    if events:
        if pg:
            _insert_json(session, _EVENTS_FROM_JSON, events.values())
        else:
            _insert_new(session, EVENTS, [_event_row(d, m) for (d, _), m in events.items()])
        report.events = len(events)
    _update_devices(session, changes, now, pg)
    _expire_cached(session, changes)


# PostgreSQL: a batch's rows travel as one JSON array (each element the message as stored, ts clamped)
# and the columns are read from it by the database: one statement, one parameter, no per-row binding.
# The payload's device_id is the topic's (validation.validate_inbound refuses any other).
_TELEMETRY_FROM_JSON = text(
    "INSERT INTO telemetry (device_id, seq, ts, model_name, model_version, decode_tok_s, ttft_p95_ms,"
    " requests, errors, payload)"
    " SELECT r.device_id, r.seq, r.ts, r.model->>'name', (r.model->>'version')::integer, r.decode_tok_s,"
    " r.ttft_p95_ms, r.requests, r.errors, p"
    " FROM json_array_elements(CAST(:docs AS json)) AS p,"
    " json_to_record(p) AS r(device_id text, seq bigint, ts timestamptz, model json, decode_tok_s float8,"
    " ttft_p95_ms float8, requests integer, errors integer)"
    " ON CONFLICT (device_id, seq) DO NOTHING"
)
_EVENTS_FROM_JSON = text(
    "INSERT INTO device_events (device_id, seq, ts, kind, deployment_id, payload)"
    " SELECT r.device_id, r.seq, r.ts, r.kind, r.deployment_id, p"
    " FROM json_array_elements(CAST(:docs AS json)) AS p,"
    " json_to_record(p) AS r(device_id text, seq bigint, ts timestamptz, kind text, deployment_id text)"
    " ON CONFLICT (device_id, seq) DO NOTHING"
)


def _insert_json(session: Session, statement: Any, messages: Any) -> None:
    """One INSERT of every message (PostgreSQL); a ``(device_id, seq)`` already stored is skipped."""
    docs = "[" + ",".join(m.model_dump_json(by_alias=True) for m in messages) + "]"
    session.execute(statement, {"docs": docs})


def _telemetry_row(device_id: str, msg: contract.Telemetry) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "seq": msg.seq,
        "ts": _utc(msg.ts),
        "model_name": msg.model.name,
        "model_version": msg.model.version,
        "decode_tok_s": msg.decode_tok_s,
        "ttft_p95_ms": msg.ttft_p95_ms,
        "requests": msg.requests,
        "errors": msg.errors,
        "payload": msg.model_dump(mode="json", by_alias=True),
    }


def _event_row(device_id: str, msg: contract.Event) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "seq": msg.seq,
        "ts": _utc(msg.ts),
        "kind": msg.kind,
        "deployment_id": msg.deployment_id,
        "payload": msg.model_dump(mode="json", by_alias=True),
    }


def _insert_new(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    """One multi-row INSERT; rows whose (device_id, seq) is already stored are skipped by the database."""
    dialect = session.get_bind().dialect.name
    ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    session.execute(ins.on_conflict_do_nothing(index_elements=["device_id", "seq"]), rows)


def _newer_than(column: Any, value: Any) -> ColumnElement[bool]:
    return or_(column.is_(None), column <= value)


def _update_devices(session: Session, changes: dict[str, _DeviceChange], now: dt.datetime, pg: bool) -> None:
    """One UPDATE per shape of change (at most 16 shapes, usually one or two), rows in id order: on
    PostgreSQL one statement reading the rows from a JSON recordset, elsewhere an executemany."""
    by_shape: dict[tuple[bool, bool, bool, bool], list[dict[str, Any]]] = {}
    for device_id in sorted(changes):
        ch = changes[device_id]
        if not any(ch.shape()):
            continue
        by_shape.setdefault(ch.shape(), []).append(_params(device_id, ch, now, pg))
    for shape, rows in by_shape.items():
        if pg:
            rows_json = "[" + ",".join(_json_object(r) for r in rows) + "]"
            session.execute(_update_from_recordset(shape, tuple(rows[0])), {"rows": rows_json})
        else:
            session.execute(_update_statement(*shape), rows)


@functools.cache
def _update_from_recordset(shape: tuple[bool, bool, bool, bool], names: tuple[str, ...]) -> Any:
    """PostgreSQL: ``UPDATE devices ... FROM json_to_recordset(:rows) AS v(b_id, ...) WHERE id = v.b_id``
    (built once per shape: the statement only binds ``rows``)."""
    v = (
        func.json_to_recordset(cast(bindparam("rows", type_=Text), JSON))
        .table_valued(*(column(n, _PARAM_TYPES[n]) for n in names))
        .render_derived(name="v", with_types=True)
    )
    cols = v.c
    return _update_statement(*shape, src=lambda name, _type: cols[name])


class _RawJson(str):
    """A value already serialised as JSON (a message as stored)."""


def _json_object(row: dict[str, Any]) -> str:
    parts = []
    for k, value in row.items():
        if isinstance(value, _RawJson):
            js = str(value)
        elif isinstance(value, dt.datetime):
            js = '"' + value.isoformat() + '"'
        else:
            js = json.dumps(value)
        parts.append(f'"{k}":{js}')
    return "{" + ",".join(parts) + "}"


_C = DEVICES.c
_PARAM_TYPES: dict[str, Any] = {
    "b_id": _C.id.type,
    "b_now": TS,
    "r_doc": JSON,
    "r_ts": TS,
    "r_agent": _C.agent_version.type,
    "r_hw": _C.hardware_class.type,
    "r_arch": _C.cpu_arch.type,
    "r_ram": _C.ram_bytes.type,
    "r_name": _C.current_name.type,
    "r_version": _C.current_version.type,
    "t_doc": JSON,
    "t_ts": TS,
    "s_online": Boolean,
    "s_agent": String,
}


def _params(device_id: str, ch: _DeviceChange, now: dt.datetime, pg: bool = False) -> dict[str, Any]:
    def doc(m: Any) -> Any:
        return _RawJson(m.model_dump_json(by_alias=True)) if pg else m.model_dump(mode="json", by_alias=True)

    p: dict[str, Any] = {"b_id": device_id, "b_now": now}
    if ch.reported is not None:
        r = ch.reported
        committed = r.committed if r.committed is not None and r.committed.name is not None else None
        p |= {
            "r_doc": doc(r),
            "r_ts": _utc(r.ts),
            "r_agent": r.agent_version,
            "r_hw": r.hardware_class,
            "r_arch": r.cpu_arch,
            "r_ram": r.ram_bytes or None,
            "r_name": committed.name if committed else None,
            "r_version": committed.version if committed else None,
        }
    if ch.telemetry is not None:
        p |= {"t_doc": doc(ch.telemetry), "t_ts": _utc(ch.telemetry.ts)}
    if ch.status is not None:
        p |= {"s_online": ch.status.online, "s_agent": ch.status.agent_version}
    return p


def _bind(name: str, type_: Any) -> Any:
    return bindparam(name, type_=type_)


def _update_statement(seen: bool, reported: bool, telemetry: bool, status: bool, src: Any = _bind) -> Any:
    """The UPDATE of one shape; ``src(name, type)`` is where each value comes from (a bound parameter of
    an executemany, or a column of the JSON recordset joined on PostgreSQL)."""
    c = DEVICES.c
    values: dict[str, Any] = {}
    if seen:
        # last_seen never goes backwards (two servers' clocks, or a batch committed late)
        later = or_(c.last_seen.is_(None), c.last_seen < src("b_now", TS))
        values["last_seen"] = case((later, src("b_now", TS)), else_=c.last_seen)
    agent_version: Any = c.agent_version
    if reported:
        newer = _newer_than(c.reported_ts, src("r_ts", TS))

        def if_newer(value: Any, column: Any) -> Any:
            return case((newer, value), else_=column)

        def kept_unless_given(param: str, column: Any) -> Any:
            # a field the report leaves out keeps what the row has
            return if_newer(func.coalesce(src(param, column.type), column), column)

        values["reported"] = if_newer(src("r_doc", JSON), c.reported)
        values["reported_ts"] = if_newer(src("r_ts", TS), c.reported_ts)
        agent_version = kept_unless_given("r_agent", c.agent_version)
        values["hardware_class"] = kept_unless_given("r_hw", c.hardware_class)
        values["cpu_arch"] = kept_unless_given("r_arch", c.cpu_arch)
        values["ram_bytes"] = kept_unless_given("r_ram", c.ram_bytes)
        values["current_name"] = kept_unless_given("r_name", c.current_name)
        values["current_version"] = kept_unless_given("r_version", c.current_version)
    if telemetry:
        newer_t = _newer_than(c.telemetry_ts, src("t_ts", TS))
        values["telemetry"] = case((newer_t, src("t_doc", JSON)), else_=c.telemetry)
        values["telemetry_ts"] = case((newer_t, src("t_ts", TS)), else_=c.telemetry_ts)
    if status:
        values["online"] = src("s_online", Boolean)
        values["status_ts"] = src("b_now", TS)
        agent_version = func.coalesce(src("s_agent", String), agent_version)
    if agent_version is not c.agent_version:
        values["agent_version"] = agent_version
    return DEVICES.update().where(c.id == src("b_id", c.id.type)).values(**values)


def _expire_cached(session: Session, changes: dict[str, _DeviceChange]) -> None:
    """Device objects this session already holds are stale now: reload them on next access."""
    for device_id in changes:
        obj = session.identity_map.get(session.identity_key(Device, device_id))  # type: ignore[arg-type]
        if obj is not None:
            session.expire(obj)
