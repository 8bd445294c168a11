"""A few MQTT 3.1.1 / 5 packets written by hand, for what a well-behaved client library will not do: drop
the TCP connection without a DISCONNECT (so the broker sends the last will), or send a packet far over
the broker's size cap. Everything else in the attack suite uses paho."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, version: int, qos: int = 1) -> bytes:
    props = b"\x00" if version == 5 else b""
    return _packet(0x82, struct.pack("!H", packet_id) + props + _str(topic) + bytes([qos]))


def connect_packet(
    client_id: str, username: str | None, password: str | None, version: int, will: Will | None = None
) -> bytes:
    flags = 0x02  # clean session / clean start
    payload = _str(client_id)
    props = b"\x00" if version == 5 else b""
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += props + _str(will.topic) + _str(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    return _packet(0x10, _str("MQTT") + bytes([version, flags]) + struct.pack("!H", 60) + props + payload)


def publish_packet(topic: str, payload: bytes, version: int, *, qos: int = 0, retain: bool = False) -> bytes:
    body = _str(topic) + (struct.pack("!H", 1) if qos else b"") + (b"\x00" if version == 5 else b"")
    return _packet(0x30 | (qos << 1) | int(retain), body + payload)


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class RawClient:
    """One TCP connection speaking MQTT ``version`` 4 (3.1.1) or 5."""

    def __init__(self, host: str, port: int, version: int, timeout: float = 10.0) -> None:
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""

    def connect(
        self, client_id: str, username: str | None, password: str | None, *, will: Will | None = None
    ) -> int | None:
        """Send CONNECT; the CONNACK's return/reason code (0: accepted), or None if the broker hung up."""
        try:
            self.sock.sendall(connect_packet(client_id, username, password, self.version, will))
            first, data = self.read_packet()
        except (OSError, ConnectionError):
            return None
        if first >> 4 != 2:
            return None
        return data[1]

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        self.sock.sendall(publish_packet(topic, payload, self.version, qos=qos, retain=retain))

    def read_packet(self) -> tuple[int, bytes]:
        first = self._read(1)[0]
        mult, length = 1, 0
        while True:
            b = self._read(1)[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return first, self._read(length)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def is_closed_by_peer(self, wait: float) -> bool:
        """True when the broker closes the connection within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            while True:
                self.read_packet()
        except (ConnectionError, OSError) as exc:
            return not isinstance(exc, TimeoutError)

    def drop(self) -> None:
        """Close the TCP connection without a DISCONNECT: the broker must treat it as lost (last will)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        self.sock.close()
