"""The writer's parts on their own: the batched, set-based ingest (on SQLite and PostgreSQL: a fixed number
of statements per batch whatever its size, duplicates rejected by the unique key, the newest report kept
whichever order batches arrive in, unknown devices dropped), the WorkQueue's lanes and back-pressure, and
the worker acknowledging a message only after its batch committed."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fleet.bridge import Inbound
from fleet.db import Device, DeviceEvent, TelemetrySample, make_engine, run_migrations, session_factory
from fleet.ingest import ingest_messages
from fleet.worker import CommandCall, Lane, Worker, WorkQueue, lane_of
from manifests import mqtt as c

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker]:
    if request.param == "postgres":
        url, schema = request.getfixturevalue("pg")
        engine = make_engine(url, schema)
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    run_migrations(engine)
    factory = session_factory(engine)
    with factory() as s:
        for i in range(50):
            s.add(Device(id=f"d-{i:02d}", secret_hash="x", tags={}, groups=[], enrolled_at=T0, online=False))
        s.commit()
    yield factory
    engine.dispose()


def tele(device: str, seq: int, ts: dt.datetime, tps: float = 50.0) -> Inbound:
    body = c.Telemetry(device_id=device, seq=seq, ts=ts, decode_tok_s=tps, model=c.ModelRef(name="m", version=1))
    return Inbound(c.telemetry_topic(device), body.to_bytes(), received_at=(ts + dt.timedelta(seconds=1)).timestamp())


def reported(device: str, state: str, ts: dt.datetime, version: int) -> Inbound:
    body = c.ReportedState(
        device_id=device, state=state, agent_version="t", ts=ts, committed=c.SlotInfo(name="m", version=version)
    )
    return Inbound(c.reported_topic(device), body.to_bytes(), received_at=(ts + dt.timedelta(seconds=1)).timestamp())


def test_a_batch_is_a_fixed_number_of_statements(sessions: sessionmaker) -> None:
    statements: list[str] = []
    with sessions() as s:
        event.listen(s.get_bind(), "before_cursor_execute", lambda *a: statements.append(a[2]))
        batch = [tele(f"d-{i % 50:02d}", i, T0 + dt.timedelta(seconds=i)) for i in range(1000)]
        batch += [reported(f"d-{i:02d}", "committed", T0, 1) for i in range(50)]
        report = ingest_messages(s, batch)
        s.commit()
        # One SELECT of the devices, one multi-row INSERT (executemany batches of it), one UPDATE per
        # shape of device change: not four queries per message.
        assert report.accepted == 1050 and report.telemetry == 1000
        assert len(statements) <= 8, statements
        assert s.scalar(select(func.count()).select_from(TelemetrySample)) == 1000


def test_duplicates_stale_reports_and_unknown_devices(sessions: sessionmaker) -> None:
    with sessions() as s:
        first = [tele("d-01", 1, T0), tele("d-01", 2, T0 + dt.timedelta(seconds=5), tps=70.0), tele("ghost", 1, T0)]
        ingest_messages(s, first + first[:1])  # a duplicate inside the batch
        ingest_messages(s, first)  # QoS 1 redelivery of the whole batch
        # A newer report first, then an older one (another server, or a redelivery): the newer stays.
        ingest_messages(s, [reported("d-01", "committed", T0 + dt.timedelta(seconds=30), 2)])
        ingest_messages(s, [reported("d-01", "downloading", T0 + dt.timedelta(seconds=10), 1)])
        ingest_messages(s, [tele("d-01", 0, T0 - dt.timedelta(seconds=60), tps=1.0)])  # an old sample
        ev = c.Event(device_id="d-02", seq=9, ts=T0, kind="result", message="ok").to_bytes()
        ingest_messages(s, [Inbound(c.events_topic("d-02"), ev), Inbound(c.events_topic("d-02"), ev)])
        s.commit()
        d = s.get(Device, "d-01")
        assert d is not None and d.reported is not None
        assert d.reported["state"] == "committed" and d.current_version == 2
        assert d.telemetry is not None and d.telemetry["decode_tok_s"] == 70.0  # the newest sample, not the last
        assert d.last_seen is not None
        seqs = sorted(s.scalars(select(TelemetrySample.seq).where(TelemetrySample.device_id == "d-01")))
        assert seqs == [0, 1, 2]
        assert (
            s.scalar(select(func.count()).select_from(TelemetrySample).where(TelemetrySample.device_id == "ghost")) == 0
        )
        assert s.scalar(select(func.count()).select_from(DeviceEvent)) == 1


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite gives stored datetimes back without their offset (they are stored in UTC)."""
    return value.replace(tzinfo=dt.timezone.utc) if value is not None and value.tzinfo is None else value


