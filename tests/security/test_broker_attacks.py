"""One broker attack suite, run against every broker the fleet supports (tests/security/brokers.py): an
attacker holds one enrolled device's valid credentials (device A) and goes after another device (B),
the fleet, and the broker itself. Each case checks what B, the fleet and a fresh subscriber see, not
how the broker refuses (mosquitto and amqtt refuse differently; docs/security.md says how)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
import uuid

import httpx
import pytest

from manifests import mqtt as c
from tests.fleet.conftest import wait_for

from .brokers import FLEET_MQTT_USER, BrokerUnderTest, DeviceLogin
from .conftest import Peer, agent, marker
from .rawmqtt import RawClient, Will

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]
NOW = dt.datetime.now(dt.timezone.utc)


def metric(broker: BrokerUnderTest, name: str, **labels: str) -> float:
    """One sample of the running fleet service's /metrics (0 when absent)."""
    text = httpx.get(f"{broker.fleet.url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and (m.group(2) or "") == want:
            return float(m.group(3))
    return 0.0


def status(device_id: str, online: bool, tag: str = "") -> bytes:
    return c.Status(device_id=device_id, online=online, ts=NOW, agent_version=tag or "1.0").to_bytes()


def reported(device_id: str, tag: str, **kw: object) -> bytes:
    doc = {"device_id": device_id, "state": "failed", "agent_version": tag[:64], "ts": dt.datetime.now(dt.timezone.utc)}
    doc.update(kw)
    return c.ReportedState(**doc).to_bytes()  # type: ignore[arg-type]


def telemetry(device_id: str, seq: int, tag: str = "") -> bytes:
    return c.Telemetry(device_id=device_id, seq=seq, ts=dt.datetime.now(dt.timezone.utc), agent_version=tag).to_bytes()


def desired(device_id: str, deployment_id: str) -> bytes:
    return c.DesiredState(device_id=device_id, deployment_id=deployment_id, issued_at=NOW).to_bytes()


def online_device(broker: BrokerUnderTest, login: DeviceLogin, peers: list[Peer]) -> Peer:
    p = agent(broker, login, peers)
    p.publish(c.status_topic(login.device_id), status(login.device_id, True), retain=True)
    with broker.admin() as admin:
        wait_for(lambda: admin.device(login.device_id)["online"], what=f"{login.device_id} online in the fleet")
    return p


def still_connected(p: Peer, device_id: str) -> bool:
    """No disconnect seen, and a message through the broker still comes back to it."""
    if p.disconnects:
        return False
    probe = f"alive-{uuid.uuid4().hex[:6]}".encode()
    topic = c.events_topic(device_id)
    p.publish(topic, probe)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if probe in p.payloads(topic):
            return not p.disconnects
        time.sleep(0.05)
    return False


def test_a_last_will_on_another_devices_topics_never_arrives(broker: BrokerUnderTest, peers: list[Peer]) -> None:
    """Issue 15 item 1: A's will on B's status/reported/desired, retained, then a dropped socket."""
    a, b = broker.provision(2, prefix="will")
    pb = online_device(broker, b, peers)
    tag = marker()
    wills = {
        c.status_topic(b.device_id): status(b.device_id, False, tag),
        c.reported_topic(b.device_id): reported(b.device_id, tag, last_result="rolled_back", deployment_id="x"),
        c.desired_topic(b.device_id): desired(b.device_id, tag),
    }
    for topic, payload in wills.items():
        raw = RawClient(broker.host, broker.port, broker.raw_version)
        rc = raw.connect(f"will-{uuid.uuid4().hex[:6]}", a.username, a.password, will=Will(topic, payload))
        raw.drop()  # no DISCONNECT: a broker that accepted the will publishes it now
        print(f"{broker.name}: CONNECT with a will on {topic.rsplit('/', 1)[1]} of another device -> {rc}")
    # The control: A's will on its own status is delivered, so the checks below can fail.
    own = RawClient(broker.host, broker.port, broker.raw_version)
    assert (
        own.connect(
            "own-will", a.username, a.password, will=Will(c.status_topic(a.device_id), status(a.device_id, False))
        )
        == 0
    )
    own.publish(c.status_topic(a.device_id), status(a.device_id, True), qos=0, retain=True)
    with broker.admin() as admin:
        wait_for(lambda: admin.device(a.device_id)["online"], what="A online")
        own.drop()
        wait_for(lambda: not admin.device(a.device_id)["online"], what="A's own will marking it offline")
        rec = admin.device(b.device_id)
    assert rec["online"], "A's will marked B offline"
    assert tag not in json.dumps(rec), "A's will reached B's record"
    assert not any(tag.encode() in m.payload for m in pb.messages), "B received A's will"
    # Nothing of A's stayed retained on B's topics: B subscribing again gets only what B and the fleet put there.
    pb.client.unsubscribe(f"nanofleet/v1/devices/{b.device_id}/#")
    pb.subscribe(f"nanofleet/v1/devices/{b.device_id}/#")
    time.sleep(1.0)
    assert not any(tag.encode() in m.payload for m in pb.messages)
    assert still_connected(pb, b.device_id)


def test_another_devices_client_id_takes_nothing_over(broker: BrokerUnderTest, peers: list[Peer]) -> None:
    """Item 2: A logs in (valid credentials) with B's client id; B stays connected."""
    a, b = broker.provision(2, prefix="cid")
    pb = online_device(broker, b, peers)
    for _ in range(3):
        intruder = Peer(broker, a.username, a.password, b.client_id)
        peers.append(intruder)
        time.sleep(0.5)
    assert still_connected(pb, b.device_id), f"B was disconnected: {pb.disconnects}"
    with broker.admin() as admin:
        assert admin.device(b.device_id)["online"]


def test_refused_logins_with_a_devices_id_do_not_disconnect_it(broker: BrokerUnderTest, peers: list[Peer]) -> None:
    """Item 2: wrong, missing or borrowed passwords with B's username and client id are refused, and B,
    connected meanwhile, is not disconnected at any of them."""
    a, b = broker.provision(2, prefix="kick")
    pb = online_device(broker, b, peers)
    attempts = [
        (b.username, "nfd_wrong-password", b.client_id),
        (b.username, a.password, b.client_id),  # A's token under B's name
        (a.username, b.password, b.client_id),
        (None, None, b.client_id),
        (b.username, None, b.client_id),
    ]
    for username, password, client_id in attempts:
        p = Peer(broker, username, password, client_id)
        peers.append(p)
        assert not p.accepted, f"login {username!r}/{password!r} was accepted"
    assert still_connected(pb, b.device_id), f"B was disconnected: {pb.disconnects}"


def test_login_failures_are_refused_and_leave_a_trace(broker: BrokerUnderTest, peers: list[Peer]) -> None:
    """Item 7: wrong, missing and foreign logins are refused, logged, and (embedded broker) counted."""
    (a,) = broker.provision(1, prefix="login")
    before = metric(broker, "nanofleet_mqtt_refused_logins_total", reason="bad_credentials")
    log_before = broker.broker_log().count("not authorised")
    attempts = [
        (f"nobody-{uuid.uuid4().hex[:6]}", "nfd_whatever"),
        (a.username, "nfd_wrong"),
        (FLEET_MQTT_USER, "not-the-fleet-password"),
        (a.username, ""),
    ]
    for username, password in attempts:
        p = Peer(broker, username, password, f"login-{uuid.uuid4().hex[:6]}")
        peers.append(p)
        assert not p.accepted, (username, p.connacks)
    anon = Peer(broker, None, None, f"anon-{uuid.uuid4().hex[:6]}")
    peers.append(anon)
    assert not anon.accepted
    if broker.name == "embedded":
        assert metric(broker, "nanofleet_mqtt_refused_logins_total", reason="bad_credentials") >= before + 3
        assert metric(broker, "nanofleet_mqtt_refused_logins_total", reason="no_credentials") >= 2
    else:
        wait_for(lambda: broker.broker_log().count("not authorised") >= log_before + 5, what="mosquitto's log lines")


def test_foreign_publishes_change_nothing_and_payload_identity_is_not_trusted(
    broker: BrokerUnderTest, peers: list[Peer]
) -> None:
    """Items 1 and 7: A publishes as B on B's topics (dropped by the ACL) and as B on its own topics
    (dropped by the fleet's ingest, counted as identity)."""
    a, b = broker.provision(2, prefix="pub")
    pb = online_device(broker, b, peers)
    pa = agent(broker, a, peers)
    tag = marker()
    identity_before = metric(broker, "nanofleet_mqtt_dropped_total", reason="identity")
    denied_before = metric(broker, "nanofleet_mqtt_acl_denied_total", action="publish")
    for topic, payload in [
        (c.reported_topic(b.device_id), reported(b.device_id, tag)),
        (c.telemetry_topic(b.device_id), telemetry(b.device_id, 1, tag)),
        (c.events_topic(b.device_id), tag.encode()),
        (c.status_topic(b.device_id), status(b.device_id, False, tag)),
        (c.desired_topic(b.device_id), desired(b.device_id, tag)),
        (c.desired_topic(a.device_id), desired(a.device_id, tag)),  # a device never writes desired
        (f"nanofleet/v1/fleet/{tag}", tag.encode()),
    ]:
        pa.publish(topic, payload, retain=True)
    # Its own topics, claiming to be B: the broker lets it through, the fleet must not believe it.
    pa.publish(c.reported_topic(a.device_id), reported(b.device_id, tag))
    pa.publish(c.telemetry_topic(a.device_id), telemetry(b.device_id, 7, tag))
    # The control: A's genuine report on its own topic is taken.
    pa.publish(c.reported_topic(a.device_id), reported(a.device_id, "genuine", state="idle"))
    with broker.admin() as admin:
        wait_for(
            lambda: (admin.device(a.device_id)["reported"] or {}).get("agent_version") == "genuine",
            what="A's own report",
        )
        wait_for(
            lambda: metric(broker, "nanofleet_mqtt_dropped_total", reason="identity") >= identity_before + 2,
            what="the identity drops counted",
        )
        # Last: $-topics are the broker's, and amqtt closes the connection of a client publishing to one.
        pa.publish(f"$SYS/broker/{tag}", tag.encode(), retain=True)
        time.sleep(0.5)
        rec_b = admin.device(b.device_id)
        assert admin.telemetry(b.device_id) == []
    assert rec_b["online"] and tag not in json.dumps(rec_b)
    if broker.name == "embedded":  # item 7: each ACL refusal is counted (and logged, fleet.broker)
        assert metric(broker, "nanofleet_mqtt_acl_denied_total", action="publish") >= denied_before + 7
    assert not any(tag.encode() in m.payload for m in pb.messages), "B received A's forgeries"
    assert still_connected(pb, b.device_id)


def _desired_for(broker: BrokerUnderTest, tiny_bundle, device_id: str) -> str:
    """Roll the test bundle out to one device; the deployment id the fleet publishes in its desired state."""
    with broker.admin() as admin:
        if not any(m["name"] == "sec-model" for m in admin.models()):
            admin.upload_bundle(tiny_bundle)
        name = f"sec-{uuid.uuid4().hex[:6]}"
        admin.apply(
            {
                "apiVersion": "nanofleet/v1",
                "kind": "Deployment",
                "metadata": {"name": name},
                "spec": {
                    "bundle": {"name": "sec-model", "version": 1},
                    "selector": {"device_ids": [device_id]},
                    "strategy": {"type": "all-at-once"},
                },
            }
        )
        dev = wait_for(lambda: admin.device(device_id)["desired"], what="a desired state")
        return dev["deployment_id"]


def test_wildcard_and_foreign_subscriptions_see_nothing_of_other_devices(
    broker: BrokerUnderTest, peers: list[Peer], tiny_bundle
) -> None:
    """A subscribes to B's topics, to wildcards over every device, to $SYS, $CONTROL and shared
    subscriptions: it gets nothing that is not its own, retained or live."""
    a, b = broker.provision(2, prefix="sub")
    pb = online_device(broker, b, peers)
    deployment_id = _desired_for(broker, tiny_bundle, b.device_id)
    wait_for(lambda: pb.payloads(c.desired_topic(b.device_id)), what="B's desired state (the control)")
    assert deployment_id.encode() in pb.payloads(c.desired_topic(b.device_id))[-1]
    pa = agent(broker, a, peers)
    denied_before = metric(broker, "nanofleet_mqtt_acl_denied_total", action="subscribe")
    granted = {}
    for topic in [
        c.desired_topic(b.device_id),
        f"nanofleet/v1/devices/{b.device_id}/#",
        "nanofleet/v1/devices/+/desired",
        "nanofleet/v1/devices/#",
        "nanofleet/#",
        "#",
        "+/+/+/+/+",
        "$SYS/#",
        "$CONTROL/#",
        "$share/attack/nanofleet/v1/devices/+/desired",
    ]:
        granted[topic] = pa.subscribe(topic)
    print(f"{broker.name}: SUBACK codes {granted}")
    pb.publish(c.telemetry_topic(b.device_id), telemetry(b.device_id, 1))  # live traffic of B's
    time.sleep(2.0)
    foreign = [t for t in pa.topics() if not t.startswith(f"nanofleet/v1/devices/{a.device_id}/")]
    assert foreign == [], f"A received {foreign[:10]}"
    if broker.name == "embedded":
        assert metric(broker, "nanofleet_mqtt_acl_denied_total", action="subscribe") >= denied_before + 8
    assert still_connected(pb, b.device_id)


def test_retained_messages_on_foreign_topics_are_refused(
    broker: BrokerUnderTest, peers: list[Peer], tiny_bundle
) -> None:
    """A overwrites and clears B's retained desired state: B, subscribing again, still gets the fleet's."""
    a, b = broker.provision(2, prefix="ret")
    pb = online_device(broker, b, peers)
    deployment_id = _desired_for(broker, tiny_bundle, b.device_id)
    wait_for(lambda: pb.payloads(c.desired_topic(b.device_id)), what="B's desired state")
    pa = agent(broker, a, peers)
    tag = marker()
    pa.publish(c.desired_topic(b.device_id), desired(b.device_id, tag), retain=True)
    pa.publish(c.desired_topic(b.device_id), b"", retain=True)  # an empty retained message clears it
    pa.publish(c.reported_topic(b.device_id), b"", retain=True)
    time.sleep(0.5)
    pb.messages.clear()
    pb.client.unsubscribe(c.desired_topic(b.device_id))
    pb.client.unsubscribe(f"nanofleet/v1/devices/{b.device_id}/#")
    pb.subscribe(c.desired_topic(b.device_id))
    got = wait_for(lambda: pb.payloads(c.desired_topic(b.device_id)), what="B's retained desired state")
    assert all(tag.encode() not in p for p in got)
    assert json.loads(got[-1])["deployment_id"] == deployment_id


def test_control_topics_cannot_create_users(broker: BrokerUnderTest, peers: list[Peer]) -> None:
    """A asks a dynamic-security plugin (if the broker has one) to create a user: that user cannot log in."""
    (a,) = broker.provision(1, prefix="ctl")
    pa = agent(broker, a, peers)
    user, password = f"evil-{uuid.uuid4().hex[:6]}", "evil-password-123456"
    command = {
        "commands": [
            {"command": "createClient", "username": user, "password": password},
            {"command": "addClientRole", "username": user, "rolename": "admin"},
        ]
    }
    pa.publish("$CONTROL/dynamic-security/v1", json.dumps(command).encode())
    time.sleep(1.0)
    evil = Peer(broker, user, password, user)
    peers.append(evil)
    assert not evil.accepted


def test_oversized_packets_are_refused_and_the_fleet_stores_nothing(broker: BrokerUnderTest, peers: list[Peer]) -> None:
    """Item 5: a packet over the broker's cap closes the connection (before its body is read); one under
    the broker's cap but over the kind's payload cap is dropped at ingest (counted as too_large)."""
    a, b = broker.provision(2, prefix="big")
    pb = online_device(broker, b, peers)
    raw = RawClient(broker.host, broker.port, broker.raw_version)
    assert raw.connect(f"big-{uuid.uuid4().hex[:6]}", a.username, a.password) == 0
    try:
        raw.publish(c.telemetry_topic(a.device_id), b"x" * (10 * 1024 * 1024), qos=1)
    except OSError:
        pass  # the broker hung up mid-packet
    assert raw.is_closed_by_peer(15), "the broker kept a connection that sent a 10 MB packet"
    before = metric(broker, "nanofleet_mqtt_dropped_total", reason="too_large")
    pa = agent(broker, a, peers)
    pa.publish(c.telemetry_topic(a.device_id), telemetry(a.device_id, 1, "x" * 100_000))
    pa.publish(c.events_topic(a.device_id), json.dumps({"message": "y" * 200_000}).encode())
    wait_for(
        lambda: metric(broker, "nanofleet_mqtt_dropped_total", reason="too_large") >= before + 2,
        what="the too-large drops counted",
    )
    with broker.admin() as admin:
        assert admin.telemetry(a.device_id) == []
    assert still_connected(pb, b.device_id)


def test_no_device_can_take_the_fleets_connections_over(
    broker: BrokerUnderTest, peers: list[Peer], caplog: pytest.LogCaptureFixture
) -> None:
    """A logs in with each client id the fleet's bridge uses, on the devices' listener and (where the broker
    has one) the fleet's own: the fleet is never disconnected and keeps ingesting."""
    (a,) = broker.provision(1, prefix="fl")
    caplog.set_level(logging.INFO, logger="fleet.bridge")
    caplog.clear()
    bridge = broker.fleet.svc.bridge
    assert bridge is not None
    fleet_ids = list(bridge.client_ids)  # every connection the bridge holds
    ports = [broker.port] + ([broker.service_port] if broker.service_port else [])
    for port in ports:
        for cid in fleet_ids:
            raw = RawClient(broker.host, port, broker.raw_version)
            rc = raw.connect(cid, a.username, a.password)
            print(f"{broker.name}: device login with the fleet's client id {cid} on port {port} -> {rc}")
            if port == broker.service_port:
                assert rc != 0, "a device logged in on the fleet's listener"
            raw.sock.close()
    time.sleep(1.5)
    kicked = [r.getMessage() for r in caplog.records if r.name == "fleet.bridge" and "disconnected" in r.getMessage()]
    assert not kicked, kicked
    pa = agent(broker, a, peers)
    pa.publish(c.reported_topic(a.device_id), reported(a.device_id, "after", state="idle"))
    with broker.admin() as admin:
        wait_for(
            lambda: (admin.device(a.device_id)["reported"] or {}).get("agent_version") == "after",
            what="the fleet still ingesting",
        )
