"""The rollout's two transition tables, every (state, event) pair: allowed ones land where the table
below (written out by hand, independently of the product's table) says, every other one is refused.
Then the engine's control actions on a real database, for every deployment status."""

from __future__ import annotations

import datetime as dt
import itertools
import typing
from pathlib import Path

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.db import BundleRecord, Deployment, DeploymentTarget, Device, make_engine, run_migrations, session_factory
from fleet.rollout import (
    ControlAction,
    DeploymentEvent,
    DeploymentStatus,
    RolloutContext,
    RolloutEngine,
    TargetEvent,
    TargetState,
    TransitionRefused,
    can_deployment,
    can_target,
    reports,
)
from fleet.rollout.states import move_target, next_state, next_status
from manifests import SigningKey
from manifests import mqtt as contract

# The strings stored in the database: existing rows must keep meaning the same (no data migration).
STORED_STATUSES = {"planning", "in_progress", "paused", "completed", "aborted", "rolling_back", "rolled_back"}
STORED_STATES = {
    "pending", "in_flight", "succeeded", "failed", "skipped", "rolling_back", "rolled_back", "rollback_failed",
    "unfit",
}  # fmt: skip

EXPECTED_DEPLOYMENT = {
    # The apply records a deployment as planning; the engine's first tick selects its targets.
    ("planning", "planned"): "in_progress",
    ("planning", "nothing_selected"): "completed",
    ("in_progress", "complete"): "completed",
    ("in_progress", "pause"): "paused",
    ("paused", "resume"): "in_progress",
    ("in_progress", "abort"): "aborted",
    ("paused", "abort"): "aborted",
    ("in_progress", "roll_back"): "rolling_back",
    ("paused", "roll_back"): "rolling_back",
    ("completed", "roll_back"): "rolling_back",
    ("aborted", "roll_back"): "rolling_back",
    ("rolling_back", "rolled_back"): "rolled_back",
}
EXPECTED_TARGET = {
    ("pending", "start"): "in_flight",
    ("in_flight", "succeeded"): "succeeded",
    ("in_flight", "failed"): "failed",
    ("in_flight", "timed_out"): "failed",
    ("failed", "retry"): "pending",
    ("pending", "no_variant"): "unfit",
    ("unfit", "retry"): "pending",
    ("pending", "cancel"): "skipped",
    ("pending", "taken_over"): "skipped",
    ("in_flight", "taken_over"): "skipped",
    ("in_flight", "roll_back"): "rolling_back",
    ("succeeded", "roll_back"): "rolling_back",
    ("failed", "roll_back"): "rolling_back",
    ("in_flight", "cannot_roll_back"): "rollback_failed",
    ("succeeded", "cannot_roll_back"): "rollback_failed",
    ("failed", "cannot_roll_back"): "rollback_failed",
    ("rolling_back", "rolled_back"): "rolled_back",
    ("rolling_back", "rollback_failed"): "rollback_failed",
}


def test_stored_values_are_unchanged() -> None:
    assert {s.value for s in DeploymentStatus} == STORED_STATUSES
    assert {s.value for s in TargetState} == STORED_STATES


@pytest.mark.parametrize(
    ("status", "event"), list(itertools.product(DeploymentStatus, DeploymentEvent)), ids=lambda x: x.value
)
def test_deployment_transition(status: DeploymentStatus, event: DeploymentEvent) -> None:
    expected = EXPECTED_DEPLOYMENT.get((status.value, event.value))
    # The stored string, as read back from the database, is what the table is asked about.
    assert can_deployment(status.value, event) is (expected is not None)
    if expected is None:
        with pytest.raises(TransitionRefused):
            next_status(status.value, event, "d")
    else:
        assert next_status(status.value, event, "d").value == expected


