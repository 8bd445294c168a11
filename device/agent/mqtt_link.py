"""The MQTT edge (paho-mqtt 2.x, MQTT v5, QoS 1, persistent session, last will on the status topic).

- ``desired`` is subscribed (retained, from the fleet); each message goes to ``on_desired``.
- ``reported`` and ``status`` are retained and always carry the latest value: re-sent on every connect.
- telemetry and events flow from the on-disk ``Outbox``, one at a time, in order; an entry is deleted
  only after its PUBACK, so a broker outage loses nothing.

The agent codes against the small ``Link`` protocol (what it reads and calls), so its unit tests run on a
fake link with no broker (tests/device_agent/fake_link.py); ``MqttLink`` is the real one.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from manifests import mqtt as contract

from .config import MQTTConfig
from .outbox import Outbox

log = logging.getLogger("nanofleet.agent.mqtt")
RECONNECT_MIN_S = 1
RESUBSCRIBE_S = 1.0  # a refused subscription is asked for again after this long


class Link(Protocol):
    """The agent's broker connection: desired states in (``on_desired``), reported state and the outbox out."""

    connected: threading.Event
    last_connect: dt.datetime | None
    last_error: str | None

    def start(self) -> None:
        """Connect in the background (reconnecting for ever) and start draining the outbox."""

    def stop(self, timeout: float = 3.0) -> None:
        """Say offline (retained status), disconnect, stop draining."""

    def publish_reported(self, payload: bytes) -> None:
        """The latest reported state: retained, re-sent on every connect."""


# (config, device_id, agent_version, outbox, on_desired) -> a link; MqttLink itself is one.
LinkFactory = Callable[[MQTTConfig, str, str, Outbox, Callable[[bytes], None]], Link]