def test_stored_columns_are_the_messages_values_at_the_edges(sessions: sessionmaker) -> None:
    """What the columns and documents hold is the message as validated, whatever the path (on PostgreSQL
    the rows are read from one JSON document by the database): the largest seq, absent floats and model,
    a float in exponent notation, quotes, backslashes and non-ASCII text, a ts with an offset."""
    ts = dt.datetime(2026, 12, 1, 17, 30, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
    odd = 'm"\\é✓\t'
    big = c.Telemetry(device_id="d-03", seq=2**63 - 1, ts=ts, decode_tok_s=1.5e-7, requests=2**31 - 1)
    bare = c.Telemetry(device_id="d-03", seq=0, ts=ts - dt.timedelta(seconds=1), model=c.ModelRef(name=odd, version=7))
    rep = c.ReportedState(
        device_id="d-03", state="failed", agent_version=odd, ts=ts, error=odd, committed=c.SlotInfo(name=odd, version=3)
    )
    ev = c.Event(device_id="d-03", seq=2**63 - 1, ts=ts, kind="error", message=odd, details={"k": [1, None, odd]})
    status = c.Status(device_id="d-03", online=True, agent_version="a-2")
    recv = (ts + dt.timedelta(seconds=5)).timestamp()
    with sessions() as s:
        report = ingest_messages(
            s,
            [
                Inbound(c.telemetry_topic("d-03"), big.to_bytes(), received_at=recv),
                Inbound(c.telemetry_topic("d-03"), bare.to_bytes(), received_at=recv),
                Inbound(c.reported_topic("d-03"), rep.to_bytes(), received_at=recv),
                Inbound(c.events_topic("d-03"), ev.to_bytes(), received_at=recv),
                Inbound(c.status_topic("d-03"), status.to_bytes(), received_at=recv),
            ],
        )
        s.commit()
        assert (report.accepted, report.telemetry, report.events) == (5, 2, 1)
        rows = {r.seq: r for r in s.scalars(select(TelemetrySample).where(TelemetrySample.device_id == "d-03"))}
        top, low = rows[2**63 - 1], rows[0]
        assert utc(top.ts) == ts and top.decode_tok_s == 1.5e-7 and top.requests == 2**31 - 1 and top.errors == 0
        assert top.model_name is None and top.model_version is None and top.ttft_p95_ms is None
        assert (low.model_name, low.model_version, low.decode_tok_s) == (odd, 7, None)
        assert top.payload == big.model_dump(mode="json", by_alias=True)
        stored_ev = s.scalars(select(DeviceEvent).where(DeviceEvent.device_id == "d-03")).one()
        assert (stored_ev.seq, stored_ev.kind, utc(stored_ev.ts)) == (2**63 - 1, "error", ts)
        assert stored_ev.payload["details"] == {"k": [1, None, odd]} and stored_ev.payload["message"] == odd
        d = s.get(Device, "d-03")
        assert d is not None and d.online and d.agent_version == "a-2"  # the status comes after the report
        assert d.telemetry == big.model_dump(mode="json", by_alias=True) and utc(d.telemetry_ts) == ts
        assert d.reported == rep.model_dump(mode="json", by_alias=True) and utc(d.reported_ts) == ts
        assert (d.current_name, d.current_version, d.hardware_class) == (odd, 3, None)


def test_lanes_serve_commands_then_state_then_telemetry() -> None:
    q = WorkQueue(lane_limit=100)
    t = Inbound(c.telemetry_topic("a"), b"{}")
    r = Inbound(c.reported_topic("a"), b"{}")
    cmd = CommandCall("x", lambda _s: None)  # type: ignore[arg-type, return-value]
    for item in (t, t, r, t):
        q.put_message(item)
    q.put_command(cmd)
    assert [lane_of(i) for i in q.get_batch(0.1)] == [
        Lane.COMMANDS,
        Lane.STATE,
        Lane.TELEMETRY,
        Lane.TELEMETRY,
        Lane.TELEMETRY,
    ]


def test_a_full_lane_makes_the_producer_wait() -> None:
    q = WorkQueue(lane_limit=100)
    for _ in range(100):
        q.put_message(Inbound(c.telemetry_topic("a"), b"{}"))
    done = threading.Event()
    threading.Thread(
        target=lambda: (q.put_message(Inbound(c.telemetry_topic("a"), b"{}")), done.set()), daemon=True
    ).start()
    assert not done.wait(0.5)  # back-pressure: the bridge's network thread stops reading
    q.put_message(Inbound(c.reported_topic("a"), b"{}"))  # another lane is not blocked by it
    assert len(q.get_batch(0.1, limit=10)) == 10
    assert done.wait(5)


def test_the_worker_acknowledges_only_what_it_committed(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    run_migrations(engine)
    sessions = session_factory(engine)
    acks: list[str] = []
    failures = [2]  # the database is away for the first two attempts

    def ingest(session: Session, msgs: list[Inbound]) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OperationalError("INSERT", {}, Exception("connection refused"))

    q = WorkQueue()
    worker = Worker(q, sessions, ingest=ingest, tick=lambda _s: set(), publish=lambda _s, _i: None, tick_s=0.05)
    for i in range(3):
        q.put_message(Inbound(c.telemetry_topic(f"d{i}"), b"{}", ack=lambda i=i: acks.append(f"d{i}")))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while len(acks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
        engine.dispose()
    assert failures == [0]  # it was retried, not dropped
    assert sorted(acks) == ["d0", "d1", "d2"]  # each acknowledged once, after the commit that finally worked
