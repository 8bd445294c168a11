"""A simulated device that speaks the manifests/mqtt.py contract over a real broker.

It is what a real agent looks like from the fleet's side: it fetches and verifies the signed manifest
over HTTP (with Range for the files), honours anti-rollback unless a signed rollback authorises it,
reports each update's result, and publishes telemetry whose numbers the test chooses per version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
import paho.mqtt.client as mqtt

from manifests import BundleManifest, TrustStore, VerificationError, verify_manifest_bytes
from manifests import mqtt as c


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class Behaviour:
    """What happens when this device installs a given version."""

    fail_versions: set[int] = field(default_factory=set)  # the update fails and the device stays put
    hang_versions: set[int] = field(default_factory=set)  # the device never reports a result
    decode_tok_s: dict[int, float] = field(default_factory=dict)  # per version; default 100
    error_rate: dict[int, float] = field(default_factory=dict)  # per version; default 0
    ttft_p95_ms: dict[int, float] = field(default_factory=dict)  # per version; default 80
    install_s: float = 0.2
    fetch_files: bool = True


class SimDevice:
    def __init__(
        self,
        device_id: str,
        mqtt_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        bundle_trust: TrustStore,
        fleet_trust: TrustStore,
        behaviour: Behaviour | None = None,
        current: tuple[str, int] | None = None,
        telemetry_s: float = 0.3,
    ) -> None:
        self.id = device_id
        self.behaviour = behaviour or Behaviour()
        self.bundle_trust = bundle_trust
        self.fleet_trust = fleet_trust
        self.current = current
        self.highest = current[1] if current else 0
        self.seen: set[str] = set()
        self.topics_seen: list[str] = []
        self.results: list[tuple[str, str]] = []  # (deployment_id, result)
        self.seq = 0
        self.requests = 0  # cumulative since start, like the real agent
        self.errors = 0
        self.telemetry_s = telemetry_s
        self.last_deployment: str | None = None
        self.last_result: str | None = None
        self.last_error: str | None = None
        self.state = "committed" if current else "idle"
        self._lock = threading.Lock()
        self._work: queue.Queue[c.DesiredState | None] = queue.Queue()
        self._stop = threading.Event()
        u = urlparse(mqtt_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 1883
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"nanofleet-agent-{device_id}", clean_session=True
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.will_set(
            c.status_topic(device_id),
            c.Status(device_id=device_id, online=False).to_bytes(),
            qos=1,
            retain=True,
        )
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.connected = threading.Event()
        self._threads = [
            threading.Thread(target=self._worker, daemon=True),
            threading.Thread(target=self._telemetry_loop, daemon=True),
        ]

    # lifecycle
    def start(self) -> SimDevice:
        self.client.connect_async(self.host, self.port, keepalive=5)
        self.client.loop_start()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._work.put(None)
        self.client.disconnect()
        self.client.loop_stop()

    # mqtt
    def _on_subscribe(self, client: mqtt.Client, _u: object, _mid: object, codes: list, _p: object) -> None:
        # A refused SUBSCRIBE (a clustered broker failing over) is asked for again, as the agent does.
        if any(getattr(rc, "is_failure", False) for rc in codes):
            timer = threading.Timer(1.0, lambda: client.subscribe(c.desired_topic(self.id), qos=1))
            timer.daemon = True
            timer.start()

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            return
        client.subscribe(c.desired_topic(self.id), qos=1)
        client.publish(
            c.status_topic(self.id),
            c.Status(device_id=self.id, online=True, ts=now(), agent_version="sim").to_bytes(),
            qos=1,
            retain=True,
        )
        self.connected.set()
        self._report()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.topics_seen.append(msg.topic)
        try:
            self._work.put(c.DesiredState.from_bytes(msg.payload))
        except Exception:  # noqa: BLE001 - a bad payload is ignored, like a real agent would
            pass

    def _report(self) -> None:
        slot = c.SlotInfo(name=self.current[0], version=self.current[1]) if self.current else None
        rep = c.ReportedState(
            device_id=self.id,
            state=self.state,
            deployment_id=self.last_deployment,
            committed=slot,
            last_result=self.last_result,
            error=self.last_error,
            agent_version="sim",
            **self._hardware(),
            ts=now(),
        )
        self.client.publish(c.reported_topic(self.id), rep.to_bytes(), qos=1, retain=True)

    def _hardware(self) -> dict[str, Any]:
        """The board's part of the reported state (a subclass reports capabilities)."""
        return {"hardware_class": "sim", "cpu_arch": "x86_64", "ram_bytes": 2 << 30}

    def _event(self, kind: str, message: str, deployment_id: str | None) -> None:
        with self._lock:
            self.seq += 1
            seq = self.seq
        ev = c.Event(
            device_id=self.id, seq=seq, ts=now(), kind=kind, deployment_id=deployment_id, message=message
        )
        self.client.publish(c.events_topic(self.id), ev.to_bytes(), qos=1)

    # the update "agent"
    def _worker(self) -> None:
        while not self._stop.is_set():
            desired = self._work.get()
            if desired is None:
                return
            if desired.deployment_id in self.seen or desired.bundle is None:
                continue
            self.seen.add(desired.deployment_id)
            self._apply(desired)

    def _apply(self, d: c.DesiredState) -> None:
        b = d.bundle
        assert b is not None
        self.last_deployment, self.state, self.last_result, self.last_error = (
            d.deployment_id,
            "downloading",
            None,
            None,
        )
        self._report()
        try:
            manifest = self._fetch(b)
        except (httpx.HTTPError, VerificationError, ValueError) as exc:
            return self._finish("failed", f"download/verify: {exc}")
        if manifest.version < self.highest:
            if d.rollback is None:
                return self._finish("refused", "anti-rollback: older than the highest committed version")
            try:
                payload = c.RollbackAuthorization.model_validate(d.rollback.verify(self.fleet_trust))
            except (VerificationError, ValueError) as exc:
                return self._finish("refused", f"rollback authorisation invalid: {exc}")
            if payload.version != manifest.version or (
                payload.device_ids and self.id not in payload.device_ids
            ):
                return self._finish("refused", "rollback authorisation does not cover this")
        time.sleep(self.behaviour.install_s)
        if manifest.version in self.behaviour.hang_versions:
            self.state = "installing"
            self._report()
            return None
        if manifest.version in self.behaviour.fail_versions:
            return self._finish("failed", "golden check mismatch (simulated)")
        self.current = (manifest.name, manifest.version)
        self.highest = max(self.highest, manifest.version)
        return self._finish("committed", None)

    def _fetch(self, b: c.BundleRef) -> BundleManifest:
        with httpx.Client(timeout=10) as http:
            body = http.get(f"{b.base_url}/manifest.yaml").raise_for_status().content
            sig = http.get(f"{b.base_url}/manifest.sig").raise_for_status().content
            if b.manifest_sha256 and hashlib.sha256(body).hexdigest() != b.manifest_sha256:
                raise ValueError("manifest sha256 differs from the desired state's")
            manifest = verify_manifest_bytes(body, sig, self.bundle_trust)
            if self.behaviour.fetch_files:
                for f in manifest.files:
                    # Two ranged halves, as a resuming agent would fetch them.
                    half = f.size // 2
                    h = hashlib.sha256()
                    for rng in (f"bytes=0-{max(half - 1, 0)}", f"bytes={half}-"):
                        r = http.get(f"{b.base_url}/{f.path}", headers={"Range": rng})
                        if r.status_code == 416 and f.size == 0:
                            continue
                        r.raise_for_status()
                        if r.status_code != 206:
                            raise ValueError(f"expected 206 for a Range request, got {r.status_code}")
                        h.update(r.content)
                    if f.size and h.hexdigest() != f.sha256:
                        raise ValueError(f"{f.path}: sha256 mismatch after ranged download")
        return manifest

    def _finish(self, result: str, error: str | None) -> None:
        self.state = "committed" if self.current else "idle"
        self.last_result, self.last_error = result, error  # type: ignore[assignment]
        self.results.append((self.last_deployment or "", result))
        self._report()
        self._event("result", f"{result}: {error or ''}", self.last_deployment)

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.telemetry_s):
            if not self.connected.is_set() or self.current is None:
                continue
            with self._lock:
                self.seq += 1
                seq = self.seq
            version = self.current[1]
            tps = self.behaviour.decode_tok_s.get(version, 100.0)
            self.requests += 10
            self.errors += round(10 * self.behaviour.error_rate.get(version, 0.0))
            t = c.Telemetry(
                device_id=self.id,
                seq=seq,
                ts=now(),
                decode_tok_s=tps,
                ttft_p95_ms=self.behaviour.ttft_p95_ms.get(version, 80.0),
                ttft_p50_ms=60.0,
                requests=self.requests,
                errors=self.errors,
                model=c.ModelRef(name=self.current[0], version=version, slot="a"),
                agent_version="sim",
            )
            self.client.publish(c.telemetry_topic(self.id), t.to_bytes(), qos=1)
