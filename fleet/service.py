"""The fleet service's moving parts wired together: database, blob store, embedded broker, MQTT bridge
and the worker thread that owns every write.

One worker thread (``fleet/worker.py``) applies MQTT messages, runs the rollout engine and executes every
command (``fleet/commands/``: enrolment, uploads, apply, pause, rollback...), so state is only ever
written from one place. Callers run a command with ``FleetService.execute`` and get its typed result.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from manifests import KeyFormatError, SigningKey, TrustStore, write_keypair
from manifests.signing import PRIVATE_KEY_NAME

from . import metrics
from .blobs import BlobStore
from .bridge import MqttBridge
from .broker import EmbeddedBroker
from .commands.base import CommandContext, CommandResult
from .config import FleetConfig
from .credentials import hash_secret
from .db import Device, make_engine, run_migrations, session_factory, utcnow
from .errors import ConfigError
from .ingest import ingest_messages
from .retention import compact
from .rollout import RolloutContext, RolloutEngine
from .worker import CommandCall, Worker, WorkQueue

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
SERVICE_USER = "nanofleet-fleet"
COMMAND_TIMEOUT_S = 30.0


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
        self.rollouts = RolloutEngine(
            RolloutContext(
                signing_key=self.signing_key,
                base_url=lambda name, version: f"{self.public_url}/bundles/{name}/{version}",
                now=self.now,
                rollback_validity_s=config.rollback_validity_s,
            )
        )
        self.inbox = WorkQueue()
        metrics.watch_queue(self.inbox)
        self.worker = Worker(
            self.inbox,
            self.sessions,
            ingest=ingest_messages,
            tick=self._tick,
            publish=self._publish,
            tick_s=config.tick_s,
        )
        self.broker: EmbeddedBroker | None = None
        self.bridge: MqttBridge | None = None
        self.mqtt_url: str = ""
        self._service_password = secrets.token_urlsafe(24)
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
        self.worker.start()
        log.info("fleet service started: MQTT %s, public URL %s", self.mqtt_url, self.public_url)

    def stop(self) -> None:
        self.worker.stop()
        if self.bridge is not None:
            self.bridge.stop()
        if self.broker is not None:
            self.broker.stop()
        self.engine.dispose()

    # Commands ------------------------------------------------------------------------------------
    def execute(
        self,
        command: Callable[Concatenate[CommandContext, P], CommandResult[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> CommandResult[T]:
        """Run ``command(ctx, *args, **kwargs)`` on the worker thread, in its transaction; returns its
        result once committed (and its changed devices' desired states published). The command's own
        errors are raised here."""

        def run(session: Session) -> CommandResult[T]:
            return command(CommandContext(session, self.now(), self), *args, **kwargs)

        call = CommandCall(getattr(command, "__name__", "command"), run)
        self.inbox.put_command(call)
        return call.future.result(COMMAND_TIMEOUT_S)

    # The worker's hooks --------------------------------------------------------------------------
    def _tick(self, session: Session) -> set[str]:
        metrics.rollout_tick()
        changed = self.rollouts.tick(session)
        if time.monotonic() - self._last_compact >= self.config.telemetry.compact_every_s:
            compact(session, self.config.telemetry, self.now())
            self._last_compact = time.monotonic()
        return changed

    def _publish(self, session: Session, device_ids: set[str] | None) -> None:
        """Publish desired states (retained) of these devices, or of every device that has one."""
        q = select(Device).where(Device.desired.is_not(None))
        if device_ids is not None:
            q = select(Device).where(Device.id.in_(device_ids))
        for d in session.scalars(q).all():
            self._publish_one(d)

    def _publish_one(self, device: Device) -> None:
        if self.bridge is None or device.desired is None:
            return
        if not self.bridge.publish_desired(device.id, json.dumps(device.desired).encode("utf-8")):
            log.info("desired state of %s not published (broker down); republished on reconnect", device.id)
