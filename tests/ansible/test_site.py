"""site.yml for real: provision two boards and the broker into scratch roots on this machine, then check
that the result works (broker ACL with real mosquitto, agent started from the unit's ExecStart answers
/readyz) and that a second run changes nothing."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import free_port, mosquitto_bin, wait_port

from ._harness import (
    REPO,
    Processes,
    Run,
    broker_host_vars,
    device_host_vars,
    exec_start,
    fleet_host_vars,
    run_playbook,
    unit_environment,
    write_inventory,
)

# The module fixture runs the playbook three times and may wait for the default bundle to be built.
pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.timeout(1800)]


@dataclass
class Site:
    tmp: Path
    inventory: Path
    home: Path
    roots: dict[str, Path]
    broker_port: int
    fleet_port: int
    api_ports: dict[str, int]
    base: Run  # --limit broker,fleet: the services first
    first: Run  # everything: enrolment, broker users, boards
    second: Run  # again: must change nothing
    procs: Processes

    def credential(self, *parts: str) -> str:
        return self.inventory.parent.joinpath("credentials", *parts).read_text().strip()

    @property
    def fleet_url(self) -> str:
        return f"http://127.0.0.1:{self.fleet_port}"

    def fleet_get(self, path: str) -> httpx.Response:
        token = self.credential("fleet-admin-token")
        return httpx.get(self.fleet_url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def runs(self) -> list[Run]:
        return [self.base, self.first, self.second]


def _build_wheel(dest: Path) -> Path:
    # What `make dist` does.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dest.glob("nanofleet-*.whl")
    return wheel


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: {url} not 200 after {timeout}s")


@pytest.fixture(scope="module")
def site(default_bundle: tuple[Path, Path]) -> Iterator[Site]:
    bundle, bundle_pub = default_bundle
    # Not pytest's tmp_path: its retention sweeps other sessions' folders, and several run at once here.
    tmp = Path(tempfile.mkdtemp(prefix="nanofleet-ansible-"))
    procs = Processes(tmp)
    try:
        wheel = _build_wheel(tmp / "dist")
        broker_port, fleet_port = free_port(), free_port()
        roots = {name: tmp / "roots" / name for name in ("broker", "fleet", "board-a", "board-b")}
        api_ports = {"board-a": free_port(), "board-b": free_port()}
        inventory = write_inventory(
            tmp / "inventory" / "hosts.yml",
            broker={"broker-test": broker_host_vars(roots["broker"], broker_port)},
            fleet={"fleet-test": fleet_host_vars(roots["fleet"])},
            pi5={
                name: device_host_vars(
                    roots[name], api_port=api_ports[name], bundle=bundle if name == "board-a" else None
                )
                for name in ("board-a", "board-b")
            },
            common={
                "nanofleet_trusted_keys": [str(bundle_pub)],
                "nanofleet_wheel": str(wheel),
                "nanofleet_broker_port": broker_port,
                "nanofleet_fleet_port": fleet_port,
            },
        )
        home = tmp / "ansible-home"

        # 1. The broker and the fleet service, then start them as their units would.
        base = run_playbook(inventory, home, "--limit", "broker,fleet")
        assert base.rc == 0, base.output[-6000:]
        broker_conf = roots["broker"] / "etc/mosquitto/mosquitto.conf"
        mosq = procs.start("mosquitto", [mosquitto_bin(), "-c", str(broker_conf)])
        wait_port(broker_port)
        fleet_unit = roots["fleet"] / "etc/systemd/system/nanofleet-fleet.service"
        fleet = procs.start("fleet", exec_start(fleet_unit), unit_environment(fleet_unit))
        _wait_http(f"http://127.0.0.1:{fleet_port}/healthz", 120, fleet, "fleet service")

        # 2. Everything: the boards enrol with the live fleet, the broker learns their credentials.
        first = run_playbook(inventory, home)
        assert first.rc == 0, first.output[-8000:]
        mosq.send_signal(signal.SIGHUP)  # what the role's "Reload mosquitto" handler does under systemd
        time.sleep(0.5)

        # 3. Again: nothing may change.
        second = run_playbook(inventory, home)
        assert second.rc == 0, second.output[-6000:]
        yield Site(
            tmp, inventory, home, roots, broker_port, fleet_port, api_ports, base, first, second, procs
        )
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def test_runs_provision_every_host(site: Site) -> None:
    assert set(site.first.recap) == {"broker-test", "fleet-test", "board-a", "board-b"}
    for board in ("board-a", "board-b"):
        root = site.roots[board]
        assert (root / "opt/nanofleet/venv/bin/nanofleet").is_file()
        assert (root / "etc/nanofleet/agent.yaml").is_file()
        assert (root / "etc/systemd/system/nanofleet-agent.service").is_file()
    assert (site.roots["broker"] / "etc/mosquitto/conf.d/nanofleet.conf").is_file()
    assert (site.roots["fleet"] / "etc/nanofleet-fleet/fleet.yaml").stat().st_mode & 0o777 == 0o640


def test_units_pass_systemd_analyze_verify(site: Site) -> None:
    """systemd's own checker: known keys, valid values, an executable ExecStart (the venv's nanofleet)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd): cannot check the units")
    for unit in (
        site.roots["board-a"] / "etc/systemd/system/nanofleet-agent.service",
        site.roots["fleet"] / "etc/systemd/system/nanofleet-fleet.service",
    ):
        proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and not proc.stderr.strip(), (unit.name, proc.stderr)
        text = unit.read_text()
        assert "Restart=on-failure" in text
    agent_unit = (site.roots["board-a"] / "etc/systemd/system/nanofleet-agent.service").read_text()
    assert "Type=notify" in agent_unit and "WatchdogSec=60" in agent_unit