@pytest.mark.parametrize(("state", "event"), list(itertools.product(TargetState, TargetEvent)), ids=lambda x: x.value)
def test_target_transition(state: TargetState, event: TargetEvent) -> None:
    expected = EXPECTED_TARGET.get((state.value, event.value))
    assert can_target(state.value, event) is (expected is not None)
    if expected is None:
        with pytest.raises(TransitionRefused):
            next_state(state.value, event, "dev")
    else:
        assert next_state(state.value, event, "dev").value == expected


def test_unknown_stored_values_are_refused_not_crashed() -> None:
    assert not can_deployment("superseded", DeploymentEvent.ROLL_BACK)
    assert not can_target("exploded", TargetEvent.START)
    with pytest.raises(TransitionRefused, match="already superseded"):
        next_status("superseded", DeploymentEvent.ROLL_BACK, "d")


def test_move_target_stores_the_plain_string() -> None:
    t = DeploymentTarget(device_id="x", position=0, wave=0, state="pending")
    assert move_target(t, TargetEvent.START) is TargetState.IN_FLIGHT
    assert type(t.state) is str and t.state == "in_flight"
    with pytest.raises(TransitionRefused, match="target x: start is not allowed while it is in_flight"):
        move_target(t, TargetEvent.START)
    assert t.state == "in_flight"


def test_device_results_are_the_contracts() -> None:
    """The engine's reading of ``last_result`` covers exactly the contract's values."""
    literal = typing.get_args(contract.ReportedState.model_fields["last_result"].annotation)
    values = {a for arg in literal for a in (typing.get_args(arg) or (arg,)) if a is not type(None)}
    assert values == reports.FAILED_RESULTS | {reports.COMMITTED_RESULT}
    assert set(contract.UpdateState) >= reports.AT_REST


# --- the engine's control actions on a real (SQLite) database ------------------------------------------

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
# Each deployment has one target in each state a rollback distinguishes.
TARGETS = {"p": "pending", "f": "in_flight", "s": "succeeded", "x": "failed", "k": "skipped"}
MANIFEST = {
    "apiVersion": "nanofleet/v1",
    "kind": "Deployment",
    "metadata": {"name": "d"},
    "spec": {"bundle": {"name": "m", "version": 2}},
}


@pytest.fixture
def db(tmp_path: Path) -> Session:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    run_migrations(engine)
    session = session_factory(engine)()
    for v in (1, 2):
        session.add(
            BundleRecord(
                name="m",
                version=v,
                manifest_sha256=f"{v:064d}",
                manifest_yaml="",
                signature="",
                key_id="k",
                total_size=1,
            )
        )
    for dev in TARGETS:
        session.add(Device(id=dev, secret_hash="h", current_name="m", current_version=2))
    session.commit()
    yield session
    session.close()
    engine.dispose()


def make_deployment(session: Session, status: DeploymentStatus) -> Deployment:
    dep = Deployment(
        id="d.1.abc",
        name="d",
        manifest=MANIFEST,
        spec_sha256="0",
        bundle_name="m",
        bundle_version=2,
        status=status.value,
        created_at=NOW,
        updated_at=NOW,
    )
    for i, (dev, state) in enumerate(TARGETS.items()):
        dep.targets.append(
            DeploymentTarget(
                device_id=dev,
                position=i,
                wave=0,
                state=state,
                previous_name="m",
                previous_version=1,
                command_id="d.1.abc",
                assigned_at=NOW,
            )
        )
    session.add(dep)
    session.flush()
    return dep


def engine() -> RolloutEngine:
    return RolloutEngine(RolloutContext(SigningKey.generate(), lambda n, v: f"http://x/{n}/{v}", lambda: NOW))


CONTROL_EXPECTED = {
    # (status, action) -> (new status, target states after); absent: refused (409), nothing changes.
    ("in_progress", "pause"): ("paused", TARGETS),
    ("paused", "resume"): ("in_progress", {**TARGETS, "x": "pending"}),
    ("in_progress", "abort"): ("aborted", {**TARGETS, "p": "skipped"}),
    ("paused", "abort"): ("aborted", {**TARGETS, "p": "skipped"}),
    **{
        (s, "rollback"): (
            "rolling_back",
            {"p": "skipped", "f": "rolling_back", "s": "rolling_back", "x": "rolling_back", "k": "skipped"},
        )
        for s in ("in_progress", "paused", "completed", "aborted")
    },
}


