"""The MQTT bridge: paho-mqtt in its own network thread. Incoming messages go to a queue the fleet's
worker drains; desired state goes out retained. On every (re)connect it subscribes again and asks the
worker to republish every device's desired state, so a broker that restarted without persistence
still ends up holding the truth.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from manifests import mqtt as contract

from .errors import BrokerError

log = logging.getLogger(__name__)

RECONNECTED = "__reconnected__"


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    received_at: float = field(default_factory=time.time)  # for the ingest-lag metric and ts clamping


class Inbox(Protocol):
    """Where the bridge hands incoming messages (the worker's ``WorkQueue``)."""

    def put_message(self, msg: Inbound) -> None: ...


def parse_mqtt_url(url: str) -> tuple[str, int]:
    u = urlparse(url)
    if u.scheme not in ("mqtt", "tcp") or not u.hostname:
        raise BrokerError(f"broker URL must look like mqtt://host:port, got {url!r}")
    return u.hostname, u.port or 1883


class MqttBridge:
    def __init__(
        self,
        url: str,
        inbox: Inbox,
        *,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 15,
    ) -> None:
        self.host, self.port = parse_mqtt_url(url)
        self.inbox = inbox
        self.connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"nanofleet-fleet-{uuid.uuid4().hex[:8]}",
            clean_session=True,
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._keepalive = keepalive
        self._stopping = False

    def start(self) -> None:
        # connect_async + loop_start: paho keeps reconnecting in the background if the broker is down.
        self.client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, _ud: object, _flags: object, reason: object, _p: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("MQTT connect to %s:%s refused: %s", self.host, self.port, reason)
            return
        for t in (contract.ALL_REPORTED, contract.ALL_TELEMETRY, contract.ALL_EVENTS, contract.ALL_STATUS):
            client.subscribe(t, qos=contract.QOS)
        self.connected.set()
        self.inbox.put_message(Inbound(RECONNECTED, b""))
        log.info("MQTT bridge connected to %s:%s", self.host, self.port)

    def _on_disconnect(
        self, _c: mqtt.Client, _ud: object, _flags: object, reason: object, _p: object
    ) -> None:
        self.connected.clear()
        if not self._stopping:
            log.warning("MQTT bridge disconnected (%s); reconnecting", reason)

    def _on_message(self, _c: mqtt.Client, _ud: object, msg: mqtt.MQTTMessage) -> None:
        self.inbox.put_message(Inbound(msg.topic, bytes(msg.payload)))

    def publish_desired(self, device_id: str, payload: bytes) -> bool:
        """Publish retained; False when not connected (the reconnect republishes from the database)."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(contract.desired_topic(device_id), payload, qos=contract.QOS, retain=True)
        return info.rc == mqtt.MQTT_ERR_SUCCESS
