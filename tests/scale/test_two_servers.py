"""Two fleet servers on one PostgreSQL and one Mosquitto: ingest is split between them by shared
subscriptions (each message to one server, none twice), one holds the rollout lease, and when it is
SIGKILLed mid-rollout the other takes the lease over, finishes the rollout, and drains the dead server's
broker sessions, so no message the broker acknowledged is missing from the database."""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import Cluster, manifest, metric, wait_for

pytestmark = pytest.mark.slow


def test_shared_subscriptions_split_ingest_without_duplicates(cluster: Cluster, bundles) -> None:
    a, b = cluster.server("a"), cluster.server("b")
    swarm = cluster.swarm(cluster.enrol(40))
    swarm.wait_connected(timeout=60)
    swarm.set_rate(400)
    time.sleep(4)
    swarm.set_rate(0)
    sent = wait_for(
        lambda: (t := swarm.totals())["acked"] == t["sent"] and t, 30, what="every telemetry message acknowledged"
    )
    wait_for(lambda: cluster.missing(swarm) == 0, 60, what="every acknowledged message stored")
    assert a.alive() and b.alive(), cluster.logs()
    per_server = [metric(s.url, "nanofleet_mqtt_messages_total", kind="telemetry") for s in (a, b)]
    # Each message went to exactly one of the two servers, and both took a share.
    assert sum(per_server) == sent["acked"], (per_server, sent)
    assert min(per_server) > 0.2 * sent["acked"], per_server
    stored = cluster.stored()
    assert sum(len(v) for v in stored.values()) == sent["acked"]


def test_sigkill_of_the_lease_holder_mid_rollout(cluster: Cluster, bundles) -> None:
    first, second = cluster.server("first"), cluster.server("second")
    assert wait_for(cluster.leader, 15, what="a lease holder") is first  # the first one up takes it
    assert second.healthz()["leader"] is False
    cluster.upload(bundles[1])
    swarm = cluster.swarm(cluster.enrol(30), install_s=1.0)
    swarm.wait_connected(timeout=60)
    swarm.set_rate(200)
    with cluster.admin(second) as api:  # any server records an apply; the lease holder rolls it out
        r = api.post(
            "/api/v1/deployments", json=manifest("wide", 1, strategy={"type": "waves", "waves": {"sizes": [5, 10]}})
        )
        assert r.status_code == 201, r.text
        wait_for(
            lambda: api.get("/api/v1/deployments/wide").json()["counts"].get("succeeded", 0) >= 5,
            60,
            what="the first wave",
        )
        first.signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: second.healthz()["leader"], 15, interval=0.2, what="takeover of the lease")
        takeover = time.monotonic() - killed
        dep = wait_for(
            lambda: (d := api.get("/api/v1/deployments/wide").json())["status"] == "completed" and d,
            90,
            what=f"the rollout completed by the survivor\n{cluster.logs()}",
        )
    assert takeover < 10, takeover
    assert dep["counts"]["succeeded"] == 30
    swarm.set_rate(0)
    wait_for(lambda: swarm.totals()["acked"] == swarm.totals()["sent"], 30, what="acknowledgements")
    # Messages the broker had routed to the dead server's session are drained by the survivor.
    wait_for(
        lambda: cluster.missing(swarm) == 0, 90, interval=1, what=f"acknowledged messages stored\n{cluster.logs()}"
    )
    assert "drained" in second.tail(100_000)
