"""Commands and device state go ahead of telemetry: with a telemetry backlog of tens of thousands of messages
waiting for the fleet (it was down while devices kept sending), an API command and a device's reported
state are applied long before the backlog is; the fleet's memory holds a bounded part of it (the broker
keeps the rest), and nothing of it is lost."""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import Cluster, wait_for

pytestmark = pytest.mark.slow


def test_commands_and_reported_state_overtake_a_telemetry_flood(cluster: Cluster) -> None:
    # A deliberately slow writer (small batches) and a small in-flight window: the backlog takes a while.
    slow = {"ingest": {"batch_limit": 50}, "broker": {"receive_maximum": 200}}
    srv = cluster.server("only", shared=False, **slow)
    logins = cluster.enrol(20)
    swarm = cluster.swarm(logins)
    swarm.wait_connected(timeout=60)
    srv.stop()
    swarm.set_rate(4000)
    wait_for(lambda: swarm.totals()["acked"] >= 12_000, 60, what="a backlog of 12,000 messages at the broker")
    swarm.set_rate(0)
    backlog = swarm.totals()["acked"]
    srv.start()
    stored_before = sum(len(v) for v in cluster.stored().values())

    t0 = time.monotonic()
    with cluster.admin(srv) as api:
        r = api.post("/api/v1/enrollment-tokens", json={"uses": 1})
    command_s = time.monotonic() - t0
    assert r.status_code == 201, r.text
    stored_at_command = sum(len(v) for v in cluster.stored().values())

    # A device reports a new state now: it must land before the telemetry sent before it.
    target = swarm.devices[0]
    swarm.report_state(target.login.device_id, "installing")
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {cluster.admin_token}"}) as api:
        wait_for(
            lambda: api.get(f"/api/v1/devices/{target.login.device_id}").json()["update_state"] == "installing",
            30,
            interval=0.05,
            what="the reported state applied",
        )
        stored_at_report = sum(len(v) for v in cluster.stored().values())
        depth = api.get("/healthz").json()["queue"]["telemetry"]
    assert depth <= 20_000  # the worker's lane is bounded; the broker holds what is beyond the window
    assert stored_at_command < backlog and stored_at_report < backlog, (
        stored_before,
        stored_at_command,
        stored_at_report,
        backlog,
        command_s,
    )
    wait_for(lambda: cluster.missing(swarm) == 0, 120, interval=1, what="the whole backlog stored")
