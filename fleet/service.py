"""The fleet service's moving parts wired together: database, blob store, embedded broker, MQTT bridge
and the worker thread that owns every rollout decision.

One worker thread applies MQTT messages, runs the rollout engine and executes the REST API's rollout
commands (apply, pause, rollback...), so rollout state is only ever written from one place.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import hmac
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from manifests import KeyFormatError, SigningKey, TrustStore, write_keypair
from manifests.signing import PRIVATE_KEY_NAME

from .blobs import BlobStore
from .bridge import RECONNECTED, Inbound, MqttBridge
from .broker import EmbeddedBroker
from .config import FleetConfig
from .db import Device, make_engine, run_migrations, session_factory, utcnow
from .errors import ConfigError
from .ingest import handle_message
from .retention import compact
from .rollout import RolloutContext, RolloutEngine

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_USER = "nanofleet-fleet"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class _Call:
    def __init__(self, fn: Callable[[Session], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


def _describe(item: Inbound | _Call) -> str:
    return f"MQTT message on {item.topic}" if isinstance(item, Inbound) else "API command"


class FleetService:
    def __init__(self, config: FleetConfig, *, now: Callable[[], dt.datetime] = utcnow) -> None:
        self.config = config
        self.now = now
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.admin_token = config.ensure_admin_token()
        self.engine = make_engine(config.resolved_database_url(), config.database_schema)
        run_migrations(self.engine)
        self.sessions = session_factory(self.engine)
        self.blobs = BlobStore(config.data_dir / "blobs")
        self.trust = TrustStore.from_paths(list(config.trusted_keys))
        self.signing_key = self._load_signing_key()
        self.public_url = (config.public_url or f"http://{config.host}:{config.port}").rstrip("/")
        self.inbox: queue.Queue[Inbound | _Call] = queue.Queue()
        self.rollouts = RolloutEngine(
            RolloutContext(
                signing_key=self.signing_key,
                base_url=lambda name, version: f"{self.public_url}/bundles/{name}/{version}",
                now=self.now,
                rollback_validity_s=config.rollback_validity_s,
            )
        )
        self.broker: EmbeddedBroker | None = None
        self.bridge: MqttBridge | None = None
        self.mqtt_url: str = ""
        self._service_password = secrets.token_urlsafe(24)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._last_compact = 0.0

    def _load_signing_key(self) -> SigningKey:
        path = self.config.signing_key or self.config.data_dir / "keys" / PRIVATE_KEY_NAME
        if not path.exists():
            if self.config.signing_key is not None:
                raise ConfigError(f"signing_key {path} does not exist")
            write_keypair(path.parent)
        try:
            return SigningKey.load(path)
        except KeyFormatError as exc:
            raise ConfigError(exc.message) from exc

    # Broker authority (called from the embedded broker's thread) ---------------------------------
    def authenticate(self, username: str | None, password: str | None) -> bool:
        if not username or not password:
            return False
        if username == SERVICE_USER:
            return hmac.compare_digest(password, self._service_password)
        with self.sessions() as s:
            dev = s.get(Device, username)
            return dev is not None and hmac.compare_digest(dev.secret_hash, hash_secret(password))

    def is_service(self, username: str | None) -> bool:
        return username == SERVICE_USER

    # Lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        b = self.config.broker
        if b.embedded:
            self.broker = EmbeddedBroker(b.host, b.port, self if b.require_auth else None)
            self.broker.start()
            self.mqtt_url = self.broker.url
            user, password = SERVICE_USER, self._service_password
        else:
            if not b.url:
                raise ConfigError("broker.embedded is false but broker.url is not set")
            self.mqtt_url = b.url
            user, password = b.username, b.password
        self.bridge = MqttBridge(
            self.mqtt_url, self.inbox, username=user, password=password, keepalive=b.keepalive_s
        )
        self.bridge.start()
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="fleet-worker", daemon=True)
        self._worker.start()
        log.info("fleet service started: MQTT %s, public URL %s", self.mqtt_url, self.public_url)

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(10)
        if self.bridge is not None:
            self.bridge.stop()
        if self.broker is not None:
            self.broker.stop()
        self.engine.dispose()

    # The worker ----------------------------------------------------------------------------------
    def call(self, fn: Callable[[Session], T], timeout: float = 30.0) -> T:
        """Run ``fn(session)`` on the worker thread, in its transaction; returns its result.

        ``fn`` returns plain data (the session closes after), and adds the ids of devices whose desired
        state it changed to ``session.info["changed_devices"]`` so they are published after the commit.
        """
        c = _Call(fn)
        self.inbox.put(c)
        return c.future.result(timeout)

    def _work(self) -> None:
        last_tick = 0.0
        while not self._stop.is_set():
            try:
                first = self.inbox.get(timeout=self.config.tick_s)
            except queue.Empty:
                first = None
            batch = [first] if first is not None else []
            while len(batch) < 500:
                try:
                    batch.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            # The rollout engine runs at most every tick_s however busy MQTT is (API commands tick
            # on their own).
            tick = time.monotonic() - last_tick >= self.config.tick_s
            if not batch and not tick:
                continue
            try:
                self._process(batch, tick=tick)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("fleet worker batch failed; retrying its items one by one")
                # One poison message must not take the rest of its batch down with it.
                for item in batch:
                    try:
                        self._process([item], tick=False)
                    except Exception as exc:  # noqa: BLE001
                        log.error("dropped %s after an error: %s", _describe(item), exc)
                        if isinstance(item, _Call) and not item.future.done():
                            item.future.set_exception(exc)
                time.sleep(0.2)
            if tick:
                last_tick = time.monotonic()

    def _process(self, batch: list[Inbound | _Call], *, tick: bool) -> None:
        changed: set[str] = set()
        republish = False
        calls: list[tuple[_Call, Any, BaseException | None]] = []
        with self.sessions() as session:
            for item in batch:
                if isinstance(item, _Call):
                    # Each API command in its own savepoint: one failing command rolls back only itself.
                    try:
                        with session.begin_nested():
                            result = item.fn(session)
                        changed |= session.info.pop("changed_devices", set())
                        calls.append((item, result, None))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        session.info.pop("changed_devices", None)
                        calls.append((item, None, exc))
                elif item.topic == RECONNECTED:
                    republish = True
                else:
                    handle_message(session, item.topic, item.payload)
            if tick:
                changed |= self.rollouts.tick(session)
                if time.monotonic() - self._last_compact >= self.config.telemetry.compact_every_s:
                    compact(session, self.config.telemetry, self.now())
                    self._last_compact = time.monotonic()
            session.commit()
            # Publish only after the commit: the database is the truth the broker is made to match.
            if republish:
                devices = session.scalars(select(Device).where(Device.desired.is_not(None))).all()
                for d in devices:
                    self._publish(d)
            elif changed:
                for d in session.scalars(select(Device).where(Device.id.in_(changed))).all():
                    self._publish(d)
        for c, result, exc in calls:
            if exc is not None:
                c.future.set_exception(exc)
            else:
                c.future.set_result(result)

    def _publish(self, device: Device) -> None:
        if self.bridge is None or device.desired is None:
            return
        if not self.bridge.publish_desired(device.id, json.dumps(device.desired).encode("utf-8")):
            log.info("desired state of %s not published (broker down); republished on reconnect", device.id)
