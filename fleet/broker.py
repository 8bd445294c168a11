"""The embedded MQTT broker: amqtt 0.12 in its own thread and event loop, with the fleet's own
authentication (per-device credentials) and topic ACL (a device touches only its own topics).

amqtt loads plugins by dotted path and hands each a dataclass ``Config``; the plugins find the live
fleet-side ``BrokerAuthority`` through a process-wide registry keyed by ``Config.registry_key``.

What amqtt 0.12.1 does not do safely on its own, and ``_FleetBroker`` / the plugins fix (each has a case
in tests/security/test_broker_attacks.py, run against Mosquitto as the ansible role configures it too):
- it publishes a client's last will without asking the topic ACL: a device could mark another offline
  or forge its reported state. A CONNECT whose will topic the device may not publish to is refused.
- it looks a client id up (and takes the old session over) before authenticating: anyone knowing a
  device's client id could kick it off with a wrong password. Here the login is checked first, and a
  device's client id is namespaced by its username (``<device id>/<client id>``), so no device can
  take over another's session (its own, yes: one connection replaces its previous one).
- it reads any packet up to MQTT's 256 MB limit into memory: packets over ``max_packet_bytes`` close
  the connection before their body is read.
- it iterates its subscription table while awaiting (``Broker._run_broadcast``): a client subscribing
  meanwhile raised ``RuntimeError: dictionary changed size during iteration`` and lost that broadcast.
- refused logins and ACL denials leave no trace: here each is logged and counted (fleet/metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from manifests import mqtt as topics

from . import metrics
from .errors import BrokerError

log = logging.getLogger(__name__)


class BrokerAuthority(Protocol):
    def authenticate(self, username: str | None, password: str | None) -> bool: ...

    def is_service(self, username: str | None) -> bool: ...


_REGISTRY: dict[str, BrokerAuthority] = {}


def device_topic_allowed(device_id: str, topic: str, action: str) -> bool:
    """A device publishes its reported/telemetry/events/status and reads only its own topics."""
    prefix = f"{topics.PREFIX}/devices/{device_id}/"
    if not topic.startswith(prefix):
        return False
    leaf = topic[len(prefix) :]
    if action == "publish":
        return leaf in ("reported", "telemetry", "events", "status")
    return "/" not in leaf or leaf == "#"


# Large enough for any desired state the fleet publishes (a signed rollback included) and far below what
# would hurt: the per-kind payload caps at ingest (fleet/validation.py) are lower still.
MAX_PACKET_BYTES = 256 * 1024


def _peer(session: Session) -> str:
    return f"{session.remote_address}:{session.remote_port}"


class FleetAuthPlugin(BaseAuthPlugin):
    """Per-device credentials; a device's last will only on a topic it may publish to; a device's client id
    namespaced by its username so it cannot collide with another device's."""

    @dataclass
    class Config:
        registry_key: str = field(default="")

    async def authenticate(self, *, session: Session) -> bool | None:
        authority = _REGISTRY.get(self.config.registry_key)
        user = session.username
        if authority is None:
            return self._refuse(session, "no_authority", "the fleet service is not running")
        if not user or not session.password:
            return self._refuse(session, "no_credentials", "no username or password")
        if not authority.authenticate(user, session.password):
            return self._refuse(session, "bad_credentials", f"wrong password or unknown user {user[:64]!r}")
        if authority.is_service(user):
            return True
        if session.will_flag and not device_topic_allowed(user, session.will_topic or "", "publish"):
            return self._refuse(session, "will_denied", f"{user} asked for a last will on {session.will_topic!r}")
        # Like mosquitto's use_username_as_clientid, but a device may still hold several connections.
        session.client_id = f"{user}/{session.client_id or gen_client_id()}"
        return True

    @staticmethod
    def _refuse(session: Session, reason: str, detail: str) -> bool:
        metrics.login_refused(reason)
        log.warning(
            "MQTT login refused (%s) from %s, client id %r: %s",
            reason,
            _peer(session),
            (session.client_id or "")[:80],
            detail,
        )
        return False


class FleetTopicPlugin(BaseTopicPlugin):
    @dataclass
    class Config:
        registry_key: str = field(default="")

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        authority = _REGISTRY.get(self.config.registry_key)
        if authority is None or session is None or topic is None:
            return False
        if authority.is_service(session.username):
            return True
        what = str(action.value if action else "")
        if session.username and device_topic_allowed(session.username, topic, what):
            return True
        if what != Action.RECEIVE.value:  # a receive check is the broker filtering a broadcast, not a request
            metrics.acl_denied(what)
            log.warning(
                "MQTT %s of %r denied to %r (client %r)",
                what,
                topic[:200],
                session.username,
                (session.client_id or "")[:80],
            )
        return False


