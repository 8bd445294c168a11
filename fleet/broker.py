"""The embedded MQTT broker: amqtt 0.12 in its own thread and event loop, with the fleet's own
authentication (per-device credentials) and topic ACL (a device touches only its own topics).

amqtt loads plugins by dotted path and hands each a dataclass ``Config``; the plugins find the live
fleet-side ``BrokerAuthority`` through a process-wide registry keyed by ``Config.registry_key``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from manifests import mqtt as topics

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


class FleetAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        registry_key: str = field(default="")

    async def authenticate(self, *, session: Session) -> bool | None:
        authority = _REGISTRY.get(self.config.registry_key)
        if authority is None:
            return False
        return authority.authenticate(session.username, session.password)


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
        if not session.username:
            return False
        return device_topic_allowed(session.username, topic, str(action.value if action else ""))


class _FleetBroker(Broker):
    """amqtt's Broker with its retained-message delivery fixed.

    amqtt 0.12.1, on every connect, sends the new client the retained messages matching *every
    client's* subscriptions (``for topic in self._subscriptions``), and never asks the topic ACL. With
    retained desired states that hands each device every other device's commands. Here a retained
    message goes only to a session that holds the matching subscription and may receive the topic.
    """

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
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
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
