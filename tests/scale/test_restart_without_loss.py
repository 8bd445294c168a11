"""Nothing the broker acknowledged is lost when the fleet stops, cleanly (SIGTERM) or not (SIGKILL), while
devices keep sending: the fleet acknowledges a message only once its batch is committed, and its broker
session is persistent, so whatever it had not committed (in its queue, in flight, or sent while it was
down) is delivered again when it is back. The broker's acknowledgements are what the devices count."""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import Cluster, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_acknowledged_messages_survive_sigterm_and_sigkill(cluster: Cluster, database: str) -> None:
    if database == "sqlite":
        cluster.database_url, cluster.schema = f"sqlite:///{cluster.work / 'fleet.db'}", None
    srv = cluster.server("only", shared=False)
    swarm = cluster.swarm(cluster.enrol(30))
    swarm.wait_connected(timeout=60)
    swarm.set_rate(600)  # more than one batch in flight at every moment
    for sig in (signal.SIGTERM, signal.SIGKILL):
        time.sleep(3)
        before = cluster.stored()
        srv.signal(sig)
        acked_while_down = swarm.totals()["acked"]
        time.sleep(2)  # devices keep sending: the broker keeps it for the fleet's session
        assert swarm.totals()["acked"] > acked_while_down, "the broker stopped acknowledging"
        srv.start()
        assert before, "nothing was stored before the stop"
    time.sleep(2)
    swarm.set_rate(0)
    wait_for(lambda: (t := swarm.totals())["acked"] == t["sent"], 30, what="every message acknowledged")
    wait_for(lambda: cluster.missing(swarm) == 0, 60, interval=0.5, what="every acknowledged message stored")
    totals = swarm.totals()
    assert sum(len(v) for v in cluster.stored().values()) == totals["acked"] > 3000


def test_a_broker_restart_keeps_shared_subscriptions_delivering(cluster: Cluster) -> None:
    """Mosquitto restores a persistent session's plain subscriptions after a restart, not its shared ones:
    a clustered server (ingest through $share/...) resuming its session must subscribe again, or it
    receives nothing from then on while the broker keeps acknowledging the devices."""
    srv = cluster.server("a")  # shared: true
    swarm = cluster.swarm(cluster.enrol(10))
    swarm.wait_connected(timeout=60)
    swarm.set_rate(100)
    wait_for(lambda: cluster.stored(), 30, what="telemetry stored before the restart")
    # The devices pause across the restart. Mosquitto 2.0.11 drops (after acknowledging it to the device)
    # a message published between its restart and the servers' new SUBSCRIBE, since it does not restore a
    # session's shared subscriptions: a broker limit documented in docs/scaling.md, not what this test
    # checks. What it checks is ours: the server subscribes again, so what is sent afterwards is stored.
    swarm.set_rate(0)
    wait_for(lambda: (t := swarm.totals())["acked"] == t["sent"], 30, what="every message acknowledged")
    wait_for(lambda: cluster.missing(swarm) == 0, 30, interval=0.5, what="everything stored before the restart")
    cluster.broker.stop()  # SIGTERM: Mosquitto saves its sessions, then comes back on the same port
    cluster.broker.start()
    wait_for(lambda: srv.healthz()["mqtt_connected"], 30, what="the fleet reconnected")
    swarm.wait_connected(timeout=60)
    time.sleep(1.0)  # the server's SUBSCRIBE reaches the broker (healthz says connected once it is sent)
    swarm.set_rate(100)
    acked_at_restart = swarm.totals()["acked"]
    wait_for(lambda: swarm.totals()["acked"] > acked_at_restart + 300, 30, what="devices acknowledged again")
    swarm.set_rate(0)
    wait_for(lambda: (t := swarm.totals())["acked"] == t["sent"], 30, what="every message acknowledged")
    wait_for(
        lambda: cluster.missing(swarm) == 0,
        60,
        interval=0.5,
        what="every acknowledged message stored, those sent after the restart too",
        details=lambda: f"{cluster.missing(swarm)} missing\n{cluster.logs()}",
    )