class _SnapshotDict(dict):  # type: ignore[type-arg]
    """amqtt's subscription table. Broker code iterates it across ``await``s (``_run_broadcast`` awaits the
    topic filter for each subscriber), so iteration goes over a snapshot: a client subscribing meanwhile
    no longer breaks the loop with "dictionary changed size during iteration"."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(super().keys()))

    def items(self):  # type: ignore[no-untyped-def]
        return [(k, list(v)) for k, v in super().items()]


class _CappedReader(ReaderAdapter):
    """Follows MQTT's framing on the bytes read and fails the read of any packet whose remaining length is
    over ``cap`` before its body is read (amqtt would read it whole into memory)."""

    def __init__(self, inner: ReaderAdapter, cap: int, peer: str) -> None:
        self._inner, self._cap, self._peer = inner, cap, peer
        self._body_left = 0  # bytes of the current packet's body not read yet
        self._header: list[int] | None = None  # the fixed header read so far (None: in a body)

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        self._follow(data)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def _follow(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - i)
                self._body_left -= step
                i += step
                continue
            header = self._header if self._header is not None else []
            header.append(data[i])
            i += 1
            if len(header) >= 2 and not header[-1] & 0x80:  # the last byte of the remaining length
                length = sum((b & 0x7F) << (7 * k) for k, b in enumerate(header[1:]))
                self._header = None
                if length > self._cap:
                    metrics.message_dropped("packet_too_large")
                    log.warning(
                        "MQTT packet of %d bytes from %s is over the %d-byte cap; closing the connection",
                        length,
                        self._peer,
                        self._cap,
                    )
                    raise asyncio.IncompleteReadError(b"", length)  # amqtt reads it as a dropped connection
                self._body_left = length
            else:
                self._header = header


class _FleetBroker(Broker):
    """amqtt's Broker with its retained-message delivery, its login order and its subscription iteration
    fixed, and a packet size cap.

    amqtt 0.12.1, on every connect, sends the new client the retained messages matching *every
    client's* subscriptions (``for topic in self._subscriptions``), and never asks the topic ACL. With
    retained desired states that hands each device every other device's commands. Here a retained
    message goes only to a session that holds the matching subscription and may receive the topic.
    """

    def __init__(self, *args: Any, max_packet_bytes: int = MAX_PACKET_BYTES, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SnapshotDict()
        self._max_packet_bytes = max_packet_bytes

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        peer = writer.get_peer_info()
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        await super()._client_connected(listener_name, _CappedReader(reader, self._max_packet_bytes, where), writer)

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's, with the login checked *before* the client id is looked up: amqtt deleted (clean session)
        or reused (persistent session) the session of that client id first and took it over even when
        the login then failed, so a wrong password with a device's client id kicked the device off."""
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, MQTTError, NoDataError) as exc:
            log.warning("MQTT connection from %s:%s refused before CONNECT: %s", remote_address, remote_port, exc)
            raise AMQTTError(exc) from exc
        if not await super()._authenticate(session, None):  # type: ignore[arg-type]
            handler.attach(session, reader, writer)
            try:
                await handler.mqtt_connack_authorize(False)
                await writer.close()
            except (OSError, MQTTError):
                pass  # the client is gone already (it dropped the socket): nothing to tell it
            raise AMQTTError("login refused")
        if not session.client_id:
            session.client_id = gen_client_id()
        if session.clean_session:
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            # A persistent session of this (namespaced, so the same user's) client id: resume it.
            existing, _ = self._sessions[session.client_id]
            for attr in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(existing, attr, getattr(session, attr))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        session._nanofleet_authenticated = True  # type: ignore[attr-defined]
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _authenticate(self, session: Session, _listener: ListenerConfig) -> bool:
        # Checked already in _initialize_client_session (a refused login never gets this far).
        return bool(getattr(session, "_nanofleet_authenticated", False))

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)
                )
            )
        if tasks:
            await asyncio.wait(tasks)


def pick_port(host: str, wanted: int) -> int:
    """``wanted`` if given; else 1883 when free, else any free port."""
    candidates = [wanted] if wanted else [1883, 0]
    for port in candidates:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                if wanted:
                    raise BrokerError(f"MQTT port {host}:{port} is taken") from None
                continue
            return s.getsockname()[1]
    raise BrokerError("no free port for the embedded MQTT broker")


class EmbeddedBroker:
    """amqtt running in a daemon thread. ``start()`` returns once it accepts connections."""

    def __init__(self, host: str, port: int, authority: BrokerAuthority | None) -> None:
        self.host = host
        self.port = pick_port(host, port)
        self._authority = authority
        self._key = uuid.uuid4().hex
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict:
        plugins: dict[str, dict] = {}
        if self._authority is None:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        else:
            plugins["fleet.broker.FleetAuthPlugin"] = {"registry_key": self._key}
            plugins["fleet.broker.FleetTopicPlugin"] = {"registry_key": self._key}
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": plugins,
        }

    def start(self, timeout: float = 15.0) -> None:
        if self._authority is not None:
            _REGISTRY[self._key] = self._authority
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="fleet-mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerError(f"embedded MQTT broker did not start within {timeout}s")
        if self._error is not None:
            raise BrokerError(f"embedded MQTT broker failed to start: {self._error}") from self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def _start() -> None:
            self._broker = _FleetBroker(self._config(), loop=loop)
            await self._broker.start()

        try:
            loop.run_until_complete(_start())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            # amqtt leaves per-connection tasks behind on shutdown: cancel them so none leaks.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            fut.result(timeout)
        except Exception as exc:  # noqa: BLE001 - shutting down regardless
            log.warning("embedded broker shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        _REGISTRY.pop(self._key, None)
        self._broker = None
        self._loop = None
