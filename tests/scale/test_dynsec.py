"""Mosquitto's dynamic security driven by the fleet: enrolment creates the device's broker login (no
ansible, no password file), the pattern ACL confines it to its own topics, deleting the device or
rotating its credentials takes effect at once (connected sessions are dropped, the old token refused), and
a login the database does not know is pruned when a server takes the rollout lease."""

from __future__ import annotations

import datetime as dt
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from fleet.accounts import DynsecAccounts
from manifests import mqtt as c

from .conftest import Cluster, manifest, wait_for

pytestmark = pytest.mark.slow


class Conn:
    """A device's own MQTT connection, recording CONNACKs, disconnects and messages."""

    def __init__(self, port: int, username: str, password: str, client_id: str) -> None:
        self.connacks: list[int] = []
        self.disconnected = threading.Event()
        self.messages: list[str] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, reconnect_on_failure=False
        )
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.append(rc.value)
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append(m.topic)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_for(lambda: self.connacks or self.disconnected.is_set(), 10, what="CONNACK")

    @property
    def accepted(self) -> bool:
        return self.connacks[:1] == [0] and not self.disconnected.is_set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_enrolment_revocation_and_rotation_take_effect_at_once(cluster: Cluster, bundles) -> None:
    srv = cluster.server("only", shared=False)
    cluster.upload(bundles[1])
    a, b = cluster.enrol(2, prefix="dyn")
    port = cluster.broker.port
    conns: list[Conn] = []
    try:
        # Enrolled: the broker knows both logins at once; a wrong password is refused.
        ca = Conn(port, a.username, a.password, f"nanofleet-agent-{a.device_id}")
        cb = Conn(port, b.username, b.password, f"nanofleet-agent-{b.device_id}")
        conns += [ca, cb]
        assert ca.accepted and cb.accepted
        wrong = Conn(port, a.username, "nfd_not-the-token", "intruder")
        conns.append(wrong)
        assert not wrong.accepted
        # b listens to every device's desired state; the ACL delivers only its own.
        cb.client.subscribe("nanofleet/v1/devices/+/desired", qos=1)
        ca.client.subscribe(c.desired_topic(a.device_id), qos=1)
        time.sleep(0.5)
        with cluster.admin(srv) as api:
            r = api.post("/api/v1/deployments", json=manifest("only-a", 1, selector={"device_ids": [a.device_id]}))
            assert r.status_code == 201, r.text
            wait_for(lambda: c.desired_topic(a.device_id) in ca.messages, 30, what="a's desired state")
            # a speaks for b: the broker drops it; a's own telemetry is stored.
            for dev, seq in ((b.device_id, 1), (a.device_id, 2)):
                payload = c.Telemetry(device_id=dev, seq=seq, ts=dt.datetime.now(dt.timezone.utc)).to_bytes()
                ca.client.publish(c.telemetry_topic(dev), payload, qos=1).wait_for_publish(10)
            wait_for(lambda: cluster.stored("dyn").get(a.device_id) == {2}, 30, what="a's own telemetry")
            assert b.device_id not in cluster.stored("dyn")
            assert c.desired_topic(a.device_id) not in cb.messages

            # Revocation: deleting the device drops its session and its login at once.
            assert api.delete(f"/api/v1/devices/{a.device_id}").status_code == 204
            assert ca.disconnected.wait(10), "a's session survived the deletion"
            again = Conn(port, a.username, a.password, f"nanofleet-agent-{a.device_id}")
            conns.append(again)
            assert not again.accepted

            # Rotation: the old token stops working for the broker, the new one works.
            rotated = api.post(f"/api/v1/devices/{b.device_id}/credentials/rotate").raise_for_status().json()
            assert cb.disconnected.wait(10), "b's session on the old token survived the rotation"
            old = Conn(port, b.username, b.password, f"nanofleet-agent-{b.device_id}")
            new = Conn(port, b.username, rotated["mqtt"]["password"], f"nanofleet-agent-{b.device_id}")
            conns += [old, new]
            assert not old.accepted and new.accepted
            # Sessions are named by login: another client id takes nothing over.
            borrowed = Conn(port, b.username, rotated["mqtt"]["password"], "nanofleet-fleet-only-state")
            conns.append(borrowed)
            assert borrowed.accepted and new.disconnected.wait(10)  # b's own session moved, nobody else's
            assert cluster.servers["only"].healthz()["mqtt_connected"]
    finally:
        for x in conns:
            x.close()


def test_a_login_unknown_to_the_database_is_pruned(cluster: Cluster) -> None:
    srv = cluster.server("only", shared=False)
    (kept,) = cluster.enrol(1, prefix="dyn")
    admin = DynsecAccounts(
        cluster.broker.url, "nanofleet-fleet", cluster.broker.fleet_password, device_role="nanofleet-device"
    )
    admin.start()
    try:
        admin.add_device("dyn-ghost", "nfd_left-behind")  # as a failed enrolment or a missed deletion leaves it
        assert {"dyn-ghost", kept.device_id} <= admin.device_clients()
        srv.stop()
        srv.start()  # takes the lease again: prunes after its grace period
        wait_for(lambda: "dyn-ghost" not in admin.device_clients(), 40, interval=1, what="the stray login pruned")
        assert kept.device_id in admin.device_clients()
    finally:
        admin.stop()