PLANNED_STATUSES = [s for s in DeploymentStatus if s is not DeploymentStatus.PLANNING]  # planning: no targets yet


@pytest.mark.parametrize(
    ("status", "action"), list(itertools.product(PLANNED_STATUSES, ControlAction)), ids=lambda x: x.value
)
def test_control_action(db: Session, status: DeploymentStatus, action: ControlAction) -> None:
    dep = make_deployment(db, status)
    expected = CONTROL_EXPECTED.get((status.value, action.value))
    if expected is None:
        with pytest.raises(TransitionRefused):
            engine().control(db, dep, action, "admin", NOW)
        assert dep.status == status.value
        assert {t.device_id: t.state for t in dep.targets} == TARGETS
        return
    eng = engine()
    changed = eng.control(db, dep, action, "admin", NOW)
    db.flush()
    new_status, states = expected
    assert dep.status == new_status
    assert {t.device_id: t.state for t in dep.targets} == states
    if action is ControlAction.ROLLBACK:
        # The operator's call only marks the targets (it returns at once at any size); the next tick of
        # the lease holder sends the signed rollbacks.
        assert changed == set()
        assert all((db.get(Device, d).desired or {}).get("rollback") is None for d in ("f", "s", "x"))
        changed = eng.tick(db)
        assert changed == {"f", "s", "x"}
        for dev in changed:
            desired = db.get(Device, dev).desired
            assert desired["bundle"]["version"] == 1 and desired["deployment_id"] == "d.1.abc.rollback"
            assert desired["rollback"] is not None
    else:
        assert changed == set()


def test_rollback_with_nothing_to_send_back_is_rolled_back_at_once(db: Session) -> None:
    dep = make_deployment(db, DeploymentStatus.COMPLETED)
    for t in dep.targets:
        t.previous_name = None
    changed = engine().control(db, dep, ControlAction.ROLLBACK, "admin", NOW)
    assert changed == set() and dep.status == "rolled_back" and dep.finished_at == NOW
    assert {t.device_id: t.state for t in dep.targets} == {
        "p": "skipped",
        "f": "rollback_failed",
        "s": "rollback_failed",
        "x": "rollback_failed",
        "k": "skipped",
    }


# A deployment still planning (recorded by the apply, no targets yet): the action plans it first, then acts
# on its targets, all pending (absent: refused after the plan, which the refused command rolls back).
PLANNING_CONTROL_EXPECTED = {
    "pause": ("paused", dict.fromkeys(TARGETS, "pending")),
    "abort": ("aborted", dict.fromkeys(TARGETS, "skipped")),
    "rollback": ("rolled_back", dict.fromkeys(TARGETS, "skipped")),  # nothing was touched: nothing to send back
}


def record_planning(session: Session) -> Deployment:
    from fleet.rollout import apply_manifest
    from manifests import DeploymentManifest

    dep, result = apply_manifest(session, DeploymentManifest.model_validate(MANIFEST), "admin", NOW)
    assert result == "created" and dep.status == "planning" and dep.targets == [] and dep.waves == 0
    return dep


@pytest.mark.parametrize("action", list(ControlAction), ids=lambda x: x.value)
def test_control_action_on_a_planning_deployment_plans_it_first(db: Session, action: ControlAction) -> None:
    dep = record_planning(db)
    expected = PLANNING_CONTROL_EXPECTED.get(action.value)
    if expected is None:
        with pytest.raises(TransitionRefused, match="not paused"):
            engine().control(db, dep, action, "admin", NOW)
        return
    assert engine().control(db, dep, action, "admin", NOW) == set()
    db.flush()
    db.expire(dep, ["targets"])
    assert dep.status == expected[0]
    assert {t.device_id: t.state for t in dep.targets} == expected[1]


