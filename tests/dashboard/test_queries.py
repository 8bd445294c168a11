"""The dashboard's read side against a real (SQLite) fleet database with the fleet's own schema:
exact before/after numbers from the aggregate query, and the caps that keep big fleets cheap."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from fleet.dashboard import queries
from fleet.db import (
    BundleRecord,
    Deployment,
    DeploymentTarget,
    Device,
    TelemetrySample,
    make_engine,
    run_migrations,
)

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def session(tmp_path: Path) -> Session:
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    run_migrations(engine)
    return Session(engine, expire_on_commit=False)


def sample(device: str, seq: int, minutes: float, version: int, tok: float, req: int, err: int) -> TelemetrySample:
    return TelemetrySample(
        device_id=device,
        seq=seq,
        ts=T0 + dt.timedelta(minutes=minutes),
        model_name="m",
        model_version=version,
        decode_tok_s=tok,
        ttft_p95_ms=80.0,
        requests=req,
        errors=err,
        payload={"rss_bytes": 1000 + seq},
    )


def test_before_after_of_an_adapter_reads_the_base_models_samples_around_its_commit(session: Session) -> None:
    """An adapter leaves the model as it is, so the samples name the base (m@1) before and after: before is
    until the device was started, after is since its commit; in between the base served alone, still."""
    session.add(
        BundleRecord(
            name="qv", version=1, manifest_sha256="2" * 64, manifest_yaml="", signature="", key_id="k", total_size=1,
            summary={"kind": "adapter", "base": {"name": "m", "version": 1, "manifest_sha256": "1" * 64}},
        )
    )  # fmt: skip
    session.add(Device(id="a", secret_hash="x", current_name="m", current_version=1))
    dep = Deployment(
        id="q.1.x", name="q", manifest={"spec": {"strategy": {"type": "all-at-once"}}}, spec_sha256="0",
        bundle_name="qv", bundle_version=1, status="completed", waves=1, wave=0,
    )  # fmt: skip
    dep.targets.append(
        DeploymentTarget(
            device_id="a", position=0, wave=0, state="succeeded", previous_name="qv", previous_version=0,
            assigned_at=T0, finished_at=T0 + dt.timedelta(minutes=2),
        )
    )  # fmt: skip
    # b was rolled back: the rollback overwrote its start and finish times, so its samples cannot be split.
    session.add(Device(id="b", secret_hash="x", current_name="m", current_version=1))
    dep.targets.append(
        DeploymentTarget(
            device_id="b", position=1, wave=0, state="rolled_back", previous_name="qv", previous_version=0,
            assigned_at=T0 + dt.timedelta(minutes=3), finished_at=T0 + dt.timedelta(minutes=3, seconds=30),
        )
    )  # fmt: skip
    session.add(dep)
    for seq, minutes in enumerate((-5, -1, 2, 5), 100):
        session.add(sample("b", seq, minutes, 1, 80.0, 10 * seq, 0))
    req = 0
    # (minutes, tok/s): before the start; between start and commit (the base alone: neither); after the commit.
    for seq, (minutes, tok) in enumerate([(-6, 100.0), (-4, 100.0), (-2, 100.0), (1, 100.0), (3, 60.0), (4, 60.0)]):
        req += 10
        session.add(sample("a", seq, minutes, 1, tok, req, 0))
    session.commit()
    ba = queries.before_after(session, dep)
    assert ba.tok_s == [("a", 100.0, 60.0)]
    assert ba.devices == 1


def test_before_after_numbers_windows_and_order(session: Session) -> None:
    n = 600
    for i in range(n):
        session.add(
            Device(
                id=f"d-{i:04d}",
                secret_hash="x",
                tags={"site": "a" if i % 2 else "b"},
                groups=["g1"] if i < 10 else [],
                hardware_class="pi5",
                online=i % 3 != 0,
                current_name="m",
                current_version=2,
            )
        )
    dep = Deployment(
        id="r.1.x",
        name="r",
        manifest={"spec": {"strategy": {"type": "waves"}}},
        spec_sha256="0",
        bundle_name="m",
        bundle_version=2,
        status="in_progress",
        waves=2,
        wave=1,
    )
    for i in range(n):
        state = "failed" if i >= n - 5 else "in_flight" if i >= n - 10 else "succeeded"
        dep.targets.append(
            DeploymentTarget(
                device_id=f"d-{i:04d}",
                position=i,
                wave=0 if i < 100 else 1,
                state=state,
                previous_name="m",
                previous_version=1,
                assigned_at=T0,
            )
        )
    session.add(dep)
    seq = 0
    for dev, after_tok, after_err in (("d-0000", 120.0, 0), ("d-0001", 50.0, 0), ("d-0002", 100.0, 2)):
        # (minutes from the start, model version, tok/s, requests and errors since the last sample)
        script = [
            (-30, 1, 100.0, 10, 10),  # the first sample ever: its counters predate what we know, not counted
            (-25, 2, 999.0, 10, 10),  # the new model before the start (an earlier attempt): ignored
            *[(-10 + k, 1, 100.0, 10, 1) for k in range(4)],  # previous model before the start: 10% errors
            *[(1 + k, 2, after_tok, 20, after_err) for k in range(4)],  # the new model after the start
            (6, 2, after_tok, None, None),  # the agent restarted: counters start again from zero
            (30, 1, 1.0, 10, 10),  # the old model after the start (rolled back): not "before"
        ]
        req = err = 0
        for minutes, version, tok, d_req, d_err in script:
            seq += 1
            if d_req is None:
                req, err = 20, after_err
            else:
                req, err = req + d_req, err + (d_err or 0)
            session.add(sample(dev, seq, minutes, version, tok, req, err))
    session.commit()

    ba = queries.before_after(session, dep, limit=2)
    assert ba.devices == 3
    # Worst change first, and only two rows in the chart.
    assert ba.tok_s == [("d-0001", 100.0, 50.0), ("d-0002", 100.0, 100.0)]
    assert ba.error_rate == [("d-0001", 10.0, 0.0), ("d-0002", 10.0, 10.0)]
    assert ba.tok_s_mean == (100.0, pytest.approx((120 + 50 + 100) / 3))
    assert ba.error_rate_overall == (10.0, pytest.approx(100 * 10 / 300))

    view = queries.deployment_view(dep)
    assert [w.total for w in view.waves] == [100, 500]
    assert view.counts == {"succeeded": 590, "in_flight": 5, "failed": 5}
    assert len(view.targets) == queries.TARGET_ROWS
    assert [t.state for t in view.targets[:10]] == ["failed"] * 5 + ["in_flight"] * 5

    ov = queries.overview(session, queries.DeviceFilters(tag="site=a"), limit=100)
    assert ov.matching == 300 and len(ov.devices) == 100 and ov.total == n
    assert sum(ov.by_status.values()) == 300
    ov = queries.overview(session, queries.DeviceFilters(group="g1", status="offline"))
    assert [d.id for d in ov.devices] == ["d-0000", "d-0003", "d-0006", "d-0009"]


def test_device_charts_split_by_model_version(session: Session) -> None:
    session.add(Device(id="d1", secret_hash="x", current_name="m", current_version=2))
    for k in range(3):
        session.add(sample("d1", k + 1, k, 1, 100.0 + k, 10, 0))
        session.add(sample("d1", k + 10, 5 + k, 2, 130.0, 10, 0))
    session.commit()
    detail = queries.device_detail(session, "d1")
    assert detail is not None and detail.samples == 6
    by_key = {m.key: m for m in detail.metrics}
    assert [s.label for s in by_key["decode_tok_s"].series] == ["m@1", "m@2"]
    assert [v for _, v in by_key["decode_tok_s"].series[0].points] == [100.0, 101.0, 102.0]
    assert sum(len(s.points) for s in by_key["rss_bytes"].series) == 6
    assert by_key["cpu_temp_c"].series == []  # not reported: the chart says "no data yet"
    assert queries.device_detail(session, "nope") is None
