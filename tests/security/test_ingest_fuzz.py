"""Hypothesis fuzz of the MQTT ingest handlers (issue 15): batches of arbitrary bytes and near-valid JSON on
device topics, applied by ``ingest.ingest_messages`` on SQLite and on PostgreSQL (the stricter: NUL in
text, INTEGER and VARCHAR bounds, no NaN in JSON). Nothing raises, every batch commits, and everything
stored passes the edge check again (``validation.validate_inbound``)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from fleet.bridge import Inbound
from fleet.db import Device, DeviceEvent, TelemetrySample, make_engine, run_migrations, session_factory
from fleet.ingest import ingest_messages
from fleet.validation import Accepted, Dropped, DropReason, validate_inbound
from manifests import mqtt as c

DEVICES = ("fz-a", "fz-b")
NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker]:
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'fuzz.db'}")
        cleanup = None
    else:
        url = request.getfixturevalue("pg_url")
        schema = f"fz_{uuid.uuid4().hex[:12]}"
        admin = create_engine(url)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        engine = make_engine(url, schema)

        def cleanup() -> None:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()

    run_migrations(engine)
    factory = session_factory(engine)
    with factory() as s:
        for d in DEVICES:
            s.add(Device(id=d, secret_hash="x", tags={}, groups=[], enrolled_at=NOW, online=False))
        s.commit()
    yield factory
    engine.dispose()
    if cleanup is not None:
        cleanup()


# --- strategies --------------------------------------------------------------------------------------------

nasty_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "\ud800", "a\udfffb", "\U0001f600", "x" * 5000, "../../etc/passwd", "$SYS/#"]),
)
nasty_int = st.one_of(
    st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 2**31, 2**31 - 1, 2**63, 2**63 - 1, 10**30])
)
nasty_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(1e308))
nasty_ts = st.one_of(
    st.sampled_from(["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "1970-01-01T00:00:00", "not a date", ""]),
    st.datetimes(timezones=st.just(dt.timezone.utc)).map(lambda d: d.isoformat()),
)
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), nasty_int, nasty_float, nasty_text),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(nasty_text, kids, max_size=4)),
    max_leaves=12,
)


def _valid(kind: str, device_id: str, seq: int) -> dict[str, Any]:
    ts = NOW.isoformat()
    if kind == "reported":
        return {
            "schema": "nanofleet.reported/1",
            "device_id": device_id,
            "state": "committed",
            "agent_version": "1.0",
            "committed": {"name": "m", "version": 1},
            "slots": {"a": {"name": "m", "version": 1}},
            "ts": ts,
        }
    if kind == "telemetry":
        return {
            "schema": "nanofleet.telemetry/1",
            "device_id": device_id,
            "seq": seq,
            "ts": ts,
            "decode_tok_s": 10.0,
            "requests": 1,
            "model": {"name": "m", "version": 1},
        }
    if kind == "events":
        return {"schema": "nanofleet.event/1", "device_id": device_id, "seq": seq, "ts": ts, "kind": "transition"}
    return {"schema": "nanofleet.status/1", "device_id": device_id, "online": True, "ts": ts}


nasty_model = st.fixed_dictionaries({"name": nasty_text, "version": nasty_int})
HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "ts": nasty_ts,
    "seq": nasty_int,
    "requests": nasty_int,
    "errors": nasty_int,
    "rss_bytes": nasty_int,
    "ram_bytes": nasty_int,
    "decode_tok_s": nasty_float,
    "device_id": st.one_of(st.sampled_from([*DEVICES, "fz-ghost"]), nasty_text),
    "agent_version": nasty_text,
    "cpu_arch": nasty_text,
    "error": nasty_text,
    "message": nasty_text,
    "bundle": nasty_text,
    "deployment_id": nasty_text,
    "committed": nasty_model,
    "model": nasty_model,
    "slots": st.dictionaries(nasty_text, nasty_model, max_size=3),
    "details": st.dictionaries(nasty_text, json_value, max_size=3),
}
FIELDS = {
    "reported": ["device_id", "state", "agent_version", "committed", "slots", "ts", "error", "ram_bytes", "cpu_arch"],
    "telemetry": [
        "device_id",
        "seq",
        "ts",
        "decode_tok_s",
        "requests",
        "errors",
        "model",
        "agent_version",
        "rss_bytes",
    ],
    "events": ["device_id", "seq", "ts", "kind", "message", "details", "deployment_id", "bundle"],
    "status": ["device_id", "online", "ts", "agent_version"],
}


@st.composite
def near_valid(draw: st.DrawFn) -> Inbound:
    kind = draw(st.sampled_from(sorted(FIELDS)))
    device = draw(st.sampled_from([*DEVICES, "fz-ghost"]))
    doc = _valid(kind, draw(st.sampled_from([device, device, DEVICES[0], DEVICES[1]])), draw(st.integers(0, 50)))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FIELDS[kind]))
        # Mostly a value of the right type but hostile (it passes the schema: the edge must catch it),
        # sometimes anything at all.
        hostile = HOSTILE.get(name, json_value)
        doc[name] = draw(st.one_of(hostile, hostile, hostile, json_value))
    if draw(st.booleans()) and doc:
        doc.pop(draw(st.sampled_from(sorted(doc))))
    body = json.dumps(doc, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    topic = f"nanofleet/v1/devices/{device}/{kind}"
    return Inbound(draw(st.sampled_from([topic, topic, topic, "nanofleet/v1/devices/fz-a", "x/y"])), body)


raw_message = st.builds(
    Inbound,
    st.sampled_from([c.telemetry_topic(DEVICES[0]), c.reported_topic(DEVICES[1]), c.events_topic(DEVICES[0])]),
    st.binary(max_size=300),
)
batches = st.lists(st.one_of(near_valid(), near_valid(), raw_message), min_size=1, max_size=8)


# --- the property ------------------------------------------------------------------------------------------


def _stored_is_valid(s: Session) -> None:
    now = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)

    def utc(value: dt.datetime) -> dt.datetime:
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)

    for d in s.scalars(select(Device)).all():
        for stamp in (d.reported_ts, d.telemetry_ts, d.last_seen):
            assert stamp is None or utc(stamp) <= now, (d.id, stamp)  # no device clock outranks the fleet's
        if d.reported is not None:
            v = validate_inbound(c.reported_topic(d.id), json.dumps(d.reported).encode(), now)
            assert isinstance(v, Accepted), (d.id, v)
            assert v.message.ts <= now
        if d.telemetry is not None:
            v = validate_inbound(c.telemetry_topic(d.id), json.dumps(d.telemetry).encode(), now)
            assert isinstance(v, Accepted), (d.id, v)
    for t in s.scalars(select(TelemetrySample)).all():
        assert utc(t.ts) <= now, (t.device_id, t.ts)
        v = validate_inbound(c.telemetry_topic(t.device_id), json.dumps(t.payload).encode(), now)
        assert isinstance(v, Accepted) and v.message.seq == t.seq, (t.device_id, v)
    for e in s.scalars(select(DeviceEvent)).all():
        v = validate_inbound(c.events_topic(e.device_id), json.dumps(e.payload).encode(), now)
        assert isinstance(v, Accepted) and v.message.seq == e.seq, (e.device_id, v)
    assert {d.id for d in s.scalars(select(Device)).all()} == set(DEVICES)  # nothing created by a message


def test_ingest_survives_any_batch_and_stores_only_valid_data(sessions: sessionmaker) -> None:
    @given(batch=batches)
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(batch: list[Inbound]) -> None:
        with sessions() as s:
            ingest_messages(s, batch)
            s.commit()
        with sessions() as s:
            _stored_is_valid(s)

    run()


any_topic = st.one_of(
    st.text(max_size=120),
    st.builds(
        lambda device, leaf: f"nanofleet/v1/devices/{device}/{leaf}",
        st.one_of(st.sampled_from(DEVICES), nasty_text, st.just("a/b"), st.just("+"), st.just("#")),
        st.one_of(st.sampled_from([*sorted(FIELDS), "desired", "commands"]), nasty_text),
    ),
)


def test_the_edge_check_answers_every_message_with_a_verdict() -> None:
    """``validate_inbound`` itself, on any topic (surrogates, wildcards, extra levels) and any payload: it
    never raises; a drop names a reason in one bounded line; what it accepts is the topic's device, dated
    no later than its receipt, and passes the check again as stored (so ingest never writes what the
    edge would refuse)."""

    @given(
        message=st.one_of(near_valid(), st.builds(Inbound, any_topic, st.binary(max_size=400))),
        topic=st.one_of(st.none(), any_topic),
        received=st.datetimes(
            min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1), timezones=st.just(dt.timezone.utc)
        ),
    )
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(message: Inbound, topic: str | None, received: dt.datetime) -> None:
        where = message.topic if topic is None else topic
        verdict = validate_inbound(where, message.payload, received)
        if isinstance(verdict, Dropped):
            assert isinstance(verdict.reason, DropReason)
            assert "\n" not in verdict.detail and len(verdict.detail) <= 400, verdict
            return
        assert isinstance(verdict, Accepted)
        assert where == f"nanofleet/v1/devices/{verdict.device_id}/{verdict.leaf}", (where, verdict)
        assert verdict.message.device_id == verdict.device_id
        if verdict.message.ts is not None:
            assert verdict.message.ts <= received
        again = validate_inbound(where, verdict.message.to_bytes(), received)
        assert isinstance(again, Accepted) and again.message == verdict.message, again

    run()
