"""A clustered broker: three NATS servers with MQTT and JetStream (replicated sessions and retained
messages), the fleet's bridge and the devices each given the three nodes. One node is SIGKILLed
mid-rollout: its devices and, if it was on it, the fleet reconnect to the others, the rollout completes,
and no telemetry message the cluster acknowledged is missing from the database."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.fleet_scale import FleetServer, fleet_config, free_port, missing_acked, stored_seqs, wait_port
from benchmarks.fleet_swarm import Login, Swarm

from .conftest import manifest, wait_for

pytestmark = pytest.mark.slow


@dataclass
class NatsNode:
    name: str
    client_port: int
    route_port: int
    mqtt_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


def nats_bin() -> str:
    path = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(path).exists():
        pytest.fail("nats-server is not installed (apt-get install nats-server)")
    return path


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsNode]]:
    nodes = [NatsNode(f"n{i}", free_port(), free_port(), free_port()) for i in range(3)]
    routes = ", ".join(f"nats://127.0.0.1:{n.route_port}" for n in nodes)
    for n in nodes:
        conf = tmp_path / f"{n.name}.conf"
        conf.write_text(
            f"server_name: {n.name}\nlisten: 127.0.0.1:{n.client_port}\n"
            f"jetstream {{ store_dir: {tmp_path / n.name} }}\n"
            f"cluster {{ name: nanofleet, listen: 127.0.0.1:{n.route_port}, routes: [{routes}] }}\n"
            # Sessions, their unacknowledged messages and retained messages, on all three nodes.
            f"mqtt {{ listen: 127.0.0.1:{n.mqtt_port}, stream_replicas: 3, consumer_replicas: 3 }}\n"
        )
        log = open(tmp_path / f"{n.name}.log", "ab")  # noqa: SIM115 - the process keeps it
        n.proc = subprocess.Popen([nats_bin(), "-c", str(conf)], stdout=log, stderr=log)
    for n in nodes:
        wait_port(n.mqtt_port, 30)
    yield nodes
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            n.proc.terminate()
            n.proc.wait(10)


def jetstream(node: NatsNode, subject: str, request: dict | None = None) -> dict:
    """One JetStream API request over the NATS protocol of ``node`` (no NATS client library here)."""
    body = json.dumps(request or {}).encode()
    with socket.create_connection(("127.0.0.1", node.client_port), 5) as s:
        f = s.makefile("rb")
        f.readline()  # INFO
        s.sendall(
            b'CONNECT {"verbose":false}\r\nSUB _INBOX.t 1\r\n'
            + f"PUB {subject} _INBOX.t {len(body)}\r\n".encode()
            + body
            + b"\r\n"
        )
        while line := f.readline():
            if line.startswith(b"MSG"):
                return json.loads(f.read(int(line.split()[-1]) + 2)[:-2])
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
    return {}


def lost(swarm: Swarm, pg: tuple[str, str], nodes: list[NatsNode], srv: FleetServer) -> str:
    """For a failure: which acknowledged messages are missing, and whether NATS still holds messages for
    the fleet's telemetry consumer (not delivered yet, or delivered and not acknowledged: the fleet was
    told to wait for a redelivery) or holds none (then the cluster acknowledged and lost them)."""
    stored = stored_seqs(pg[0], pg[1], "nats-")
    missing = {d: sorted(set(s) - stored.get(d, set())) for d, s in swarm.acked().items()}
    lines = [f"{sum(map(len, missing.values()))} missing of {swarm.totals()['acked']} acknowledged"]
    lines += [f"  {d} (node {i % 3}): {seqs[:10]}" for i, (d, seqs) in enumerate(sorted(missing.items())) if seqs]
    live = next(n for n in nodes if n.proc is not None and n.proc.poll() is None)
    try:
        info = jetstream(live, "$JS.API.STREAM.INFO.$MQTT_msgs")
        lines.append(f"$MQTT_msgs: {info.get('state', {}).get('messages')} messages held")
        for c in jetstream(live, "$JS.API.CONSUMER.LIST.$MQTT_msgs").get("consumers") or []:
            if c.get("config", {}).get("filter_subject", "").endswith(".telemetry"):
                lines.append(
                    f"telemetry consumer: {c.get('num_pending')} not delivered, {c.get('num_ack_pending')} "
                    f"awaiting a PUBACK, {c.get('num_redelivered')} redelivered, ack floor {c.get('ack_floor')}"
                )
    except (OSError, ValueError) as exc:
        lines.append(f"JetStream state unavailable: {exc}")
    return "\n".join(lines) + "\n" + srv.tail()


def stuck(dep: dict, swarm: Swarm | None, admin: Any = None) -> str:
    """What the fleet and the simulated device each think of the devices not yet done (for a failure)."""
    sims = {d.login.device_id: d for d in swarm.devices} if swarm else {}
    lines = [str(dep["counts"])]
    for t in dep.get("targets", []):
        if t["state"] != "succeeded" and (d := sims.get(t["device_id"])):
            lines.append(
                f"{t['device_id']}: fleet {t['state']}; device {d.state} {d.deployment} connected={d.connected} "
                f"connects={d.connects} subscribed={d.subscribed} node={d.urls[d.url_index % len(d.urls)]}"
            )
            if admin is not None:
                row = admin.device(t["device_id"])
                lines.append(f"  fleet's row: online={row.get('online')} last_seen={row.get('last_seen')}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("victim", [2, 0], ids=["a-devices-node", "the-fleets-node"])
def test_rollout_survives_the_loss_of_one_broker_node(
    tmp_path: Path, nats_cluster: list[NatsNode], bundles, release_key, pg, victim: int
) -> None:
    from fleet.client import FleetClient
    from manifests import SigningKey, write_keypair

    urls = [n.mqtt_url for n in nats_cluster]
    signing, _ = write_keypair(tmp_path / "fleet-key", SigningKey.generate())
    # NATS speaks MQTT 3.1.1; the bridge fails over to the next node in urls.
    broker_cfg = {"urls": urls[1:], "protocol": "3.1.1"}
    cfg = fleet_config(
        tmp_path,
        node_id="solo",
        database_url=pg[0],
        schema=pg[1],
        broker=urls[0],
        trusted_key=release_key[1],
        admin_token="nfa_nats-cluster-test-token",
        signing_key=signing,
        blobs=tmp_path / "blobs",
        shared=False,
        # A desired state lost while the cluster fails over is sent again after resend_s.
        overrides={"broker": broker_cfg, "resend_s": 5},
    )
    srv = FleetServer(cfg, log_level="info").start()
    swarm: Swarm | None = None
    try:
        with FleetClient(srv.url, "nfa_nats-cluster-test-token") as admin:
            admin.upload_bundle(bundles[1])
            token = admin.enrollment_token(uses=24)["token"]
            logins = []
            for i in range(24):
                creds = admin.enroll(token, device_id=f"nats-{i:02d}")
                logins.append(Login(creds["device_id"], creds["mqtt"]["username"], creds["mqtt"]["password"]))
        # Device i starts on node i % 3 and fails over to the next ones.
        swarm = Swarm(logins, lambda i: urls[i % 3 :] + urls[: i % 3], install_s=1.5, keepalive=5).start()
        swarm.wait_connected(timeout=60)
        swarm.set_rate(100)
        time.sleep(2)
        with FleetClient(srv.url, "nfa_nats-cluster-test-token") as admin:
            admin.apply(manifest("across-nodes", 1))
            time.sleep(0.5)
            node = nats_cluster[victim]  # the fleet's bridge is on node 0
            assert node.proc is not None
            node.proc.send_signal(signal.SIGKILL)  # mid-rollout: a third of the devices lose their node
            node.proc.wait(10)
            dep = wait_for(
                lambda: (d := admin.deployment("across-nodes"))["status"] == "completed" and d,
                120,
                interval=0.5,
                what="the rollout completed after losing a node",
                details=lambda: stuck(admin.deployment("across-nodes"), swarm, admin) + srv.tail(),
            )
        assert dep["counts"].get("succeeded") == 24, dep["counts"]
        assert sum(d.connects > 1 for d in swarm.devices) >= 8  # the dead node's devices reconnected elsewhere
        swarm.set_rate(0)
        wait_for(lambda: (t := swarm.totals())["acked"] == t["sent"], 30, what="acknowledgements")
        # NATS 2.9 redelivers what the dead connection was sent but had not acknowledged only after ack_wait
        # (30 s), and the telemetry connection may be refused for up to ~20 s while JetStream elects leaders
        # (docs/scaling.md): a second failover round of both does not fit 60 s. Zero missing still required.
        wait_for(
            lambda: missing_acked(swarm.acked(), stored_seqs(pg[0], pg[1], "nats-")) == 0,
            120,
            interval=1,
            what="every acknowledged message stored",
            details=lambda: lost(swarm, pg, nats_cluster, srv),
        )
    finally:
        if swarm is not None:
            swarm.stop()
        srv.stop()
