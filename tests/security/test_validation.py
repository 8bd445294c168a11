"""The MQTT edge (fleet/validation.py) and ingest behind it, on a real SQLite database: every refusal named,
identity from the topic, bounded sizes and integers, timestamps clamped to the receive time.

Issue 15 items 1 (identity), 4 (future ts), 5 (size caps), 6 (seq overflow), 7 (drops logged and counted)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet import metrics
from fleet.db import Device, DeviceEvent, TelemetrySample, make_engine, run_migrations, session_factory
from fleet.ingest import handle_message
from fleet.validation import Accepted, Dropped, DropReason, validate_inbound
from manifests import mqtt as c

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


def reported(device_id: str = "dev-a", **kw: object) -> dict:
    doc = {
        "schema": "nanofleet.reported/1",
        "device_id": device_id,
        "state": "idle",
        "agent_version": "1.0",
        "ts": NOW.isoformat(),
    }
    doc.update(kw)
    return doc


def telemetry(device_id: str = "dev-a", seq: int = 1, **kw: object) -> dict:
    doc = {"schema": "nanofleet.telemetry/1", "device_id": device_id, "seq": seq, "ts": NOW.isoformat()}
    doc.update(kw)
    return doc


def event(device_id: str = "dev-a", seq: int = 1, **kw: object) -> dict:
    doc = {"schema": "nanofleet.event/1", "device_id": device_id, "seq": seq, "ts": NOW.isoformat(), "kind": "error"}
    doc.update(kw)
    return doc


def raw(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def check(topic: str, payload: bytes) -> Accepted | Dropped:
    return validate_inbound(topic, payload, NOW)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("nanofleet/v1/devices/dev-a/reported/x", raw(reported()), DropReason.TOPIC),
        ("nanofleet/v1/devices/" + "a" * 65 + "/reported", raw(reported("a" * 65)), DropReason.TOPIC),
        ("nanofleet/v1/devices/.hidden/reported", raw(reported(".hidden")), DropReason.TOPIC),
        ("nanofleet/v1/devices/dev-a/desired", b"{}", DropReason.LEAF),
        (c.reported_topic("dev-a"), raw(reported("dev-b")), DropReason.IDENTITY),
        (c.events_topic("dev-a"), raw(event(message="x" * 70_000)), DropReason.TOO_LARGE),
        (c.status_topic("dev-a"), b"{" + b" " * 5000 + b"}", DropReason.TOO_LARGE),
        (c.reported_topic("dev-a"), b"\xff\xfe", DropReason.ENCODING),
        (c.reported_topic("dev-a"), b'{"device_id": "\\ud800"}', DropReason.ENCODING),
        (c.reported_topic("dev-a"), raw(reported(state="hacked")), DropReason.SCHEMA),
        (c.telemetry_topic("dev-a"), raw(telemetry(seq=10**30)), DropReason.RANGE),
        (c.telemetry_topic("dev-a"), raw(telemetry(seq=-1)), DropReason.RANGE),
        (c.telemetry_topic("dev-a"), raw(telemetry(requests=2**31)), DropReason.RANGE),
        (c.reported_topic("dev-a"), raw(reported(committed={"name": "m", "version": 2**40})), DropReason.RANGE),
        (c.events_topic("dev-a"), raw(event(details={"n": 10**20})), DropReason.RANGE),
        (c.telemetry_topic("dev-a"), raw(telemetry(decode_tok_s=float("nan"))), DropReason.NON_FINITE),
        (c.telemetry_topic("dev-a"), raw(telemetry(cpu_load=float("inf"))), DropReason.NON_FINITE),
        (c.reported_topic("dev-a"), raw(reported(agent_version="a\x00b")), DropReason.UNICODE),
        (c.events_topic("dev-a"), raw(event(details={"k\x00": 1})), DropReason.UNICODE),
        (c.reported_topic("dev-a"), raw(reported(agent_version="v" * 65)), DropReason.FIELD_TOO_LONG),
        (c.reported_topic("dev-a"), raw(reported(slots={"a": {"name": "n" * 129}})), DropReason.FIELD_TOO_LONG),
    ],
)
def test_each_refusal_names_its_reason(topic: str, payload: bytes, reason: DropReason) -> None:
    verdict = check(topic, payload)
    assert isinstance(verdict, Dropped), verdict
    assert verdict.reason is reason, verdict
    assert verdict.detail


def test_accepted_messages_carry_the_topic_identity_and_a_clamped_ts() -> None:
    future = raw(reported(ts="9999-12-31T23:59:59Z"))
    verdict = check(c.reported_topic("dev-a"), future)
    assert isinstance(verdict, Accepted)
    assert verdict.device_id == "dev-a" and verdict.leaf == "reported"
    assert verdict.message.ts == NOW  # clamped to the receive time
    naive = check(c.telemetry_topic("dev-a"), raw(telemetry(ts="2026-12-01T11:00:00")))
    assert isinstance(naive, Accepted) and naive.message.ts == NOW - dt.timedelta(hours=1)
    emoji = check(c.events_topic("dev-a"), raw(event(message="ok \U0001f600")))  # a paired surrogate is fine
    assert isinstance(emoji, Accepted)


# --- ingest on a real database -------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    run_migrations(engine)
    with session_factory(engine)() as s:
        s.add(Device(id="dev-a", secret_hash="x", tags={}, groups=[], enrolled_at=NOW, online=False))
        s.add(Device(id="dev-b", secret_hash="x", tags={}, groups=[], enrolled_at=NOW, online=False))
        s.commit()
        yield s
    engine.dispose()


def test_a_future_timestamp_does_not_freeze_the_record(db: Session) -> None:
    """Item 4: one report dated 9999-12-31 made the fleet ignore every later genuine one."""
    at = NOW.timestamp()
    handle_message(
        db, c.reported_topic("dev-a"), raw(reported(state="failed", ts="9999-12-31T23:59:59Z")), received_at=at
    )
    later = (NOW + dt.timedelta(seconds=30)).isoformat()
    handle_message(db, c.reported_topic("dev-a"), raw(reported(state="committed", ts=later)), received_at=at + 30)
    db.commit()
    dev = db.get(Device, "dev-a")
    assert dev is not None and dev.reported is not None
    assert dev.reported["state"] == "committed"


def test_a_huge_seq_is_dropped_without_failing_the_batch(db: Session) -> None:
    """Item 6: seq 10**30 passed the schema, then an OverflowError failed the whole batch."""
    handle_message(db, c.telemetry_topic("dev-a"), raw(telemetry(seq=10**30)))
    handle_message(db, c.telemetry_topic("dev-a"), raw(telemetry(seq=5, decode_tok_s=10.0)))
    db.commit()  # the batch commits: the bad message changed nothing
    seqs = db.scalars(select(TelemetrySample.seq).where(TelemetrySample.device_id == "dev-a")).all()
    assert seqs == [5]


def test_payload_identity_never_outranks_the_topic(db: Session) -> None:
    """Item 1's ingest half: dev-a's topic with dev-b's name in the payload changes neither device."""
    before = metrics.DROPPED.labels(reason="identity")._value.get()
    handle_message(db, c.reported_topic("dev-a"), raw(reported("dev-b", state="failed", last_result="rolled_back")))
    db.commit()
    assert db.get(Device, "dev-a").reported is None  # type: ignore[union-attr]
    assert db.get(Device, "dev-b").reported is None  # type: ignore[union-attr]
    assert metrics.DROPPED.labels(reason="identity")._value.get() == before + 1


def test_oversized_events_are_not_stored(db: Session) -> None:
    """Item 5: a 10 MB events payload was stored whole."""
    handle_message(db, c.events_topic("dev-a"), raw(event(message="x" * 10_000_000)))
    handle_message(db, c.events_topic("dev-a"), raw(event(seq=2, details={"blob": "y" * 100_000})))
    db.commit()
    assert db.scalar(select(func.count()).select_from(DeviceEvent)) == 0


def test_every_drop_is_logged_with_its_reason(db: Session, caplog: pytest.LogCaptureFixture) -> None:
    """Item 7: refusals left no trace."""
    with caplog.at_level(logging.WARNING, logger="fleet.validation"):
        handle_message(db, c.reported_topic("dev-a"), raw(reported("dev-b")))
        handle_message(db, c.telemetry_topic("dev-a"), raw(telemetry(seq=10**30)))
        handle_message(db, c.telemetry_topic("ghost-1"), raw(telemetry("ghost-1")))
    text = caplog.text
    assert "(identity)" in text and "(range)" in text and "(unknown_device)" in text
