"""Every broker the fleet supports, each started for real with a running fleet service on it, behind one
small interface the attack suite is written against (tests/security/test_broker_attacks.py).

- ``embedded``: the fleet's own amqtt broker (fleet/broker.py), per-device credentials and ACL.
- ``mosquitto-role``: mosquitto configured by the real ``ansible/roles/mosquitto`` role (run with
  ansible-playbook into a scratch root, as tests/ansible does), on free ports; the fleet service connects
  to the role's service listener as its superuser, devices to the device listener. A device is
  provisioned the way the role's password file is kept: ``mosquitto_passwd`` then SIGHUP (the role's
  reload handler).

To run the suite against another broker configuration, add a ``start_*`` function to ``BROKERS``: it gets
a scratch directory and the bundle-signing public key and returns a ``BrokerUnderTest``.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

from fleet.client import FleetClient
from fleet.config import BrokerConfig, FleetConfig
from fleet.server import ServerThread
from tests.conftest import free_port, mosquitto_bin, wait_port

REPO = Path(__file__).resolve().parents[2]
FLEET_MQTT_USER = "nanofleet-fleet"


@dataclass(frozen=True)
class DeviceLogin:
    device_id: str
    username: str
    password: str  # the device token: the MQTT password and the REST bearer token

    @property
    def client_id(self) -> str:
        return f"nanofleet-agent-{self.device_id}"  # what device/agent/mqtt_link.py uses


@dataclass
class BrokerUnderTest:
    name: str
    host: str
    port: int
    protocol: int  # paho's MQTTv311 or MQTTv5
    fleet: ServerThread
    provision_login: Callable[[str, str], None]  # (username, password): make the broker accept it
    log_file: Path | None = None
    stop_broker: Callable[[], None] = lambda: None
    service_port: int | None = None  # where the fleet logs in, when the broker has a listener for it
    _count: int = field(default=0)

    @property
    def raw_version(self) -> int:
        return 5 if self.protocol == mqtt.MQTTv5 else 4

    def admin(self) -> FleetClient:
        return FleetClient(self.fleet.url, self.fleet.svc.admin_token)

    def provision(self, n: int = 1, prefix: str = "atk") -> list[DeviceLogin]:
        """Enrol ``n`` devices with the fleet (as an agent does) and make the broker accept their logins."""
        with self.admin() as admin:
            token = admin.enrollment_token(uses=n)["token"]
        out = []
        with FleetClient(self.fleet.url) as anon:
            for _ in range(n):
                self._count += 1
                creds = anon.enroll(token, device_id=f"{prefix}-{self._count:03d}-{uuid.uuid4().hex[:4]}")
                login = DeviceLogin(creds["device_id"], creds["mqtt"]["username"], creds["mqtt"]["password"])
                self.provision_login(login.username, login.password)
                out.append(login)
        return out

    def broker_log(self) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")

    def close(self) -> None:
        self.fleet.stop()
        self.stop_broker()


def _fleet_config(work: Path, bundle_pub: Path, broker: BrokerConfig) -> FleetConfig:
    return FleetConfig(data_dir=work / "fleet", port=0, trusted_keys=[bundle_pub], tick_s=0.2, broker=broker)


def start_embedded(work: Path, bundle_pub: Path) -> BrokerUnderTest:
    fleet = ServerThread(_fleet_config(work, bundle_pub, BrokerConfig(embedded=True))).start()
    assert fleet.svc.broker is not None
    # The fleet is the broker's authority: an enrolled device can log in at once.
    return BrokerUnderTest(
        "embedded",
        fleet.svc.broker.host,
        fleet.svc.broker.port,
        mqtt.MQTTv311,
        fleet,
        provision_login=lambda _u, _p: None,
    )


def start_mosquitto_role(work: Path, bundle_pub: Path) -> BrokerUnderTest:
    from tests.ansible._harness import ANSIBLE_DIR, VENV_BIN, ansible_env, broker_host_vars

    port, service_port = free_port(), free_port()
    fleet_password = secrets.token_urlsafe(24)
    root = work / "root"
    host = {
        **broker_host_vars(root, port),
        "mosquitto_port": port,
        "mosquitto_service_port": service_port,
        "mosquitto_users": [{"username": FLEET_MQTT_USER, "password": fleet_password}],
        "mosquitto_superusers": [FLEET_MQTT_USER],
    }
    inventory = work / "hosts.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
                    "children": {"broker": {"hosts": {"broker-attack-suite": host}}},
                }
            }
        )
    )
    play = work / "broker.yml"
    play.write_text("- name: Broker only\n  hosts: broker\n  gather_facts: false\n  roles:\n    - role: mosquitto\n")
    env = {**ansible_env(work / "home"), "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")}
    run = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(play)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    etc = root / "etc/mosquitto"
    passwd = etc / "nanofleet.passwd"
    log_file = work / "mosquitto.log"
    with open(log_file, "ab") as log:
        proc = subprocess.Popen([mosquitto_bin(), "-c", str(etc / "mosquitto.conf")], stdout=log, stderr=log)
    wait_port(port)
    wait_port(service_port)

    def provision_login(username: str, password: str) -> None:
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), username, password], check=True, timeout=30)
        proc.send_signal(signal.SIGHUP)  # what the role's "Reload mosquitto" handler does
        deadline = time.monotonic() + 15
        while not _login_works(port, username, password):
            if time.monotonic() > deadline:
                raise AssertionError(f"mosquitto did not take {username}'s password after SIGHUP")
            time.sleep(0.1)

    def stop_broker() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    fleet = ServerThread(
        _fleet_config(
            work,
            bundle_pub,
            BrokerConfig(
                embedded=False,
                url=f"mqtt://127.0.0.1:{service_port}",  # the role's service listener
                device_url=f"mqtt://127.0.0.1:{port}",
                username=FLEET_MQTT_USER,
                password=fleet_password,
            ),
        )
    ).start()
    assert fleet.svc.bridge is not None and fleet.svc.bridge.connected.wait(20), "the fleet did not reach mosquitto"
    return BrokerUnderTest(
        "mosquitto-role", "127.0.0.1", port, mqtt.MQTTv5, fleet, provision_login, log_file, stop_broker, service_port
    )


def _login_works(port: int, username: str, password: str) -> bool:
    from .rawmqtt import RawClient

    try:
        c = RawClient("127.0.0.1", port, 5, timeout=5)
    except OSError:
        return False
    try:
        # A probe client id of its own: with use_username_as_clientid it is the username anyway, and the
        # device is not connected yet while it is being provisioned.
        return c.connect(f"probe-{uuid.uuid4().hex[:6]}", username, password) == 0
    finally:
        c.sock.close()


def start_mosquitto_dynsec(work: Path, bundle_pub: Path) -> BrokerUnderTest:
    """Mosquitto with dynamic security driven by the fleet itself (``broker.accounts: dynsec``: enrolment
    creates the device's login, bound to its client id) and the pattern ACL file, as benchmarks/fleet_scale.py
    configures it (docs/fleet.md, "Mosquitto with dynamic security")."""
    from benchmarks.fleet_scale import FLEET_USER as DYNSEC_FLEET_USER
    from benchmarks.fleet_scale import Broker

    broker = Broker(work / "mosquitto-dynsec").start()
    fleet = ServerThread(
        _fleet_config(
            work,
            bundle_pub,
            BrokerConfig(
                embedded=False,
                url=broker.url,
                username=DYNSEC_FLEET_USER,
                password=broker.fleet_password,
                accounts="dynsec",
            ),
        )
    ).start()
    assert fleet.svc.bridge is not None and fleet.svc.bridge.connected.wait(20), "the fleet did not reach mosquitto"
    return BrokerUnderTest(
        "mosquitto-dynsec",
        "127.0.0.1",
        broker.port,
        mqtt.MQTTv5,
        fleet,
        provision_login=lambda _u, _p: None,  # the fleet created the login at enrolment
        log_file=broker.log,
        stop_broker=broker.stop,
    )


BROKERS: dict[str, Callable[[Path, Path], BrokerUnderTest]] = {
    "embedded": start_embedded,
    "mosquitto-role": start_mosquitto_role,
    "mosquitto-dynsec": start_mosquitto_dynsec,
}


def remove(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