def test_second_run_changes_nothing(site: Site) -> None:
    assert site.second.recap, site.second.output[-3000:]
    assert site.second.changed() == dict.fromkeys(site.second.recap, 0), site.second.output[-8000:]


def test_boards_are_enrolled_through_the_fleet_api(site: Site) -> None:
    resp = site.fleet_get("/api/v1/devices")
    assert resp.status_code == 200, resp.text
    devices = {d["id"]: d for d in resp.json()}
    assert set(devices) == {"board-a", "board-b"}
    assert devices["board-a"]["groups"] == ["pi5"]
    # The MQTT password each board got is the fleet's device token, different per board.
    a, b = site.credential("mqtt", "board-a"), site.credential("mqtt", "board-b")
    assert a.startswith("nfd_") and b.startswith("nfd_") and a != b
    # The fleet accepts it as that board's credential and no other's.
    mine = httpx.get(
        f"{site.fleet_url}/api/v1/devices/board-a/desired",
        headers={"Authorization": f"Bearer {a}"},
        timeout=10,
    )
    theirs = httpx.get(
        f"{site.fleet_url}/api/v1/devices/board-b/desired",
        headers={"Authorization": f"Bearer {a}"},
        timeout=10,
    )
    assert mine.status_code != 401 and mine.status_code != 403, mine.text
    assert theirs.status_code in (401, 403), theirs.text


def test_boards_enrolled_themselves_with_device_enroll(site: Site) -> None:
    """Issue 17: one enrolment path. The role runs `nanofleet device enroll` on each board, which makes the
    board's own ed25519 key there (0600, never copied) and registers its public half with the fleet."""
    import sqlite3

    from device.agent.identity import load_device_key

    (db,) = site.roots["fleet"].rglob("fleet.db")
    with sqlite3.connect(db) as conn:
        registered = dict(conn.execute("SELECT id, public_key FROM devices").fetchall())
    for board in ("board-a", "board-b"):
        data_dir = site.roots[board] / "var/lib/nanofleet"
        assert (data_dir / "device.key").stat().st_mode & 0o777 == 0o600, board
        own = load_device_key(data_dir).public_pem().decode("ascii")
        assert (registered[board] or "").strip() == own.strip(), board


