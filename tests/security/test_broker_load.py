"""The embedded broker under a connect storm: many clients connecting and subscribing while messages are
broadcast. amqtt 0.12.1 iterated its subscription table across awaits and logged
``RuntimeError: dictionary changed size during iteration`` (14 times with 1,000 clients, issue 16), each
time losing that broadcast for every later subscriber."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from fleet.broker import EmbeddedBroker
from manifests import mqtt as c

from .rawmqtt import connect_packet, publish_packet, subscribe_packet

SERVICE = "svc"
CLIENTS = 400


class Authority:
    def authenticate(self, username: str | None, password: str | None) -> bool:
        return bool(username) and password == f"pw-{username}"

    def is_service(self, username: str | None) -> bool:
        return username == SERVICE


async def _client(port: int, name: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(name, name, f"pw-{name}", 4))
    await reader.readexactly(4)  # CONNACK
    writer.write(subscribe_packet(1, f"nanofleet/v1/devices/{name}/desired", 4))
    await reader.readexactly(5)  # SUBACK
    writer.close()
    return 1


async def _storm(port: int, stop: threading.Event) -> int:
    # A publisher the broker broadcasts for all along, with a subscription it matches.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet("fleet", SERVICE, f"pw-{SERVICE}", 4))
    await reader.readexactly(4)
    writer.write(subscribe_packet(1, "nanofleet/v1/devices/+/desired", 4))
    await reader.readexactly(5)

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            writer.write(publish_packet(c.desired_topic(f"d{i % CLIENTS:04d}"), b"{}", 4))
            await writer.drain()
            i += 1
            await asyncio.sleep(0)

    pub = asyncio.ensure_future(publish())
    done = await asyncio.gather(*(_client(port, f"d{i:04d}") for i in range(CLIENTS)), return_exceptions=True)
    stop.set()
    await pub
    writer.close()
    return sum(1 for d in done if d == 1)


@pytest.mark.slow
def test_a_connect_storm_breaks_no_broadcast(caplog: pytest.LogCaptureFixture) -> None:
    broker = EmbeddedBroker("127.0.0.1", 0, Authority())
    broker.start()
    try:
        with caplog.at_level(logging.WARNING):
            ok = asyncio.run(_storm(broker.port, threading.Event()))
            time.sleep(1.0)
    finally:
        broker.stop()
    assert ok == CLIENTS
    errors = [r for r in caplog.records if "changed size during iteration" in (r.getMessage() + str(r.exc_info))]
    assert not errors, errors[0].getMessage()
