"""The bridge's manual acknowledgements against a real Mosquitto: a PUBACK goes out only on the connection
that delivered the message. Packet ids are per connection; after a reconnect the broker numbers its
(re)deliveries afresh, so an old id acknowledged on the new connection settles whichever message now has
that id there, one the fleet has not committed (NATS's MQTT numbers a resumed session's deliveries from 1
on the node it moved to: the message is gone for good)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from fleet.bridge import Inbound, MqttConnection, SessionOptions
from manifests import mqtt as contract


class Inbox:
    def __init__(self) -> None:
        self.q: queue.Queue[Inbound] = queue.Queue()

    def put_message(self, msg: Inbound) -> bool:
        self.q.put(msg)
        return True


class HeldCheck(threading.Event):
    """``connected`` of the connection, whose ``is_set`` (the acknowledging thread's "still connected?")
    can be held until the next connection is up: the interleaving of a worker that is preempted inside
    its check while the network thread reconnects (a GIL switch there is enough)."""

    def __init__(self, conn: MqttConnection) -> None:
        super().__init__()
        self.conn = conn
        self.hold_in: threading.Thread | None = None
        self.held = threading.Event()

    def is_set(self) -> bool:
        if threading.current_thread() is self.hold_in:
            self.hold_in = None
            self.held.set()
            deadline = time.monotonic() + 3  # the reconnect takes ~1 s (paho's first retry delay)
            while time.monotonic() < deadline and not (self.conn.epoch > 1 and super().is_set()):
                time.sleep(0.01)
        return super().is_set()


def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_an_ack_started_before_a_reconnect_never_goes_out_on_the_new_connection(mosquitto: Any) -> None:
    inbox = Inbox()
    conn = MqttConnection(
        [("127.0.0.1", mosquitto.port)],
        "ack-test-telemetry",
        (contract.ALL_TELEMETRY,),
        inbox,
        SessionOptions(protocol=mqtt.MQTTv311, keepalive=5),
        username=None,
        password=None,
    )
    conn.connected = held = HeldCheck(conn)
    # Which socket each acknowledgement is queued on (paho sends it on the socket current then).
    sent: list[tuple[int, object]] = []
    real_ack = conn.client.ack

    def ack(mid: int, qos: int) -> mqtt.MQTTErrorCode:
        sent.append((mid, conn.client.socket()))
        return real_ack(mid, qos)

    conn.client.ack = ack  # type: ignore[method-assign]
    delivered_on: dict[bytes, object] = {}
    on_message = conn.client.on_message

    def recording(c: mqtt.Client, ud: object, msg: mqtt.MQTTMessage) -> None:
        delivered_on[bytes(msg.payload)] = c.socket()
        on_message(c, ud, msg)

    conn.client.on_message = recording
    conn.start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ack-test-pub", protocol=mqtt.MQTTv311)
    try:
        assert conn.connected.wait(10)
        time.sleep(0.3)  # the subscription is in place
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        pub.publish(contract.telemetry_topic("dev-1"), b"first", qos=1).wait_for_publish(5)
        first = inbox.q.get(timeout=10)
        assert first.ack is not None
        first_socket = delivered_on[b"first"]

        # The worker settles the message while the connection is lost under it: another client takes the
        # session over for a moment (the broker closes the bridge's connection; the session, with "first"
        # unacknowledged in it, stays), and the bridge reconnects to it about a second later.
        held.hold_in = worker = threading.Thread(target=first.ack)
        worker.start()
        assert held.held.wait(5)
        thief = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="ack-test-telemetry",
            protocol=mqtt.MQTTv311,
            clean_session=False,
            manual_ack=True,  # it acknowledges nothing it is sent
        )
        thief.connect("127.0.0.1", mosquitto.port)
        thief.loop_start()
        assert thief.is_connected() or _wait(thief.is_connected, 5)
        thief.disconnect()
        thief.loop_stop()
        worker.join(10)
        assert not worker.is_alive()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (conn.epoch > 1 and conn.connected.is_set()):
            time.sleep(0.05)
        assert conn.epoch > 1 and conn.connected.is_set(), "the bridge did not reconnect"
        # What was sent for "first" went out on its own connection, or nowhere (paho drops the queue of a
        # connection that is gone): never on the new one.
        live = conn.client.socket()
        assert live is not None and live is not first_socket
        assert all(sock is not live for _mid, sock in sent), sent

        # The message was not settled: the broker delivers it again on the new connection, and that
        # delivery is acknowledged there.
        again = inbox.q.get(timeout=15)
        assert again.payload == b"first"
        assert again.ack is not None
        again.ack()
        assert sent[-1][1] is live
    finally:
        pub.loop_stop()
        pub.disconnect()
        conn.stop()