def test_agent_config_is_accepted_by_the_agent(site: Site) -> None:
    from device.agent.config import load_config

    cfg = load_config(site.roots["board-a"] / "etc/nanofleet/agent.yaml")
    assert cfg.device_id == "board-a"
    assert cfg.hardware_class == "pi5"
    assert cfg.mqtt.username == "board-a"
    assert cfg.mqtt.url == f"mqtt://127.0.0.1:{site.broker_port}"
    assert cfg.mqtt.resolved_password() == site.credential("mqtt", "board-a")
    assert cfg.api.resolved_token() == site.credential("api", "board-a")
    assert cfg.api.port == site.api_ports["board-a"]
    assert cfg.artifacts.base_url == f"{site.fleet_url}/bundles/"
    # The bundle-signing key and the fleet's rollback-signing key.
    assert sorted(p.name for p in cfg.trusted_keys) == ["fleet-signing.pub", "nanofleet.pub"]
    assert all(p.is_file() for p in cfg.trusted_keys)
    assert cfg.data_dir == site.roots["board-a"] / "var/lib/nanofleet"
    assert cfg.bootstrap_bundle is not None and (cfg.bootstrap_bundle / "manifest.sig").is_file()


def test_secrets_are_private_and_never_logged(site: Site) -> None:
    for board in ("board-a", "board-b"):
        for name in ("mqtt.password", "api.token", "agent.yaml"):
            path = site.roots[board] / "etc/nanofleet" / name
            assert path.stat().st_mode & 0o777 == 0o640, path
    passwd = site.roots["broker"] / "etc/mosquitto/nanofleet.passwd"
    assert passwd.stat().st_mode & 0o777 == 0o640
    secrets = [
        site.credential("mqtt", "board-a"),
        site.credential("mqtt", "board-b"),
        site.credential("mqtt", "_fleet-service"),
        site.credential("api", "board-a"),
        site.credential("fleet-admin-token"),
    ]
    for run in site.runs():
        for secret in secrets:
            assert secret not in run.output
    # The broker holds only hashes.
    assert not any(secret in passwd.read_text() for secret in secrets)
    cred_dir = site.inventory.parent / "credentials"
    assert cred_dir.stat().st_mode & 0o777 == 0o700
    assert (cred_dir / "mqtt" / "board-a").stat().st_mode & 0o777 == 0o600


# --- the broker, for real ---------------------------------------------------------------------------


@pytest.fixture
def broker(site: Site) -> int:
    """The mosquitto the site fixture started from the generated main config, as Debian's unit does."""
    assert site.procs.procs["mosquitto"].poll() is None, site.procs.log("mosquitto")
    return site.broker_port


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


# --- the agent, started from the unit's ExecStart ---------------------------------------------------


def test_agent_starts_from_its_unit_answers_readyz_and_reaches_the_fleet(site: Site) -> None:
    unit = site.roots["board-a"] / "etc/systemd/system/nanofleet-agent.service"
    argv = exec_start(unit)
    assert argv[1:4] == ["device", "run", "--config"]
    agent = site.procs.start("agent-a", argv, unit_environment(unit))
    port = site.api_ports["board-a"]
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", 300, agent, "agent")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{site.procs.log('agent-a')}") from None
    # The local API wants the per-device token.
    token = site.credential("api", "board-a")
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    assert models.status_code == 401
    models = httpx.get(
        f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert models.status_code == 200, models.text
    # Over the broker, with its fleet-issued credentials and within the ACL, the agent reaches the fleet.
    deadline = time.monotonic() + 60
    device: dict[str, object] = {}
    while time.monotonic() < deadline:
        device = site.fleet_get("/api/v1/devices/board-a").json()
        if device.get("online") and device.get("reported"):
            break
        time.sleep(1)
    assert device.get("online") and device.get("reported"), (device, site.procs.log("agent-a"))
