"""A rollout with a health abort rule finishes only once the devices were judged on their new model.

Before: a wave that converged completed at the next tick (with ``wait_seconds`` 0), so whether a slow device
was caught depended on whether a telemetry sample happened to arrive within that tick. Now the wave waits for
a sample on the new model from each succeeded device, or ``health_evidence_s`` at most (audited). An adapter
deployment is judged on the base model's samples taken after the adapter was committed (the device's model
name stays the base's). Driven tick by tick on a real SQLite database with a clock the test moves."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.db import (
    AuditEntry,
    BundleRecord,
    Deployment,
    Device,
    TelemetrySample,
    make_engine,
    run_migrations,
    session_factory,
)
from fleet.rollout import RolloutContext, RolloutEngine, apply_manifest
from manifests import DeploymentManifest, SigningKey

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
EVIDENCE_S = 60.0
BASE_SHA = "1" * 64


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _record(name: str, version: int, summary: dict[str, Any] | None = None) -> BundleRecord:
    return BundleRecord(
        name=name,
        version=version,
        manifest_sha256=BASE_SHA if (name, version) == ("m", 1) else f"{version:064d}",
        manifest_yaml="",
        signature="",
        key_id="k",
        total_size=1,
        summary=summary,
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    run_migrations(engine)
    session = session_factory(engine)()
    adapter = {"kind": "adapter", "base": {"name": "m", "version": 1, "manifest_sha256": BASE_SHA}}
    session.add_all([_record("m", 1), _record("m", 2), _record("qv", 1, adapter)])
    session.add(Device(id="a", secret_hash="h", current_name="m", current_version=1))
    session.commit()
    yield session
    session.close()
    engine.dispose()


_seq = itertools.count(1)


def sample(db: Session, ts: dt.datetime, model: tuple[str, int], decode: float | None) -> None:
    db.add(
        TelemetrySample(
            device_id="a", seq=next(_seq), ts=ts, model_name=model[0], model_version=model[1],
            decode_tok_s=decode, ttft_p95_ms=80.0, requests=0, errors=0, payload={},
        )
    )  # fmt: skip
    db.flush()


def started(
    db: Session, clock: Clock, bundle: tuple[str, int], abort: dict[str, Any]
) -> tuple[RolloutEngine, Deployment]:
    """Apply an all-at-once deployment of ``bundle`` (no soak), plan it and start device a, with a
    baseline of 100 tok/s on m@1 (its last samples before the start)."""
    for i in range(3):
        sample(db, T0 - dt.timedelta(seconds=30 - i), ("m", 1), 100.0)
    eng = RolloutEngine(RolloutContext(SigningKey.generate(), lambda n, v: f"http://x/{n}/{v}", clock),
                        health_evidence_s=EVIDENCE_S)  # fmt: skip
    doc = {
        "apiVersion": "nanofleet/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"bundle": {"name": bundle[0], "version": bundle[1]}, "strategy": {"type": "all-at-once"},
                 "abort": abort},
    }  # fmt: skip
    dep, result = apply_manifest(db, DeploymentManifest.model_validate(doc), "admin", clock())
    assert result == "created"
    for _ in range(2):  # plan, then start
        eng.tick(db)
        clock.advance(0.5)
    (t,) = dep.targets
    assert t.state == "in_flight" and t.baseline and t.baseline["decode_tok_s"] == 100.0
    return eng, dep


def commit(db: Session, eng: RolloutEngine, clock: Clock, dep: Deployment) -> None:
    """Device a reports the command committed; two ticks: the result, then the wave's convergence."""
    (t,) = dep.targets
    device = db.get(Device, "a")
    assert device is not None
    device.reported = {"deployment_id": t.command_id, "state": "committed", "last_result": "committed"}
    db.flush()
    for _ in range(2):
        eng.tick(db)
        clock.advance(0.5)
    assert t.state == "succeeded" and dep.wave_converged_at is not None


def tick(db: Session, eng: RolloutEngine, clock: Clock, seconds: float = 0.5) -> None:
    clock.advance(seconds)
    eng.tick(db)
    db.flush()


def unjudged_audits(db: Session) -> list[AuditEntry]:
    return list(db.scalars(select(AuditEntry).where(AuditEntry.action == "health_unjudged")))


def test_a_slow_device_is_caught_however_late_its_first_sample_on_the_new_model_comes(db: Session) -> None:
    clock = Clock()
    eng, dep = started(db, clock, ("m", 2), {"max_decode_drop_pct": 30, "on_abort": "pause"})
    commit(db, eng, clock, dep)
    for _ in range(20):  # 10 s of ticks and no sample yet: the deployment waits, it does not complete
        tick(db, eng, clock)
    assert dep.status == "in_progress" and dep.targets[0].health is None
    sample(db, clock(), ("m", 2), 40.0)
    tick(db, eng, clock)
    assert dep.status == "paused", dep.status
    assert "decode 40.0 tok/s is 60% below 100.0 tok/s" in (dep.abort_reason or "")
    assert not unjudged_audits(db)


def test_a_healthy_sample_lets_the_rollout_complete_at_once(db: Session) -> None:
    clock = Clock()
    eng, dep = started(db, clock, ("m", 2), {"max_decode_drop_pct": 30, "on_abort": "pause"})
    commit(db, eng, clock, dep)
    sample(db, clock(), ("m", 2), 95.0)
    tick(db, eng, clock)
    assert dep.status == "completed"
    assert dep.targets[0].health == {"samples": 1, "decode_drop_pct": 5.0}
    assert not unjudged_audits(db)


def test_a_device_that_sends_no_telemetry_holds_the_wave_only_health_evidence_s(db: Session) -> None:
    clock = Clock()
    eng, dep = started(db, clock, ("m", 2), {"max_error_rate": 0.1, "on_abort": "rollback"})
    commit(db, eng, clock, dep)
    converged = dep.wave_converged_at
    assert converged is not None
    tick(db, eng, clock, EVIDENCE_S - 2)
    assert dep.status == "in_progress"
    tick(db, eng, clock, 3)
    assert dep.status == "completed"
    (entry,) = unjudged_audits(db)
    assert entry.deployment == "d" and entry.details["devices"] == 1 and entry.details["wave"] == 1
    assert entry.details["waited_s"] >= EVIDENCE_S


def test_without_a_health_rule_nothing_waits_for_telemetry(db: Session) -> None:
    clock = Clock()
    eng, dep = started(db, clock, ("m", 2), {"failure_rate_pct": 50})
    commit(db, eng, clock, dep)
    tick(db, eng, clock)
    assert dep.status == "completed" and not unjudged_audits(db)


def test_an_adapter_is_judged_on_its_base_models_samples_after_it_was_committed(db: Session) -> None:
    clock = Clock()
    eng, dep = started(db, clock, ("qv", 1), {"max_decode_drop_pct": 30, "on_abort": "pause"})
    commit(db, eng, clock, dep)
    finished = dep.targets[0].finished_at
    assert finished is not None
    # The device's model is still m@1; a sample stamped before the commit was the base alone: not evidence.
    sample(db, clock() - dt.timedelta(seconds=2), ("m", 1), 40.0)
    tick(db, eng, clock)
    assert dep.status == "in_progress" and dep.targets[0].health is None
    # One after it is the adapter's effect, named by the base model.
    sample(db, clock(), ("m", 1), 40.0)
    tick(db, eng, clock)
    assert dep.status == "paused", dep.status
    assert "60% below" in (dep.abort_reason or "")