class MqttLink:
    def __init__(
        self,
        config: MQTTConfig,
        device_id: str,
        agent_version: str,
        outbox: Outbox,
        on_desired: Callable[[bytes], None],
    ) -> None:
        self.config = config
        self.device_id = device_id
        self.agent_version = agent_version
        self.outbox = outbox
        self.on_desired = on_desired
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._reported: bytes | None = None
        self._reported_lock = threading.Lock()
        self.last_connect: dt.datetime | None = None
        self.last_disconnect: dt.datetime | None = None
        self.last_error: str | None = None
        self.sent = 0
        self._acked: set[int] = set()
        self._failures = 0  # consecutive failed attempts, to say when paho tries next
        self._acked_cond = threading.Condition()

        # MQTT 3.1.1 has no session expiry: a persistent session (clean_session=False) stands in for it.
        v311 = config.protocol == "3.1.1"
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"nanofleet-agent-{device_id}",
            protocol=mqtt.MQTTv311 if v311 else mqtt.MQTTv5,
            **({"clean_session": False} if v311 else {}),
        )
        if config.username:
            c.username_pw_set(config.username, config.resolved_password())
        if config.use_tls:
            tls = config.tls
            c.tls_set(
                ca_certs=str(tls.ca) if tls and tls.ca else None,
                certfile=str(tls.cert) if tls and tls.cert else None,
                keyfile=str(tls.key) if tls and tls.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if tls and tls.insecure:
                c.tls_insecure_set(True)
        offline = contract.Status(device_id=device_id, online=False, agent_version=agent_version)
        c.will_set(contract.status_topic(device_id), offline.to_bytes(), qos=contract.QOS, retain=True)
        c.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=config.reconnect_max_s)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        self.client = c
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-outbox", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.config.protocol == "3.1.1":
            self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        else:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry_s
            self.client.connect_async(
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive_s,
                clean_start=False,
                properties=props,
            )
        self.client.loop_start()
        self._sender.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Graceful stop: say offline (retained), then disconnect."""
        self._stop.set()
        if self.connected.is_set():
            status = contract.Status(
                device_id=self.device_id, online=False, ts=_now(), agent_version=self.agent_version
            )
            info = self.client.publish(
                contract.status_topic(self.device_id), status.to_bytes(), qos=contract.QOS, retain=True
            )
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self._sender.join(timeout)

    # ---- callbacks (paho's network thread) ---------------------------------------------------------
    def next_retry_s(self) -> float:
        """paho's back-off after the n-th failure in a row: min, doubling, capped (reconnect_delay_set)."""
        return float(min(RECONNECT_MIN_S * 2 ** max(self._failures - 1, 0), self.config.reconnect_max_s))

    def _failed(self, reason: str) -> None:
        self._failures += 1
        self.last_error = reason
        log.warning(
            "cannot connect to the broker %s:%s: %s; next try in %.0f s",
            self.config.host,
            self.config.port,
            reason,
            self.next_retry_s(),
        )

    def _on_connect_fail(self, client, userdata) -> None:  # noqa: ANN001
        # paho calls this inside its `except OSError`: the exception says why (refused, no route, DNS...).
        exc = sys.exc_info()[1]
        self._failed(connect_error_text(exc) if exc else "connection failed")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._failed(f"the broker refused the connection: {reason_code}")
            return
        self._failures = 0
        self.last_connect = _now()
        self.last_error = None
        log.info(
            "connected to %s:%s (session present: %s)",
            self.config.host,
            self.config.port,
            flags.session_present,
        )
        client.subscribe(contract.desired_topic(self.device_id), qos=contract.QOS)
        online = contract.Status(
            device_id=self.device_id, online=True, ts=_now(), agent_version=self.agent_version
        )
        client.publish(
            contract.status_topic(self.device_id), online.to_bytes(), qos=contract.QOS, retain=True
        )
        with self._reported_lock:
            if self._reported is not None:
                client.publish(
                    contract.reported_topic(self.device_id), self._reported, qos=contract.QOS, retain=True
                )
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if self.connected.is_set():
            self.last_error = f"disconnected: {reason_code}"
            log.warning("disconnected from the broker: %s; reconnecting", reason_code)
        self.connected.clear()
        self.last_disconnect = _now()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        # A broker can refuse the subscription on a connection it accepted (a clustered broker failing
        # over, an ACL not provisioned yet): the device would stay connected yet deaf to its desired
        # state, and the fleet's resends would never reach it. Ask again until it is granted.
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            self.last_error = f"the broker refused the desired-state subscription: {refused[0]}"
            log.warning("%s; retrying in %gs", self.last_error, RESUBSCRIBE_S)
            timer = threading.Timer(RESUBSCRIBE_S, self._resubscribe, args=(client,))
            timer.daemon = True
            timer.start()

    def _resubscribe(self, client) -> None:  # noqa: ANN001
        if self.connected.is_set():  # else the next on_connect subscribes anyway
            client.subscribe(contract.desired_topic(self.device_id), qos=contract.QOS)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        with self._acked_cond:
            self._acked.add(mid)
            self._acked_cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        if not msg.payload:  # a cleared retained message
            return
        try:
            self.on_desired(msg.payload)
        except Exception:  # a bad message must never kill paho's thread
            log.exception("error handling a desired-state message")

    # ---- publishing --------------------------------------------------------------------------------
    def publish_reported(self, payload: bytes) -> None:
        """Latest reported state: kept and re-sent on every connect; sent now when connected."""
        with self._reported_lock:
            self._reported = payload
            if self.connected.is_set():
                self.client.publish(
                    contract.reported_topic(self.device_id), payload, qos=contract.QOS, retain=True
                )

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            if not self.connected.wait(0.5):
                continue
            entry = self.outbox.peek()
            if entry is None:
                self.outbox.has_entries.wait(0.5)
                continue
            with self._acked_cond:
                self._acked.clear()  # acks of status/reported publishes: not ours
            info = self.client.publish(entry.topic, entry.payload, qos=contract.QOS)
            # paho keeps an unacknowledged QoS 1 message (even one published while disconnected) and
            # re-sends it after a reconnect, so we wait for this one's PUBACK however long the outage
            # lasts, and never publish the entry twice.
            with self._acked_cond:
                while info.mid not in self._acked and not self._stop.is_set():
                    self._acked_cond.wait(0.5)
                acked = info.mid in self._acked
                self._acked.discard(info.mid)
            if acked:
                self.outbox.ack(entry.id)
                self.sent += 1


def connect_error_text(exc: BaseException) -> str:
    """A socket error as a person reads it: 'connection refused', 'name not known: broker.lan'..."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port?)"
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved ({exc.strerror})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "connection timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
