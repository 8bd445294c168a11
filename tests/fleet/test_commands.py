"""Commands and the single writer: every state change the REST API makes runs on the worker thread, each
command in its own savepoint, with its typed result and the devices whose desired state it changed."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, select

from fleet import commands
from fleet.commands import CommandResult
from fleet.db import AuditEntry, Device, make_engine, run_migrations, session_factory
from fleet.errors import ConflictError
from fleet.worker import CommandCall, Worker, WorkQueue
from manifests import DeploymentManifest

from .conftest import BUNDLE, wait_for

WRITES = {"INSERT", "UPDATE", "DELETE"}


def manifest(name: str, version: int) -> dict:
    return {
        "apiVersion": "nanofleet/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"bundle": {"name": BUNDLE, "version": version}, "strategy": {"type": "all-at-once"}},
    }


def test_every_api_write_runs_on_the_worker(make_fleet, bundles) -> None:
    fleet = make_fleet()
    writers: list[tuple[str, str]] = []

    @event.listens_for(fleet.svc.engine, "before_cursor_execute")
    def record(_conn, _cursor, statement: str, *_args) -> None:  # noqa: ANN001
        words = statement.split()
        if words and words[0].upper() in WRITES:
            table = words[1] if words[0].upper() == "UPDATE" else words[2]
            writers.append((threading.current_thread().name, table.strip('"')))

    admin = {"Authorization": f"Bearer {fleet.svc.admin_token}"}
    api = httpx.Client(base_url=fleet.url, headers=admin, timeout=60)
    tok = api.post("/api/v1/enrollment-tokens", json={"uses": 2}).json()["token"]
    creds = httpx.post(fleet.url + "/api/v1/enroll", json={"token": tok, "device_id": "w-1"}).json()
    httpx.post(fleet.url + "/api/v1/enroll", json={"token": tok, "device_id": "w-2"}).raise_for_status()
    dev = {"Authorization": f"Bearer {creds['device_token']}"}
    assert api.patch("/api/v1/devices/w-1", json={"tags": {"site": "lab"}}).status_code == 200
    assert httpx.post(fleet.url + "/api/v1/devices/w-1/credentials/rotate", headers=dev).status_code == 200
    with fleet.admin() as client:
        client.upload_bundle(bundles[1])
        client.upload_bundle(bundles[2])
    assert api.post("/api/v1/deployments", json=manifest("w", 1)).status_code == 201
    for action in ("pause", "resume", "abort", "rollback"):
        assert api.post(f"/api/v1/deployments/w/{action}").status_code == 200, action
    wait_for(lambda: api.get("/api/v1/deployments/w").json()["status"] == "rolled_back", what="rolled back")
    assert api.delete("/api/v1/deployments/w").status_code == 204
    assert api.post("/api/v1/deployments", json=manifest("w2", 2)).status_code == 201
    pkg = api.post("/api/v1/deployments/w2/offline-package", json={}).json()
    assert pkg["devices"] == ["w-1", "w-2"]
    assert api.post("/api/v1/deployments/w2/abort").status_code == 200
    assert api.delete("/api/v1/devices/w-2").status_code == 204
    assert api.delete(f"/api/v1/models/{BUNDLE}/2").status_code == 409  # w-1 is told to run it
    api.close()

    tables = {table for _, table in writers}
    assert {"devices", "enrollment_tokens", "bundles", "deployments", "audit_log"} <= tables, tables
    assert {thread for thread, _ in writers} == {"fleet-worker"}


def test_apply_records_the_plan_and_the_next_tick_starts_it(make_fleet, bundles) -> None:
    fleet = make_fleet()
    fleet.enroll(2)
    with fleet.admin() as admin:
        admin.upload_bundle(bundles[1])
    result = fleet.svc.execute(
        commands.apply_deployment, DeploymentManifest.from_obj(manifest("typed", 1)), actor="test"
    )
    assert isinstance(result, CommandResult)
    # Apply answers with the plan recorded; the rollout lease holder's tick starts the devices.
    assert result.value.result == "created" and result.value.deployment.counts["pending"] == 2
    assert result.changed_devices == frozenset()
    with fleet.admin() as admin:
        wait_for(lambda: admin.deployment("typed")["counts"].get("pending", 0) == 0, what="devices started")
    again = fleet.svc.execute(
        commands.apply_deployment, DeploymentManifest.from_obj(manifest("typed", 1)), actor="test"
    )
    assert again.value.result == "unchanged"


@pytest.fixture
def worker_db(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    run_migrations(engine)
    yield session_factory(engine)
    engine.dispose()


def test_a_failing_command_rolls_back_only_itself(worker_db) -> None:
    inbox = WorkQueue()
    published: list[set[str] | None] = []
    committed_when_effect_ran: list[bool] = []

    def add(device_id: str, fail: bool = False):  # noqa: ANN202
        def run(session):  # noqa: ANN001, ANN202
            session.add(Device(id=device_id, secret_hash="h"))
            session.flush()
            if fail:
                raise ConflictError(f"{device_id} refused")

            def effect() -> None:
                with worker_db() as other:
                    committed_when_effect_ran.append(other.get(Device, device_id) is not None)

            return CommandResult(device_id, frozenset({device_id}), after_commit=(effect,))

        return CommandCall(f"add_{device_id}", run)

    calls = [add("a"), add("b", fail=True), add("c")]
    for c in calls:
        inbox.put_command(c)  # all queued before the worker starts: one batch, one transaction
    worker = Worker(
        inbox,
        worker_db,
        ingest=lambda _s, _m: None,
        tick=lambda _s: set(),
        publish=lambda _s, ids: published.append(ids),
        tick_s=0.05,
    )
    worker.start()
    try:
        assert calls[0].future.result(10).value == "a"
        with pytest.raises(ConflictError, match="b refused"):
            calls[1].future.result(10)
        assert calls[2].future.result(10).value == "c"
    finally:
        worker.stop()
    with worker_db() as s:
        assert set(s.scalars(select(Device.id))) == {"a", "c"}
        assert s.scalars(select(AuditEntry)).all() == []
    assert published == [{"a", "c"}]
    assert committed_when_effect_ran == [True, True]
