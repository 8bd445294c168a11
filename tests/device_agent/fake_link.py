"""A broker connection with no broker, for the agent's unit tests (device.agent.mqtt_link.Link).

The test hands desired-state payloads to the agent with ``deliver``; every reported state the agent
publishes is kept in ``reported``; the outbox is drained into ``sent`` as if the broker acknowledged each
entry (in order, each once), like MqttLink's sender does after a PUBACK.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

from device.agent.config import MQTTConfig
from device.agent.outbox import Outbox


class FakeLink:
    def __init__(
        self,
        config: MQTTConfig,
        device_id: str,
        agent_version: str,
        outbox: Outbox,
        on_desired: Callable[[bytes], None],
    ) -> None:
        self.config, self.device_id, self.agent_version = config, device_id, agent_version
        self.outbox = outbox
        self.on_desired = on_desired
        self.connected = threading.Event()
        self.last_connect: dt.datetime | None = None
        self.last_error: str | None = None
        self.reported: list[bytes] = []
        self.sent: list[tuple[str, bytes]] = []
        self.started = self.stopped = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sender = threading.Thread(target=self._drain, name="fake-link-outbox", daemon=True)

    def start(self) -> None:
        self.started = True
        self.last_connect = dt.datetime.now(dt.timezone.utc)
        self.connected.set()
        self._sender.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self.connected.clear()
        self._sender.join(timeout)
        self.stopped = True

    def publish_reported(self, payload: bytes) -> None:
        with self._lock:
            self.reported.append(payload)

    def deliver(self, payload: bytes) -> None:
        """A desired-state message arrives (what paho's thread does for MqttLink)."""
        self.on_desired(payload)

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.sent]

    def _drain(self) -> None:
        while not self._stop.is_set():
            entry = self.outbox.peek()
            if entry is None:
                self.outbox.has_entries.wait(0.05)
                continue
            with self._lock:
                self.sent.append((entry.topic, entry.payload))
            self.outbox.ack(entry.id)
