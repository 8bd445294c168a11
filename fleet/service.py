"""The fleet service's moving parts wired together: database, blob store, embedded broker, MQTT bridge,
the rollout lease and the worker thread that owns every write.

One worker thread (``fleet/worker.py``) applies MQTT messages, runs the rollout engine and executes every
command (``fleet/commands/``: enrolment, uploads, apply, pause, rollback...), so state is only ever
written from one place in a process. Callers run a command with ``FleetService.execute`` and get its
typed result. Several processes may share one PostgreSQL database (``cluster.shared``): each serves and
ingests, and the one holding the rollout lease (``fleet/lease.py``) ticks the rollout engine.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import paho.mqtt.client as mqtt
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from manifests import KeyFormatError, SigningKey, TrustStore, write_keypair
from manifests.signing import PRIVATE_KEY_NAME

from . import metrics
from .accounts import BrokerAccounts, open_accounts
from .blobs import BlobStore, open_blob_store
from .bridge import RECONNECTED, STATE_TOPICS, TELEMETRY_TOPICS, Inbound, MqttBridge, SessionOptions, drain_session
from .broker import EmbeddedBroker
from .commands.base import CommandContext, CommandResult
from .config import FleetConfig
from .credentials import hash_secret
from .db import BundleRecord, Device, FleetNode, make_engine, run_migrations, session_factory, utcnow
from .errors import ConfigError, FleetError, ServiceUnavailableError
from .ingest import IngestReport, ingest_messages
from .lease import LocalLease, PostgresLease, lock_key
from .retention import compact
from .rollout import RolloutContext, RolloutEngine
from .worker import CommandCall, Worker, WorkQueue

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
SERVICE_USER = "nanofleet-fleet"
COMMAND_TIMEOUT_S = 30.0
DRAIN_EVERY_S = 5.0


class FleetService:
    def __init__(self, config: FleetConfig, *, now: Callable[[], dt.datetime] = utcnow) -> None:
        config.check()
        self.config = config
        self.now = now
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.admin_token = config.ensure_admin_token()
        self.engine = make_engine(config.resolved_database_url(), config.database_schema)
        self._migrate()
        self.sessions = session_factory(self.engine)
        self.blobs: BlobStore = open_blob_store(config)
        self.trust = TrustStore.from_paths(list(config.trusted_keys))
        self.signing_key = self._load_signing_key()
        self.public_url = (config.public_url or f"http://{config.host}:{config.port}").rstrip("/")
        self.artifacts_base_url = (config.artifacts_base_url or f"{self.public_url}/bundles").rstrip("/")
        self._published: set[tuple[str, int]] = set()
        self.rollouts = RolloutEngine(
            RolloutContext(
                signing_key=self.signing_key,
                base_url=self._bundle_url,
                now=self.now,
                rollback_validity_s=config.rollback_validity_s,
            ),
            start_batch=config.start_batch,
            resend_s=config.resend_s,
            health_evidence_s=config.health_evidence_s,
        )
        self.node_id = config.resolved_node_id()
        self.client_id = f"nanofleet-fleet-{self.node_id}"
        self.inbox = WorkQueue(config.ingest.lane_limit)
        metrics.watch_queue(self.inbox)
        self.lease = self._make_lease()
        self.lease.on_acquired = self._became_leader
        self.worker = Worker(
            self.inbox,
            self.sessions,
            ingest=ingest_messages,
            tick=self._tick,
            publish=self._publish,
            tick_s=config.tick_s,
            leader_session=self.lease.leader_session,
            committed=self._committed,
            batch_limit=config.ingest.batch_limit,
        )
        # With dynamic security every connection of this server has a login of its own (fleet/accounts.py).
        self.per_connection_logins = config.broker.accounts == "dynsec"
        self.accounts: BrokerAccounts = open_accounts(
            config, [f"{self.client_id}-dynsec", f"{self.client_id}-state", f"{self.client_id}-telemetry"]
        )
        self.broker: EmbeddedBroker | None = None
        self.bridge: MqttBridge | None = None
        self.mqtt_url: str = ""
        self.ingested = 0  # messages this server applied (two servers with shared subscriptions split them)
        self._service_password = secrets.token_urlsafe(24)
        self._last_compact = 0.0
        self._stop = threading.Event()
        self._drainer: threading.Thread | None = None

    def _migrate(self) -> None:
        """Alembic upgrade; on PostgreSQL under a lock, as several servers may start at once."""
        if self.engine.dialect.name != "postgresql":
            run_migrations(self.engine)
            return
        with self.engine.connect() as conn:
            key = lock_key("migrate", self.config.database_schema or "public")
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                run_migrations(self.engine)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()

    def _make_lease(self) -> LocalLease | PostgresLease:
        if self.engine.dialect.name != "postgresql":
            return LocalLease(self.sessions, self.node_id)
        return PostgresLease(
            self.engine,
            self.node_id,
            schema=self.config.database_schema,
            client_ids=[f"{self.client_id}-state", f"{self.client_id}-telemetry"],
            poll_s=self.config.cluster.lease_poll_s,
        )

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
            urls = [self.broker.url]
            user, password = SERVICE_USER, self._service_password
        else:
            urls = b.all_urls()
            if not urls:
                raise ConfigError("broker.embedded is false but broker.url is not set")
            user, password = b.username, b.password
        self.mqtt_url = b.device_url or urls[0]
        self.bridge = MqttBridge(
            urls,
            self.inbox,
            username=user,
            password=password,
            client_id=self.client_id,
            options=self._session_options(),
            login_per_connection=self.per_connection_logins,
        )
        self.accounts.start()
        self.lease.start()
        self.bridge.start()
        self.worker.start()
        if isinstance(self.lease, PostgresLease) and self.config.cluster.drain_dead_nodes and not b.embedded:
            self._stop.clear()
            self._drainer = threading.Thread(target=self._drain_loop, name="fleet-drain", daemon=True)
            self._drainer.start()
        log.info(
            "fleet service started: node %s, MQTT %s, public URL %s, artifacts %s",
            self.node_id,
            ", ".join(urls),
            self.public_url,
            self.artifacts_base_url,
        )

    def _session_options(self) -> SessionOptions:
        b = self.config.broker
        protocol = b.protocol or ("3.1.1" if b.embedded else "5")
        return SessionOptions(
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
            keepalive=b.keepalive_s,
            # The embedded broker lives and dies with this process: a persistent session there saves nothing.
            persistent=b.persistent_session and not b.embedded,
            session_expiry_s=b.session_expiry_s,
            receive_maximum=b.receive_maximum,
            shared_group=self.config.shared_group(),
        )

    def stop(self) -> None:
        """Finish the batch in hand, then let go: unacknowledged messages stay with the broker."""
        self._stop.set()
        self.worker.stop()
        if self.bridge is not None:
            self.bridge.stop()
        if self._drainer is not None:
            self._drainer.join(10)
        self.lease.stop()
        self.accounts.stop()
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
        errors are raised here; a command the worker could not reach in time is withdrawn and answered
        with ServiceUnavailableError (503), never a bare timeout."""

        def run(session: Session) -> CommandResult[T]:
            return command(CommandContext(session, self.now(), self), *args, **kwargs)

        name = getattr(command, "__name__", "command")
        call = CommandCall(name, run)
        self.inbox.put_command(call)
        try:
            return call.future.result(COMMAND_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            if call.future.cancel():
                raise ServiceUnavailableError(
                    f"the fleet is busy: {name} did not start within {COMMAND_TIMEOUT_S:g}s and was withdrawn "
                    "(nothing changed); retry"
                ) from None
        try:
            return call.future.result(COMMAND_TIMEOUT_S)  # it is running: it finishes or fails on its own
        except concurrent.futures.TimeoutError:
            raise ServiceUnavailableError(
                f"{name} is still running after {2 * COMMAND_TIMEOUT_S:g}s; check its effect before retrying"
            ) from None

    # The worker's hooks --------------------------------------------------------------------------
    def _tick(self, session: Session) -> set[str]:
        metrics.rollout_tick()
        changed = self.rollouts.tick(session)
        if time.monotonic() - self._last_compact >= self.config.telemetry.compact_every_s:
            compact(session, self.config.telemetry, self.now())
            self._last_compact = time.monotonic()
        return changed

    def _committed(self, reports: list[object]) -> None:
        now = utcnow()
        for r in reports:
            if isinstance(r, IngestReport):
                self.ingested += r.accepted
                for sent in r.sent_at:
                    metrics.observe_commit_lag(max(0.0, (now - sent).total_seconds()))

    def _publish(self, session: Session, device_ids: set[str] | None) -> None:
        """Publish desired states (retained) of these devices, or of every device that has one."""
        q = select(Device.id, Device.desired).where(Device.desired.is_not(None))
        if device_ids is not None:
            q = select(Device.id, Device.desired).where(Device.id.in_(device_ids))
        down = 0
        for device_id, desired in session.execute(q):
            if self.bridge is None or desired is None:
                continue
            if not self.bridge.publish_desired(device_id, json.dumps(desired).encode("utf-8")):
                down += 1
        if down:
            log.info("%d desired states not published (broker down); republished on reconnect", down)

    def _became_leader(self) -> None:
        # The previous holder may have committed desired states it died before publishing.
        self.inbox.put_message(Inbound(RECONNECTED, b""))
        threading.Thread(target=self._prune_accounts, name="fleet-prune", daemon=True).start()

    def _prune_accounts(self) -> None:
        """Broker logins of devices the database does not know go (deleted while the broker was away, or
        left by an enrolment whose transaction failed after the broker call)."""

        def known() -> set[str]:
            with self.sessions() as s:
                return set(s.scalars(select(Device.id)))

        try:
            self.accounts.prune(known)
        except Exception:  # noqa: BLE001 - retried at the next lease acquisition
            log.exception("pruning broker logins failed")

    # Artifacts -----------------------------------------------------------------------------------
    def _bundle_url(self, name: str, version: int) -> str:
        """The base URL a desired state names for ``name@version``. With a separate artifacts_base_url
        the bundle is first published where that URL serves from (the blob store's bundles/ tree)."""
        if self.config.artifacts_base_url and (name, version) not in self._published:
            with self.sessions() as s:
                rec = s.scalar(select(BundleRecord).where(BundleRecord.name == name, BundleRecord.version == version))
                if rec is not None:
                    self.blobs.publish(
                        name,
                        version,
                        [(f.path, f.sha256) for f in rec.files],
                        rec.manifest_yaml.encode("utf-8"),
                        rec.signature.encode("utf-8"),
                    )
                    self._published.add((name, version))
        return f"{self.artifacts_base_url}/{name}/{version}"

    # Dead servers' broker sessions ------------------------------------------------------------------
    def _drain_loop(self) -> None:
        while not self._stop.wait(DRAIN_EVERY_S):
            if not self.lease.is_leader() or not isinstance(self.lease, PostgresLease):
                continue
            try:
                for node in self.lease.dead_nodes():
                    self._drain_node(node)
            except Exception:  # noqa: BLE001 - retried on the next round
                log.exception("draining dead fleet servers failed")

    def _drain_node(self, node: FleetNode) -> None:
        assert isinstance(self.lease, PostgresLease)
        b = self.config.broker
        opts = self._session_options()
        try:
            for client_id in node.client_ids or []:
                topics = TELEMETRY_TOPICS if client_id.endswith("-telemetry") else STATE_TOPICS
                user = client_id if self.per_connection_logins else b.username
                n = drain_session(b.all_urls(), client_id, topics, self.inbox, opts, username=user, password=b.password)
                log.info("drained %d messages from broker session %s of dead server %s", n, client_id, node.id)
        except FleetError as exc:
            log.warning("draining server %s failed: %s", node.id, exc.message)
            self.lease.release_node(node)
            return
        self.lease.forget_node(node)
