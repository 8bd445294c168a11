"""site.yml for real: provision two boards and the broker into scratch roots on this machine, then check
that the result works (broker ACL with real mosquitto, agent started from the unit's ExecStart answers
/readyz) and that a second run changes nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from manifests import SigningKey, write_keypair
from tests.conftest import free_port, mosquitto_bin, wait_port

from ._harness import (
    REPO,
    Run,
    broker_host_vars,
    device_host_vars,
    run_playbook,
    write_inventory,
)

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]


@dataclass
class Site:
    tmp: Path
    inventory: Path
    home: Path
    roots: dict[str, Path]
    broker_port: int
    api_ports: dict[str, int]
    first: Run
    second: Run

    def credential(self, kind: str, name: str) -> str:
        return (self.inventory.parent / "credentials" / kind / name).read_text().strip()


def _build_wheel(dest: Path) -> Path:
    # What `make dist` does.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dest.glob("nanofleet-*.whl")
    return wheel


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("site")
    wheel = _build_wheel(tmp / "dist")
    _priv, pub = write_keypair(tmp / "keys", SigningKey.generate())
    broker_port = free_port()
    roots = {name: tmp / "roots" / name for name in ("broker", "fleet", "board-a", "board-b")}
    api_ports = {"board-a": free_port(), "board-b": free_port()}
    inventory = write_inventory(
        tmp / "inventory" / "hosts.yml",
        broker={"broker-test": broker_host_vars(roots["broker"], broker_port)},
        fleet={"fleet-test": {"ansible_host": "127.0.0.1"}},
        pi5={
            name: device_host_vars(roots[name], api_port=api_ports[name], bundle=None)
            for name in ("board-a", "board-b")
        },
        common={
            "nanofleet_trusted_keys": [str(pub)],
            "nanofleet_wheel": str(wheel),
            "nanofleet_broker_port": broker_port,
            "nanofleet_artifact_base_url": "http://127.0.0.1:9/artifacts/",
        },
    )
    home = tmp / "ansible-home"
    first = run_playbook(inventory, home)
    assert first.rc == 0, first.output[-6000:]
    second = run_playbook(inventory, home)
    assert second.rc == 0, second.output[-6000:]
    yield Site(tmp, inventory, home, roots, broker_port, api_ports, first, second)


def test_first_run_provisions_every_host(site: Site) -> None:
    assert set(site.first.recap) >= {"broker-test", "board-a", "board-b"}
    assert all(r["failed"] == 0 for r in site.first.recap.values())
    for board in ("board-a", "board-b"):
        root = site.roots[board]
        assert (root / "opt/nanofleet/venv/bin/nanofleet").is_file()
        assert (root / "etc/nanofleet/agent.yaml").is_file()
        assert (root / "etc/systemd/system/nanofleet-agent.service").is_file()
    assert (site.roots["broker"] / "etc/mosquitto/conf.d/nanofleet.conf").is_file()


def test_second_run_changes_nothing(site: Site) -> None:
    assert site.second.recap, site.second.output[-3000:]
    assert site.second.changed() == dict.fromkeys(site.second.recap, 0), site.second.output[-6000:]


def test_agent_config_is_accepted_by_the_agent(site: Site) -> None:
    from device.agent.config import load_config

    cfg = load_config(site.roots["board-a"] / "etc/nanofleet/agent.yaml")
    assert cfg.device_id == "board-a"
    assert cfg.mqtt.username == "board-a"
    assert cfg.mqtt.url == f"mqtt://127.0.0.1:{site.broker_port}"
    assert cfg.mqtt.resolved_password() == site.credential("mqtt", "board-a")
    assert cfg.api.resolved_token() == site.credential("api", "board-a")
    assert cfg.api.port == site.api_ports["board-a"]
    assert [p.name for p in cfg.trusted_keys] == ["release.pub"] or len(cfg.trusted_keys) == 1
    assert cfg.data_dir == site.roots["board-a"] / "var/lib/nanofleet"


def test_secrets_are_per_device_private_and_never_logged(site: Site) -> None:
    a, b = site.credential("mqtt", "board-a"), site.credential("mqtt", "board-b")
    assert a != b and len(a) >= 32
    for board in ("board-a", "board-b"):
        for name in ("mqtt.password", "api.token"):
            path = site.roots[board] / "etc/nanofleet" / name
            assert path.stat().st_mode & 0o777 == 0o640, path
    assert (site.roots["broker"] / "etc/mosquitto/nanofleet.passwd").stat().st_mode & 0o777 == 0o640
    secrets = [a, b, site.credential("mqtt", "_fleet-service"), site.credential("api", "board-a")]
    for run in (site.first, site.second):
        for secret in secrets:
            assert secret not in run.output
    # No secret in the broker's files either: only hashes.
    assert a not in (site.roots["broker"] / "etc/mosquitto/nanofleet.passwd").read_text()


# --- the broker, for real ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(site: Site) -> Iterator[int]:
    """mosquitto started from the generated main config, as Debian's unit starts it."""
    conf = site.roots["broker"] / "etc/mosquitto/mosquitto.conf"
    log = open(site.tmp / "mosquitto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([mosquitto_bin(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(site.broker_port)
        yield site.broker_port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _client(port: int, username: str | None, password: str | None) -> tuple[mqtt.Client, int]:
    client_id = f"t-{username}-{time.monotonic_ns()}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    result: dict[str, int] = {}
    done = threading.Event()

    def on_connect(_c, _u, _f, reason_code, _p):  # type: ignore[no-untyped-def]
        result["rc"] = reason_code.value
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert done.wait(10), "no CONNACK"
    return client, result["rc"]


class _Probe:
    """A connected MQTT v5 client that records SUBACK/PUBACK reason codes and received messages."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, list[int]] = {}
        self._events: dict[int, threading.Event] = {}
        self.client, rc = _client(port, username, password)
        assert rc == 0, f"{username} could not connect: reason {rc}"
        self.client.on_message = lambda _c, _u, msg: self.messages.append((msg.topic, msg.payload))
        self.client.on_subscribe = self._on_ack
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self._ack(mid, [rc.value])

    def _on_ack(self, _c, _u, mid, reason_codes, _p):  # type: ignore[no-untyped-def]
        self._ack(mid, [rc.value for rc in reason_codes])

    def _ack(self, mid: int, codes: list[int]) -> None:
        self.acks[mid] = codes
        self._events.setdefault(mid, threading.Event()).set()

    def _wait(self, mid: int) -> list[int]:
        assert self._events.setdefault(mid, threading.Event()).wait(10), "no ack"
        return self.acks[mid]

    def subscribe(self, topic: str) -> int:
        _rc, mid = self.client.subscribe(topic, qos=1)
        return self._wait(mid)[0]

    def publish(self, topic: str, payload: bytes = b"x") -> int:
        info = self.client.publish(topic, payload, qos=1)
        return self._wait(info.mid)[0]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


NOT_AUTHORIZED = 0x87


def test_broker_denies_anonymous_and_wrong_passwords(site: Site, broker: int) -> None:
    for username, password in ((None, None), ("board-a", "wrong-password-123456"), ("nobody", "x" * 40)):
        client, rc = _client(broker, username, password)
        client.loop_stop()
        assert rc in (NOT_AUTHORIZED, 0x86), f"{username!r} connected: reason {rc}"


def test_broker_acl_confines_each_device_to_its_own_topics(site: Site, broker: int) -> None:
    prefix = "nanofleet/v1/devices"
    fleet = _Probe(broker, "nanofleet-fleet", site.credential("mqtt", "_fleet-service"))
    a = _Probe(broker, "board-a", site.credential("mqtt", "board-a"))
    b = _Probe(broker, "board-b", site.credential("mqtt", "board-b"))
    try:
        # The fleet service sees everything; each device its own subtree only. mosquitto grants a
        # subscription it may not serve and then filters each delivery by the ACL, so check delivery.
        assert fleet.subscribe(f"{prefix}/+/#") == 1
        assert a.subscribe(f"{prefix}/board-a/desired") == 1
        assert b.subscribe(f"{prefix}/board-b/#") == 1
        for snooping in (f"{prefix}/board-b/desired", f"{prefix}/+/telemetry", "#"):
            a.subscribe(snooping)

        # A device publishes what a device reports, under its own id.
        assert a.publish(f"{prefix}/board-a/telemetry", b"a-own") == 0
        # ...but nothing under another device, and never its own desired state (that is the fleet's).
        assert a.publish(f"{prefix}/board-b/desired", b"a-forged") == NOT_AUTHORIZED
        assert a.publish(f"{prefix}/board-b/telemetry", b"a-forged") == NOT_AUTHORIZED
        assert a.publish(f"{prefix}/board-a/desired", b"a-self") == NOT_AUTHORIZED
        # The fleet may command any device; B reports.
        assert fleet.publish(f"{prefix}/board-b/desired", b"fleet-cmd") == 0
        assert b.publish(f"{prefix}/board-b/telemetry", b"b-own") == 0

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (len(fleet.messages) < 3 or not b.messages):
            time.sleep(0.05)
        time.sleep(0.5)  # room for anything that should not arrive
        assert sorted(fleet.messages) == sorted(
            [
                (f"{prefix}/board-a/telemetry", b"a-own"),
                (f"{prefix}/board-b/desired", b"fleet-cmd"),
                (f"{prefix}/board-b/telemetry", b"b-own"),
            ]
        )
        assert (f"{prefix}/board-b/desired", b"fleet-cmd") in b.messages
        assert not any(p.startswith(b"a-") for _t, p in b.messages)
        # A got its own telemetry back through '#', and nothing of B's.
        assert a.messages and all(t.startswith(f"{prefix}/board-a/") for t, _p in a.messages), a.messages
    finally:
        for probe in (fleet, a, b):
            probe.close()
