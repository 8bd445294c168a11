"""Apply records, the engine's first tick plans: on PostgreSQL, a lease holder SIGKILLed in the middle of a
plan (its targets inserted, not committed) leaves nothing of it, and the next lease holder plans the
deployment exactly once; two planners at once (a control command on a server without the lease, and
the lease holder's tick) make one plan."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet.db import (
    AuditEntry,
    BundleRecord,
    Deployment,
    DeploymentTarget,
    Device,
    make_engine,
    run_migrations,
    session_factory,
)
from fleet.rollout import RolloutContext, RolloutEngine, apply_manifest, plan_deployment
from manifests import DeploymentManifest, SigningKey

REPO = Path(__file__).resolve().parents[2]
DEVICES = 3000  # over the default start_batch (1000): the apply only records, as at 10,000 boards
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)
MANIFEST = {
    "apiVersion": "nanofleet/v1",
    "kind": "Deployment",
    "metadata": {"name": "big"},
    "spec": {"bundle": {"name": "m", "version": 2}, "strategy": {"type": "waves", "waves": {"sizes": [100, 900]}}},
}

# The dying lease holder: ticks the engine (the plan: 3,000 targets inserted in its transaction), says how
# many targets its own transaction sees, and is SIGKILLed before the commit, as a crash would have it.
CHILD = textwrap.dedent(
    """
    import datetime as dt, json, os, signal, sys
    from sqlalchemy import func, select
    from fleet.db import DeploymentTarget, make_engine, session_factory
    from fleet.rollout import RolloutContext, RolloutEngine
    from manifests import SigningKey
    url, schema, mode = sys.argv[1:4]
    now = dt.datetime(2026, 12, 2, 12, 0, 1, tzinfo=dt.timezone.utc)
    engine = RolloutEngine(RolloutContext(SigningKey.generate(), lambda n, v: "http://x", lambda: now))
    with session_factory(make_engine(url, schema))() as s:
        engine.tick(s)
        seen = s.scalar(select(func.count()).select_from(DeploymentTarget))
        print(json.dumps({"targets_in_my_transaction": seen}), flush=True)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.readline()  # "hold": keep the plan (and the row lock) uncommitted until told
        s.commit()
    """
)


def ctx_engine() -> RolloutEngine:
    return RolloutEngine(RolloutContext(SigningKey.generate(), lambda n, v: "http://x", lambda: NOW))


@pytest.fixture
def pg(pg_schema: tuple[str, str]):  # noqa: ANN201
    url, schema = pg_schema
    engine = make_engine(url, schema)
    run_migrations(engine)
    factory = session_factory(engine)
    with factory() as s:
        for v in (1, 2):
            s.add(
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
        s.execute(
            Device.__table__.insert(),
            [
                {"id": f"d-{i:05d}", "secret_hash": "h", "enrolled_at": NOW - dt.timedelta(seconds=DEVICES - i)}
                for i in range(DEVICES)
            ],
        )
        s.commit()
        # The apply, as the API's command does it for a fleet over start_batch: recorded, not planned.
        t0 = time.perf_counter()
        dep, _ = apply_manifest(s, DeploymentManifest.model_validate(MANIFEST), "admin", NOW, plan_up_to=1000)
        s.commit()
        apply_s = time.perf_counter() - t0
        assert dep.status == "planning" and dep.waves == 0
    yield url, schema, factory, apply_s
    engine.dispose()


def child(url: str, schema: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, url, schema, mode],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def plan_of(s: Session) -> dict[str, object]:
    dep = s.scalar(select(Deployment).where(Deployment.name == "big"))
    assert dep is not None
    rows = s.execute(select(DeploymentTarget.device_id, DeploymentTarget.wave)).all()
    planned = s.scalars(select(AuditEntry.details).where(AuditEntry.action == "planned")).all()
    return {
        "status": dep.status,
        "waves": dep.waves,
        "targets": len(rows),
        "distinct_devices": len({r.device_id for r in rows}),
        "per_wave": sorted({w: sum(1 for r in rows if r.wave == w) for w in {r.wave for r in rows}}.items()),
        "planned_audits": [d["devices"] for d in planned],
    }


EXACTLY_ONCE = {
    "status": "in_progress",
    "waves": 3,
    "targets": DEVICES,
    "distinct_devices": DEVICES,
    "per_wave": [(0, 100), (1, 900), (2, DEVICES - 1000)],
    "planned_audits": [DEVICES],
}


def test_a_leader_killed_mid_plan_leaves_nothing_and_the_next_plans_once(pg) -> None:
    url, schema, factory, apply_s = pg
    p = child(url, schema, "kill")
    out, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, err
    # It died with the whole plan inserted in its transaction: the crash came between insert and commit.
    assert json.loads(out.splitlines()[-1]) == {"targets_in_my_transaction": DEVICES}
    with factory() as s:
        left = plan_of(s)
        assert (left["status"], left["targets"], left["planned_audits"]) == ("planning", 0, []), left
    # The next lease holder's first tick plans it; the ticks after it plan nothing more.
    eng = ctx_engine()
    for _ in range(3):
        with factory() as s:
            eng.tick(s)
            s.commit()
    with factory() as s:
        assert plan_of(s) == EXACTLY_ONCE
        started = s.scalar(
            select(func.count()).select_from(DeploymentTarget).where(DeploymentTarget.state == "in_flight")
        )
        assert started == 100  # the first wave, started by the ticks after the plan
    assert apply_s < 1.0, f"recording the apply took {apply_s:.2f}s at {DEVICES} devices"


def test_two_planners_at_once_make_one_plan(pg) -> None:
    url, schema, factory, _ = pg
    holder = child(url, schema, "hold")  # plans, then holds its transaction (and the row lock) open
    assert holder.stdout is not None and holder.stdin is not None
    assert json.loads(holder.stdout.readline()) == {"targets_in_my_transaction": DEVICES}
    result: dict[str, object] = {}

    def second() -> None:  # e.g. a pause arriving at a server without the lease: it plans first
        with factory() as s:
            dep = s.scalar(select(Deployment).where(Deployment.name == "big"))
            assert dep is not None
            result["plan"] = plan_deployment(s, dep, "admin", NOW)
            s.commit()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(1.0)
    assert t.is_alive(), "the second planner did not wait for the first one's row lock"
    with factory() as s:  # a reader is not blocked, and sees no plan before the commit
        assert s.scalar(select(func.count()).select_from(DeploymentTarget)) == 0
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(60) == 0, holder.stderr.read() if holder.stderr else ""
    t.join(60)
    assert result == {"plan": None}  # it found the plan committed and made none
    with factory() as s:
        assert plan_of(s) == EXACTLY_ONCE


def test_over_start_batch_the_api_answers_planning_and_the_tick_plans(make_fleet, bundles) -> None:
    from tests.fleet.conftest import BUNDLE, wait_for

    fleet = make_fleet(start_batch=2)  # 3 devices: more than one tick starts, so the apply only records
    devices = fleet.enroll(3)
    ids = sorted(d.id for d in devices)

    def body(name: str) -> dict:
        return {
            "apiVersion": "nanofleet/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"bundle": {"name": BUNDLE, "version": 1}, "strategy": {"type": "waves", "waves": {"sizes": [1]}}},
        }

    with fleet.admin() as admin:
        admin.upload_bundle(bundles[1])
        out = admin.apply(body("later"))
        assert out["result"] == "created"
        dep = out["deployment"]
        assert (dep["status"], dep["waves"], dep["counts"], dep["targets"]) == ("planning", 0, {"total": 0}, [])
        got = wait_for(
            lambda: (d := admin.deployment("later"))["status"] == "in_progress" and d["counts"]["total"] and d,
            what="planned",
        )
        assert got["waves"] == 2 and sorted(t["device_id"] for t in got["targets"]) == ids
        # A control action that comes before the first tick plans the deployment first, then acts on its
        # targets (or the tick came first: the same three targets either way).
        assert admin.apply(body("paused"))["deployment"]["status"] == "planning"
        paused = admin.control("paused", "pause")
        assert paused["status"] == "paused" and paused["counts"]["total"] == 3, paused
        assert sorted(t["device_id"] for t in paused["targets"]) == ids


def test_a_planning_deployment_shows_as_planning_on_its_page_and_in_the_cli(tmp_path: Path) -> None:
    """The deployment fragment of a deployment the apply only recorded says it is planning (no "wave 1 of 0"),
    and after the engine's tick shows its waves; the CLI gives ``planning`` its own colour."""
    from types import SimpleNamespace

    from fleet.cli import _status_style
    from fleet.dashboard.pages.deployments import _deployment_ctx
    from fleet.dashboard.web import Dashboard

    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    run_migrations(engine)
    factory = session_factory(engine)
    ui = Dashboard(SimpleNamespace(admin_token="nfa_x", now=lambda: NOW))  # type: ignore[arg-type]
    template = ui.templates.env.get_template("fragments/deployment.html")

    def fragment(s: Session) -> str:
        ctx = _deployment_ctx(s, "big")
        assert ctx is not None
        return template.render(request=None, session=SimpleNamespace(csrf="c"), csrf_field="csrf", now=NOW, **ctx)

    with factory() as s:
        s.add(BundleRecord(name="m", version=2, manifest_sha256="2" * 64, manifest_yaml="", signature="", key_id="k",
                           total_size=1))  # fmt: skip
        s.add_all(Device(id=f"d-{i}", secret_hash="h", enrolled_at=NOW - dt.timedelta(seconds=9 - i)) for i in range(5))
        s.commit()
        dep, _ = apply_manifest(s, DeploymentManifest.model_validate(MANIFEST), "admin", NOW, plan_up_to=1)
        s.commit()
        assert dep.status == "planning"
        html = fragment(s)
        assert 'id="dep-status">planning<' in html and "next tick selects its devices" in html
        assert "wave 1 of 0" not in html
        RolloutEngine(RolloutContext(SigningKey.generate(), lambda n, v: "http://x", lambda: NOW)).tick(s)
        s.commit()
        html = fragment(s)
        assert 'id="dep-status">in_progress<' in html and f"wave 1 of {dep.waves}" in html and "next tick" not in html
        assert dep.waves >= 1 and "</span> / 5 updated" in html  # the five devices, planned
    engine.dispose()
    assert _status_style("planning") == "[blue]planning[/]" != _status_style("in_progress")
