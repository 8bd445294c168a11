"""Fixtures of the security part: each broker the fleet supports with a running fleet on it
(tests/security/brokers.py), paho peers that record everything they see, a signed test bundle."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from manifests import SigningKey, write_keypair
from tests.fleet.conftest import make_bundle

from .brokers import BROKERS, BrokerUnderTest, DeviceLogin


@pytest.fixture(scope="session")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Path]:
    key = SigningKey.generate()
    _, pub = write_keypair(tmp_path_factory.mktemp("security-keys"), key)
    return key, pub


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, signing: tuple[SigningKey, Path]) -> Path:
    return make_bundle(tmp_path_factory.mktemp("security-bundle") / "v1", signing[0], 1, name="sec-model")


@pytest.fixture(scope="module", params=sorted(BROKERS))
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, signing
) -> Iterator[BrokerUnderTest]:
    work = tmp_path_factory.mktemp(f"broker-{request.param}")
    b = BROKERS[request.param](work, signing[1])
    try:
        yield b
    finally:
        b.close()


class Peer:
    """A paho client that never reconnects by itself and records its CONNACKs, disconnects and messages."""

    def __init__(
        self,
        broker: BrokerUnderTest,
        username: str | None,
        password: str | None,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=broker.protocol,
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.connacks: list[int] = []
        self.disconnects: list[str] = []
        self.messages: list[mqtt.MQTTMessage] = []
        self.subacks: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.append(rc.value)
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.append(str(rc))
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda _c, _u, mid, rcs, _p: self.subacks.__setitem__(mid, [r.value for r in rcs])
        try:
            self.client.connect(broker.host, broker.port, keepalive=30)
        except OSError:
            self.connacks.append(-1)
            return
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while not self.connacks and not self.disconnects and time.monotonic() < deadline:
            time.sleep(0.02)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    @property
    def accepted(self) -> bool:
        return self.connacks[:1] == [0]

    def subscribe(self, topic: str) -> list[int]:
        """Subscribe and wait for the SUBACK's codes ([] if none came)."""
        _rc, mid = self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + 10
        while mid not in self.subacks and time.monotonic() < deadline and not self.disconnects:
            time.sleep(0.02)
        return self.subacks.get(mid, [])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(5)
        except (RuntimeError, ValueError):
            pass  # not connected any more: what some attacks expect

    def topics(self) -> list[str]:
        with self._lock:
            return [m.topic for m in self.messages]

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [bytes(m.payload) for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def agent(broker: BrokerUnderTest, login: DeviceLogin, peers: list[Peer]) -> Peer:
    """A device connected the way the agent connects: its client id, its own subtree subscribed."""
    p = Peer(broker, login.username, login.password, login.client_id)
    peers.append(p)
    assert p.accepted, f"{login.device_id} could not log in: {p.connacks} {p.disconnects}"
    assert p.subscribe(f"nanofleet/v1/devices/{login.device_id}/#")[0] in (0, 1)
    return p


def marker() -> str:
    return f"forged-{uuid.uuid4().hex[:8]}"
