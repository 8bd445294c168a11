"""The MQTT bridge: paho-mqtt connections to the broker, in their own network threads.

Two connections, so the broker keeps two queues for this server and a telemetry backlog never delays a
device's result: ``<client id>-state`` (reported, events, status; it also publishes desired states,
retained) and ``<client id>-telemetry``. For each:

- **Acknowledged only once committed.** paho's manual acknowledgement (``manual_ack=True``): a message
  goes to the worker's queue with an ``ack`` that sends its PUBACK (``client.ack(mid, qos)``), called
  by the worker after the transaction that applied it commits. A crash before that loses nothing: the
  broker redelivers on the next connection of the same session.
- **A persistent session** (a fixed client id from the server's node id, ``clean_session=False`` /
  MQTT 5 ``clean_start=False`` with a session expiry): messages that arrive while this server is
  down or restarting wait in the broker.
- **Back-pressure**: MQTT 5 ``Receive Maximum`` caps the unacknowledged messages the broker sends
  (MQTT 3.1.1 brokers use their own ``max_inflight_messages``); the worker's queue is bounded too, and a
  full lane makes the network thread wait, so the broker holds the backlog instead of this process.
- **Shared subscriptions** (``$share/<group>/...``) when configured: several fleet servers split the
  devices' messages between them, each message to one server.
- **Several broker URLs** (a cluster): each failed connection moves on to the next.

On every (re)connect of the state connection it asks the worker to republish every device's desired
state, so a broker that restarted without persistence still ends up holding the truth.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from manifests import mqtt as contract

from .errors import BrokerError

log = logging.getLogger(__name__)

RECONNECTED = "__reconnected__"
STATE_TOPICS = (contract.ALL_REPORTED, contract.ALL_EVENTS, contract.ALL_STATUS)
TELEMETRY_TOPICS = (contract.ALL_TELEMETRY,)


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    received_at: float = field(default_factory=time.time)  # for the ingest-lag metric and ts clamping
    # Settles the message with the broker (its PUBACK); the worker calls it after the commit.
    ack: Callable[[], None] | None = field(default=None, compare=False, repr=False)


class Inbox(Protocol):
    """Where the bridge hands incoming messages (the worker's ``WorkQueue``)."""

    def put_message(self, msg: Inbound) -> bool: ...


def parse_mqtt_url(url: str) -> tuple[str, int]:
    u = urlparse(url)
    if u.scheme not in ("mqtt", "tcp") or not u.hostname:
        raise BrokerError(f"broker URL must look like mqtt://host:port, got {url!r}")
    return u.hostname, u.port or 1883


@dataclass(frozen=True)
class SessionOptions:
    """How the bridge's connections talk to the broker."""

    protocol: int = mqtt.MQTTv5  # or mqtt.MQTTv311
    keepalive: int = 15
    persistent: bool = True
    session_expiry_s: int = 7 * 24 * 3600  # MQTT 5: how long the broker keeps the session while away
    receive_maximum: int = 2000  # MQTT 5: unacknowledged messages in flight to this connection
    shared_group: str | None = None  # $share/<group>/... subscriptions


class MqttConnection:
    """One paho client with manual acknowledgement, a persistent session and broker failover."""

    def __init__(
        self,
        urls: Sequence[tuple[str, int]],
        client_id: str,
        topics: Sequence[str],
        inbox: Inbox,
        opts: SessionOptions,
        *,
        username: str | None,
        password: str | None,
        on_connected: Callable[[], None] | None = None,
        subscribe: bool = True,
    ) -> None:
        self.urls = list(urls)
        self.subscribe = subscribe
        self.client_id = client_id
        self.topics = [f"$share/{opts.shared_group}/{t}" if opts.shared_group else t for t in topics]
        self.inbox = inbox
        self.opts = opts
        self.on_connected = on_connected
        self.connected = threading.Event()
        self.epoch = 0  # bumped on every connection: a PUBACK belongs to the connection that got the message
        # Held while an acknowledgement checks its connection and queues its PUBACK, and while a connection
        # comes or goes: a worker preempted between the check and the queueing (one GIL switch) would
        # otherwise queue an old packet id on the next connection, where it settles another message.
        self._settling = threading.Lock()
        self.stopping = False
        self._next = 0
        self._failures = 0  # connection attempts failed in a row (for the next-retry delay in the log)
        v5 = opts.protocol == mqtt.MQTTv5
        kwargs = {} if v5 else {"clean_session": not opts.persistent}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=opts.protocol,
            manual_ack=True,
            **kwargs,  # type: ignore[arg-type]
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client.max_queued_messages_set(0)
        # Desired states of a 10,000-device wave go out at once; paho's default of 20 unacknowledged would
        # stall them all behind one slow acknowledgement.
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    @property
    def host(self) -> str:
        return self.urls[self._next][0]

    @property
    def port(self) -> int:
        return self.urls[self._next][1]

    def start(self) -> None:
        self._connect_to(self._next)
        self.client.loop_start()

    def _connect_to(self, index: int) -> None:
        """Point the client at node ``index`` (paho connects, and reconnects, to the last host given)."""
        host, port = self.urls[index]
        self._next = index
        if self.opts.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.opts.session_expiry_s if self.opts.persistent else 0
            props.ReceiveMaximum = self.opts.receive_maximum
            self.client.connect_async(
                host, port, keepalive=self.opts.keepalive, clean_start=not self.opts.persistent, properties=props
            )
        else:
            self.client.connect_async(host, port, keepalive=self.opts.keepalive)

    def stop(self) -> None:
        self.stopping = True
        with self._settling:
            self.connected.clear()
        self.client.disconnect()
        self.client.loop_stop()

    def _rotate(self) -> None:
        # A cluster: the next connection attempt goes to the next node. (paho's host setter refuses a
        # lost connection; connect_async re-targets it, and paho's reconnect loop then goes there.)
        if len(self.urls) < 2 or self.stopping:
            return
        try:
            self._connect_to((self._next + 1) % len(self.urls))
        except (RuntimeError, ValueError) as exc:
            log.warning("MQTT %s: cannot move on to the next broker node: %s", self.client_id, exc)

    def _on_connect(self, client: mqtt.Client, _ud: object, flags: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("MQTT connect of %s to %s:%s refused: %s", self.client_id, self.host, self.port, reason)
            self._rotate()
            return
        self._failures = 0
        # A resumed session keeps its subscriptions; subscribing again would replay every retained message.
        # Except shared ones: Mosquitto 2.0.11 restores a persistent session's plain subscriptions after a
        # broker restart but not its $share/... ones (measured), so a server that trusted session_present
        # would receive nothing. Subscribing to a shared filter again replaces it; the retained state
        # messages Mosquitto then sends again are idempotent at ingest.
        resubscribe = self.opts.shared_group is not None
        if self.subscribe and (resubscribe or not getattr(flags, "session_present", False)):
            for t in self.topics:
                client.subscribe(t, qos=contract.QOS)
        # No message of this connection is handed over before this callback returns (same thread).
        with self._settling:
            self.epoch += 1
            self.connected.set()
        if self.on_connected is not None:
            self.on_connected()
        log.info("MQTT %s connected to %s:%s", self.client_id, self.host, self.port)

    def _on_connect_fail(self, _c: mqtt.Client, _ud: object) -> None:
        # paho calls this inside its `except OSError`: the exception says why; its back-off doubles
        # from 1 s to 5 s (reconnect_delay_set above) until a connection succeeds.
        exc = sys.exc_info()[1]
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc or "failed")
        self._failures += 1
        log.warning(
            "MQTT %s: cannot connect to %s:%s: %s; next try in %d s",
            self.client_id,
            self.host,
            self.port,
            why.lower(),
            min(2 ** (self._failures - 1), 5),
        )
        self._rotate()

    def _on_disconnect(self, _c: mqtt.Client, _ud: object, _flags: object, reason: object, _p: object) -> None:
        # Any PUBACK queued before this is dropped with the old connection's queue (paho clears it before
        # it reconnects); none is queued after it until the next connection's epoch.
        with self._settling:
            self.connected.clear()
        if not self.stopping:
            log.warning("MQTT %s disconnected (%s); reconnecting", self.client_id, reason)
            self._rotate()

    def _on_message(self, _c: mqtt.Client, _ud: object, msg: mqtt.MQTTMessage) -> None:
        ack = functools.partial(self._ack, self.epoch, msg.mid, msg.qos) if msg.qos > 0 else None
        # Waits while the worker's lane is full: this thread stops reading, the broker holds the rest.
        self.inbox.put_message(Inbound(msg.topic, bytes(msg.payload), ack=ack))

    def _ack(self, epoch: int, mid: int, qos: int) -> None:
        # A message from an earlier connection is redelivered on this one (and acknowledged then). The
        # check and the queueing are one step with respect to reconnects (_settling).
        with self._settling:
            if epoch == self.epoch and self.connected.is_set():
                self.client.ack(mid, qos)


class MqttBridge:
    def __init__(
        self,
        url: str | Sequence[str],
        inbox: Inbox,
        *,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 15,
        client_id: str = "nanofleet-fleet",
        options: SessionOptions | None = None,
        login_per_connection: bool = False,
    ) -> None:
        """``login_per_connection``: each connection logs in as its own client id (with ``password``), for
        brokers that name sessions by login (``use_username_as_clientid``, fleet/accounts.py)."""
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise BrokerError("no broker URL")
        self.urls = [parse_mqtt_url(u) for u in urls]
        self.host, self.port = self.urls[0]
        self.inbox = inbox
        self.client_id = client_id
        opts = options or SessionOptions(keepalive=keepalive)
        self.options = opts
        state_id, telemetry_id = f"{client_id}-state", f"{client_id}-telemetry"
        self.state = MqttConnection(
            self.urls,
            state_id,
            STATE_TOPICS,
            inbox,
            opts,
            username=state_id if login_per_connection else username,
            password=password,
            on_connected=lambda: inbox.put_message(Inbound(RECONNECTED, b"")),
        )
        self.telemetry = MqttConnection(
            self.urls,
            telemetry_id,
            TELEMETRY_TOPICS,
            inbox,
            opts,
            username=telemetry_id if login_per_connection else username,
            password=password,
        )

    @property
    def connected(self) -> threading.Event:
        """Set while the state connection (the one desired states go out on) is up."""
        return self.state.connected

    @property
    def client_ids(self) -> list[str]:
        return [self.state.client_id, self.telemetry.client_id]

    def start(self) -> None:
        self.state.start()
        self.telemetry.start()

    def stop(self) -> None:
        self.telemetry.stop()
        self.state.stop()

    def publish_desired(self, device_id: str, payload: bytes) -> bool:
        """Publish retained; False when not connected (the reconnect republishes from the database)."""
        if not self.state.connected.is_set():
            return False
        info = self.state.client.publish(contract.desired_topic(device_id), payload, qos=contract.QOS, retain=True)
        return info.rc == mqtt.MQTT_ERR_SUCCESS


def drain_session(
    urls: Sequence[str],
    client_id: str,
    topics: Sequence[str],
    inbox: Inbox,
    options: SessionOptions,
    *,
    username: str | None,
    password: str | None,
    quiet_s: float = 2.0,
    timeout_s: float = 120.0,
) -> int:
    """Take over the broker session of a fleet server that is gone (its node lease is free), hand what
    it still holds to ``inbox`` (acknowledged once committed, like any message), stop its shared
    subscriptions and end the session, so the broker stops routing a share of the devices' messages
    to a server that will not come back. Returns how many messages it handed over."""
    parsed = [parse_mqtt_url(u) for u in urls]
    handed, settled = [0], [0]
    lock = threading.Lock()

    def acked(ack: Callable[[], None] | None) -> None:
        if ack is not None:
            ack()
        with lock:
            settled[0] += 1

    class Counting:
        def put_message(self, msg: Inbound) -> bool:
            with lock:
                handed[0] += 1
            return inbox.put_message(
                Inbound(msg.topic, msg.payload, msg.received_at, ack=functools.partial(acked, msg.ack))
            )

    # Never subscribes: a resumed session already has the subscriptions, and a fresh one must not join.
    conn = MqttConnection(
        parsed, client_id, topics, Counting(), options, username=username, password=password, subscribe=False
    )
    conn.start()
    try:
        if not conn.connected.wait(20):
            raise BrokerError(f"could not reach the broker to drain session {client_id}")
        deadline = time.monotonic() + timeout_s

        def settle() -> None:
            # Quiet for quiet_s, and everything handed over committed and acknowledged.
            last, since = -1, time.monotonic()
            while time.monotonic() < deadline:
                with lock:
                    now_handed, now_settled = handed[0], settled[0]
                if now_handed != last or now_settled < now_handed:
                    last, since = now_handed, time.monotonic()
                elif time.monotonic() - since >= quiet_s:
                    return
                time.sleep(0.1)
            raise BrokerError(f"draining session {client_id} did not settle within {timeout_s:g}s")

        # Unsubscribe at once: while the session stays in the share group the broker keeps routing it a
        # share of the live flow, and it never falls quiet (a 10,000-device fleet: 120 s, then a timeout).
        # What it already holds stays queued for it and comes in below.
        for t in conn.topics:
            conn.client.unsubscribe(t)
        settle()
    finally:
        conn.stop()
    _end_session(parsed[0], client_id, options, username, password)
    return handed[0]


def _end_session(
    url: tuple[str, int], client_id: str, options: SessionOptions, username: str | None, password: str | None
) -> None:
    """Connect once with a clean session under ``client_id``: the broker drops the old one."""
    done = threading.Event()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=options.protocol,
        **({} if options.protocol == mqtt.MQTTv5 else {"clean_session": True}),  # type: ignore[arg-type]
    )
    if username:
        client.username_pw_set(username, password)
    client.on_connect = lambda *_a: done.set()
    try:
        if options.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0
            client.connect(url[0], url[1], clean_start=True, properties=props)
        else:
            client.connect(url[0], url[1])
        client.loop_start()
        done.wait(10)
        client.disconnect()
        client.loop_stop()
    except OSError as exc:
        log.warning("could not end broker session %s: %s", client_id, exc)
