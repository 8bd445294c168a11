"""A swarm of simulated devices for load tests: thousands of MQTT sessions in one thread.

Each simulated device is its own MQTT session with its own credentials (paho clients driven by one
``selectors`` loop through paho's external-loop callbacks, so 10,000 sessions need no 10,000 threads).
Each one behaves as the agent does towards the fleet (``manifests/mqtt.py``): it publishes ``status``
(retained, with an ``offline`` last will) and ``reported`` (retained) on connect, follows its retained
``desired`` state (reports ``downloading``, fetches and verifies the signed manifest over HTTP if asked
to, waits ``install_s``, then reports ``committed`` and a ``result`` event), and publishes telemetry at
the rate the swarm is given, spread evenly over its connected devices.

It counts what the broker acknowledged: every telemetry ``seq`` whose PUBACK came back is recorded per
device, so a test or benchmark can check that every acknowledged message is in the fleet's database.

It is a load generator: the functional rules of an agent (anti-rollback, ranged downloads, slot A/B) are
``tests/fleet/simdevice.py``'s and the real agent's business.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime as dt
import hashlib
import heapq
import itertools
import json
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
import paho.mqtt.client as mqtt

from manifests import TrustStore, verify_manifest_bytes
from manifests import mqtt as c

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Login:
    device_id: str
    username: str
    password: str


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


@dataclass
class SimState:
    """One simulated device: its MQTT client and what it has done."""

    login: Login
    urls: list[tuple[str, int]]
    client: mqtt.Client
    url_index: int = 0
    connected: bool = False
    seq: int = 0
    sent: int = 0
    acked: list[int] = field(default_factory=list)  # telemetry seqs the broker acknowledged
    pending: dict[int, int] = field(default_factory=dict)  # mid -> telemetry seq
    current: tuple[str, int] | None = None
    deployment: str | None = None
    state: str = "idle"
    last_result: str | None = None
    error: str | None = None
    seen: set[str] = field(default_factory=set)
    committed_at: dict[str, float] = field(default_factory=dict)  # deployment id -> time.time()
    connects: int = 0
    refused: int = 0
    subscribed: bool | None = None  # None: no SUBACK yet on this connection; False: the broker refused it
    refused_subscriptions: int = 0
    write_armed: bool = False  # its socket is in the selector for EVENT_WRITE (the kernel refused a write)


class Swarm:
    """Simulated devices over a real broker (see the module docstring)."""

    def __init__(
        self,
        logins: Sequence[Login],
        broker_urls: Sequence[str] | Callable[[int], Sequence[str]],
        *,
        protocol: int = mqtt.MQTTv311,
        keepalive: int = 60,
        connect_rate: float = 400.0,
        install_s: float = 0.5,
        fetch: str = "none",  # none | manifest (fetch and verify the signed manifest)
        bundle_trust: TrustStore | None = None,
        current: tuple[str, int] | None = None,
        fetch_workers: int = 8,
    ) -> None:
        self.protocol = protocol
        self.keepalive = keepalive
        self.connect_rate = connect_rate
        self.install_s = install_s
        self.fetch = fetch
        self.bundle_trust = bundle_trust
        self.rate = 0.0  # telemetry messages per second, over all connected devices
        self.devices: list[SimState] = []
        for i, login in enumerate(logins):
            urls = broker_urls(i) if callable(broker_urls) else broker_urls
            parsed = [(urlparse(u).hostname or "127.0.0.1", urlparse(u).port or 1883) for u in urls]
            self.devices.append(SimState(login, parsed, self._client(login), current=current))
        self._sel = selectors.DefaultSelector()
        self._to_write: dict[int, SimState] = {}  # clients with packets queued this loop turn
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._tick = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="swarm", daemon=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(fetch_workers, thread_name_prefix="swarm-fetch")
        self._http = httpx.Client(timeout=30)
        self._lock = threading.Lock()

    # public ------------------------------------------------------------------------------------------
    def start(self) -> Swarm:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(30)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def set_rate(self, msgs_per_s: float) -> None:
        self.rate = msgs_per_s

    def connected(self) -> int:
        return sum(d.connected for d in self.devices)

    def wait_connected(self, n: int | None = None, timeout: float = 120.0) -> None:
        want = len(self.devices) if n is None else n
        deadline = time.monotonic() + timeout
        while self.connected() < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.connected()}/{want} simulated devices connected after {timeout:g}s")
            time.sleep(0.2)

    def acked(self) -> dict[str, list[int]]:
        """Telemetry seqs the broker acknowledged, per device."""
        with self._lock:
            return {d.login.device_id: list(d.acked) for d in self.devices}

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {
                "devices": len(self.devices),
                "connected": sum(d.connected for d in self.devices),
                "sent": sum(d.sent for d in self.devices),
                "acked": sum(len(d.acked) for d in self.devices),
                "refused": sum(d.refused for d in self.devices),
            }

    def committed(self, deployment_prefix: str) -> dict[str, float]:
        """device id -> when it committed a command whose id starts with ``deployment_prefix``."""
        out = {}
        for d in self.devices:
            for dep, at in list(d.committed_at.items()):
                if dep.startswith(deployment_prefix):
                    out[d.login.device_id] = at
        return out

    def report_state(self, device_id: str, state: str) -> None:
        """Make one device report ``state`` now (as an agent moving through its update states)."""
        d = next(x for x in self.devices if x.login.device_id == device_id)

        def report() -> None:
            d.state = state
            self._report(d)

        self.call(report)

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the swarm's loop thread (paho clients are not thread-safe)."""
        self._calls.append(fn)
        self._wake()

    # the loop ----------------------------------------------------------------------------------------
    def _client(self, login: Login) -> mqtt.Client:
        cl = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"nanofleet-agent-{login.device_id}",
            protocol=self.protocol,
            **({"clean_session": True} if self.protocol != mqtt.MQTTv5 else {}),  # type: ignore[arg-type]
        )
        cl.username_pw_set(login.username, login.password)
        cl.max_queued_messages_set(0)
        cl.will_set(
            c.status_topic(login.device_id),
            c.Status(device_id=login.device_id, online=False).to_bytes(),
            qos=1,
            retain=True,
        )
        return cl

    def _wire(self, d: SimState) -> None:
        cl = d.client
        cl.on_socket_open = lambda _c, _u, sock: self._opened(sock, d)
        cl.on_socket_close = lambda _c, _u, sock: self._unregister(sock, d)
        # Writes are flushed at the end of each loop turn (``_flush_writes``), not through the selector: on a
        # local socket a write nearly always goes through at once, and arming and disarming EVENT_WRITE for
        # every publish (two epoll_ctl calls and a selector key rebuilt each time) was a fifth of the
        # swarm's CPU at 2,000 msg/s. Only a socket the kernel did not take everything from is armed.
        cl.on_socket_register_write = lambda _c, _u, _sock: self._to_write.setdefault(id(d), d)
        cl.on_socket_unregister_write = lambda _c, _u, sock: self._disarm(sock, d)
        cl.on_connect = lambda _c, _u, _f, rc, _p: self._on_connect(d, rc)
        cl.on_disconnect = lambda _c, _u, _f, rc, _p: self._on_disconnect(d, rc)
        cl.on_message = lambda _c, _u, msg: self._on_message(d, msg)
        cl.on_publish = lambda _c, _u, mid, _rc, _p: self._on_publish(d, mid)
        cl.on_subscribe = lambda _c, _u, _mid, codes, _p: self._on_subscribe(d, codes)

    def _opened(self, sock: Any, d: SimState) -> None:
        d.write_armed = False
        self._sel.register(sock, selectors.EVENT_READ, d)

    def _unregister(self, sock: Any, d: SimState) -> None:
        d.write_armed = False
        self._to_write.pop(id(d), None)
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _disarm(self, sock: Any, d: SimState) -> None:
        if d.write_armed:
            d.write_armed = False
            self._modify(sock, selectors.EVENT_READ, d)

    def _flush_writes(self) -> None:
        """Write what each client queued this turn; arm EVENT_WRITE only where the socket is full."""
        while self._to_write:
            _, d = self._to_write.popitem()
            cl = d.client
            cl.loop_write()
            sock = cl.socket()
            if cl.want_write() and not d.write_armed and sock is not None:
                d.write_armed = True
                self._modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, d)

    def _modify(self, sock: Any, events: int, d: SimState) -> None:
        try:
            self._sel.modify(sock, events, d)
        except (KeyError, ValueError):
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._tick), fn))

    def _connect(self, d: SimState) -> None:
        host, port = d.urls[d.url_index % len(d.urls)]
        d.connects += 1
        try:
            d.client.connect(host, port, keepalive=self.keepalive)
        except OSError:
            d.url_index += 1  # a cluster node is down: the next one
            self._after(1.0, lambda: self._connect(d))

    def _loop(self) -> None:
        for d in self.devices:
            self._wire(d)
        to_connect = collections.deque(self.devices)
        last, credit, misc_at, cursor = time.monotonic(), 0.0, 0.0, 0
        connect_credit = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = 0.02 if (self._timers or to_connect or self.rate) else 0.2
            for key, mask in self._sel.select(timeout):
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                d: SimState = key.data
                if mask & selectors.EVENT_READ:
                    d.client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    d.client.loop_write()
            now = time.monotonic()
            dt_s, last = now - last, now
            while self._calls:
                self._calls.popleft()()
            while self._timers and self._timers[0][0] <= now:
                heapq.heappop(self._timers)[2]()
            connect_credit = min(connect_credit + dt_s * self.connect_rate, self.connect_rate)
            while to_connect and connect_credit >= 1:
                self._connect(to_connect.popleft())
                connect_credit -= 1
            credit = min(credit + dt_s * self.rate, max(self.rate, 1.0))
            n, steps = len(self.devices), 0
            while credit >= 1 and steps < n:  # round robin over the connected devices
                d = self.devices[cursor % n]
                cursor, steps = cursor + 1, steps + 1
                if d.connected:
                    self._telemetry(d)
                    credit -= 1
            if now - misc_at >= 1.0:
                misc_at = now
                for d in self.devices:
                    if d.connected:
                        d.client.loop_misc()  # keepalive pings
            self._flush_writes()
        for d in self.devices:
            if d.connected:
                d.client.disconnect()
                d.client.loop_write()

    # device behaviour --------------------------------------------------------------------------------
    def _on_connect(self, d: SimState, rc: Any) -> None:
        if getattr(rc, "is_failure", False):
            d.refused += 1
            return
        d.connected = True
        dev = d.login.device_id
        d.client.subscribe(c.desired_topic(dev), qos=1)
        status = {
            "schema": "nanofleet.status/1",
            "device_id": dev,
            "online": True,
            "ts": _now_iso(),
            "agent_version": "swarm",
        }
        d.client.publish(c.status_topic(dev), json.dumps(status), qos=1, retain=True)
        self._report(d)

    def _on_subscribe(self, d: SimState, codes: Any) -> None:
        d.subscribed = not any(getattr(rc, "is_failure", False) for rc in codes)
        if not d.subscribed:
            # A clustered broker failing over (NATS: JetStream without a leader yet) refuses the SUBSCRIBE
            # on a connection it accepted: ask again, as the agent does, or the device never hears its
            # desired state (nor any resend of it) while it looks online to the fleet.
            d.refused_subscriptions += 1
            self._after(1.0, lambda: self._resubscribe(d))

    def _resubscribe(self, d: SimState) -> None:
        if d.connected and not d.subscribed:
            d.client.subscribe(c.desired_topic(d.login.device_id), qos=1)

    def _on_disconnect(self, d: SimState, _rc: Any) -> None:
        d.connected, d.subscribed = False, None
        if not self._stop.is_set():
            d.url_index += 1
            self._after(1.0, lambda: self._reconnect(d))

    def _reconnect(self, d: SimState) -> None:
        host, port = d.urls[d.url_index % len(d.urls)]
        try:
            d.connects += 1
            # connect_async re-targets a lost connection (paho's host setter refuses one); then connect now.
            d.client.connect_async(host, port, keepalive=self.keepalive)
            d.client.reconnect()
        except (OSError, RuntimeError):
            d.url_index += 1
            self._after(1.0, lambda: self._reconnect(d))

    def _on_publish(self, d: SimState, mid: int) -> None:
        seq = d.pending.pop(mid, None)
        if seq is not None:
            with self._lock:
                d.acked.append(seq)

    def _telemetry(self, d: SimState) -> None:
        d.seq += 1
        model = {"name": d.current[0], "version": d.current[1], "slot": "a"} if d.current else {}
        doc = {
            "schema": "nanofleet.telemetry/1",
            "device_id": d.login.device_id,
            "seq": d.seq,
            "ts": _now_iso(),
            "decode_tok_s": 100.0,
            "ttft_p50_ms": 60.0,
            "ttft_p95_ms": 80.0,
            "requests": d.seq * 10,
            "errors": 0,
            "model": model,
            "agent_version": "swarm",
        }
        info = d.client.publish(c.telemetry_topic(d.login.device_id), json.dumps(doc), qos=1)
        d.pending[info.mid] = d.seq
        d.sent += 1

    def _report(self, d: SimState) -> None:
        dev = d.login.device_id
        committed = {"name": d.current[0], "version": d.current[1]} if d.current else None
        doc = {
            "schema": "nanofleet.reported/1",
            "device_id": dev,
            "state": d.state,
            "deployment_id": d.deployment,
            "committed": committed,
            "last_result": d.last_result,
            "error": d.error,
            "agent_version": "swarm",
            "hardware_class": "swarm",
            "cpu_arch": "aarch64",
            "ram_bytes": 2 << 30,
            "ts": _now_iso(),
        }
        d.client.publish(c.reported_topic(dev), json.dumps(doc), qos=1, retain=True)

    def _event(self, d: SimState, message: str) -> None:
        d.seq += 1
        doc = {
            "schema": "nanofleet.event/1",
            "device_id": d.login.device_id,
            "seq": d.seq,
            "ts": _now_iso(),
            "kind": "result",
            "deployment_id": d.deployment,
            "message": message,
        }
        d.client.publish(c.events_topic(d.login.device_id), json.dumps(doc), qos=1)

    def _on_message(self, d: SimState, msg: mqtt.MQTTMessage) -> None:
        try:
            desired = json.loads(msg.payload)
            dep, bundle = desired["deployment_id"], desired.get("bundle")
        except (ValueError, KeyError, TypeError):
            return
        if dep in d.seen or not bundle:
            return
        d.seen.add(dep)
        d.deployment, d.state, d.last_result, d.error = dep, "downloading", None, None
        self._report(d)
        if self.fetch == "manifest":
            self._pool.submit(self._fetch_then_install, d, dep, bundle)
        else:
            self._after(self.install_s, lambda: self._commit(d, dep, bundle))

    def _fetch_then_install(self, d: SimState, dep: str, bundle: dict[str, Any]) -> None:
        try:
            base = bundle["base_url"]
            body = self._http.get(f"{base}/manifest.yaml").raise_for_status().content
            sig = self._http.get(f"{base}/manifest.sig").raise_for_status().content
            if bundle.get("manifest_sha256") and hashlib.sha256(body).hexdigest() != bundle["manifest_sha256"]:
                raise ValueError("manifest sha256 differs from the desired state's")
            if self.bundle_trust is not None:
                verify_manifest_bytes(body, sig, self.bundle_trust)
        except Exception as exc:  # noqa: BLE001 - reported as the update's failure, like an agent would
            error = f"download/verify: {exc}"
            self.call(lambda: self._fail(d, dep, error))
            return
        time.sleep(self.install_s)
        self.call(lambda: self._commit(d, dep, bundle))

    def _commit(self, d: SimState, dep: str, bundle: dict[str, Any]) -> None:
        if d.deployment != dep:
            return  # superseded meanwhile
        d.current = (bundle["name"], int(bundle["version"]))
        d.state, d.last_result = "committed", "committed"
        d.committed_at[dep] = time.time()
        self._report(d)
        self._event(d, "committed")

    def _fail(self, d: SimState, dep: str, error: str) -> None:
        if d.deployment != dep:
            return
        d.state = "committed" if d.current else "idle"
        d.last_result, d.error = "failed", error
        self._report(d)
        self._event(d, f"failed: {error}")