def planned_audits(session: Session, name: str) -> list[dict[str, typing.Any]]:
    from sqlalchemy import select

    from fleet.db import AuditEntry

    rows = session.scalars(select(AuditEntry).where(AuditEntry.action == "planned")).all()
    return [r.details for r in rows if r.deployment == name]


def test_the_first_tick_plans_a_recorded_deployment_and_the_next_starts_it(db: Session) -> None:
    dep = record_planning(db)
    db.commit()
    eng = engine()
    assert eng.tick(db) == set()  # the plan only: nothing is started in the tick that plans
    db.commit()
    db.expire(dep, ["targets"])
    assert dep.status == "in_progress" and dep.waves == 1
    assert sorted(t.device_id for t in dep.targets) == sorted(TARGETS)
    assert {t.state for t in dep.targets} == {"pending"}
    assert eng.tick(db) == set(TARGETS)
    db.commit()
    db.expire(dep, ["targets"])
    assert {t.state for t in dep.targets} == {"in_flight"}
    assert len(dep.targets) == len(TARGETS)
    assert [a["devices"] for a in planned_audits(db, "d")] == [len(TARGETS)]


def test_a_plan_that_selects_nothing_completes(db: Session) -> None:
    from fleet.rollout import apply_manifest
    from manifests import DeploymentManifest

    body = {**MANIFEST, "spec": {**MANIFEST["spec"], "selector": {"tags": {"site": "nowhere"}}}}
    dep, _ = apply_manifest(db, DeploymentManifest.model_validate(body), "admin", NOW)
    assert dep.status == "planning"
    engine().tick(db)
    assert dep.status == "completed" and dep.finished_at == NOW and dep.waves == 0 and dep.targets == []


def test_apply_plans_at_once_up_to_plan_up_to_devices(db: Session) -> None:
    from fleet.rollout import apply_manifest
    from manifests import DeploymentManifest

    dep, _ = apply_manifest(db, DeploymentManifest.model_validate(MANIFEST), "admin", NOW, plan_up_to=len(TARGETS))
    assert dep.status == "in_progress" and len(dep.targets) == len(TARGETS)
    db.rollback()
    dep, _ = apply_manifest(db, DeploymentManifest.model_validate(MANIFEST), "admin", NOW, plan_up_to=len(TARGETS) - 1)
    assert dep.status == "planning" and dep.targets == []


def _bundle_queries(session: Session) -> list[str]:
    """Statements against the bundles table sent from now on (appended as they run)."""
    seen: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "FROM bundles" in statement:
            seen.append(statement)

    sa_event.listen(session.get_bind(), "before_cursor_execute", count)
    return seen


def test_rollback_sends_look_up_each_previous_bundle_once(db: Session) -> None:
    dep = make_deployment(db, DeploymentStatus.COMPLETED)
    eng = engine()
    eng.control(db, dep, ControlAction.ROLLBACK, "admin", NOW)
    queries = _bundle_queries(db)
    assert eng.tick(db) == {"f", "s", "x"}
    assert len(queries) == 1, queries  # three devices back to m@1: one lookup, not one per device


def test_rollback_to_a_bundle_gone_from_the_registry_fails_each_target_with_its_reason(db: Session) -> None:
    dep = make_deployment(db, DeploymentStatus.COMPLETED)
    db.delete(db.scalars(select(BundleRecord).where(BundleRecord.version == 1)).one())
    db.flush()
    eng = engine()
    eng.control(db, dep, ControlAction.ROLLBACK, "admin", NOW)
    queries = _bundle_queries(db)
    assert eng.tick(db) == set()
    states = {t.device_id: (t.state, t.error) for t in dep.targets if t.device_id in ("f", "s", "x")}
    assert {s for s, _ in states.values()} == {"rollback_failed"}
    assert all("no bundle m@1 in the registry" in (e or "") for _, e in states.values()), states
    assert dep.status == "rolled_back"
    # The missing bundle is looked up once (then its "what is there" listing), not once per device.
    assert len(queries) <= 2, queries
