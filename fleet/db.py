"""Database schema (SQLAlchemy 2) and the engine/session factory. Alembic owns the schema's history.

Every timestamp is stored as UTC. SQLite hands datetimes back naive, so readers go through ``aware``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


TS = DateTime(timezone=True)


class Device(Base):
    __tablename__ = "devices"
    # The devices list pages through (enrolled_at, id) with a keyset cursor.
    __table_args__ = (Index("ix_devices_enrolled_at_id", "enrolled_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hardware_class: Mapped[str | None] = mapped_column(String(64))
    cpu_arch: Mapped[str | None] = mapped_column(String(32))
    ram_bytes: Mapped[int | None] = mapped_column(BigInteger)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    groups: Mapped[list[Any]] = mapped_column(JSON, default=list)
    secret_hash: Mapped[str] = mapped_column(String(128))
    # The board's own ed25519 public key (PEM), registered at enrolment: verifies its offline telemetry.
    public_key: Mapped[str | None] = mapped_column(Text)
    enrolled_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    last_seen: Mapped[dt.datetime | None] = mapped_column(TS)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    status_ts: Mapped[dt.datetime | None] = mapped_column(TS)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    reported: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reported_ts: Mapped[dt.datetime | None] = mapped_column(TS)
    current_name: Mapped[str | None] = mapped_column(String(128))
    current_version: Mapped[int | None] = mapped_column(Integer)
    telemetry: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    telemetry_ts: Mapped[dt.datetime | None] = mapped_column(TS)
    desired: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    desired_at: Mapped[dt.datetime | None] = mapped_column(TS)
    # manifests.BoardCapabilities sent at enrolment; the reported state's copy, when newer, wins
    # (fleet/rollout/variants.py).
    capabilities: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(TS)
    uses_left: Mapped[int] = mapped_column(Integer, default=1)
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    groups: Mapped[list[Any]] = mapped_column(JSON, default=list)
    hardware_class: Mapped[str | None] = mapped_column(String(64))
    used_by: Mapped[list[Any]] = mapped_column(JSON, default=list)


class BundleRecord(Base):
    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_bundles_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    manifest_yaml: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(32))
    total_size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    files: Mapped[list[BundleFileRecord]] = relationship(
        back_populates="bundle", cascade="all, delete-orphan", order_by="BundleFileRecord.path"
    )


class BundleFileRecord(Base):
    __tablename__ = "bundle_files"

    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(64))
    bundle: Mapped[BundleRecord] = relationship(back_populates="files")


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_sha256: Mapped[str] = mapped_column(String(64))
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[int] = mapped_column(Integer)
    # A deployment of a release (manifests/variants.py): each target gets its own variant's bundle;
    # bundle_name/version then name the release's first variant.
    release_name: Mapped[str | None] = mapped_column(String(128))
    release_version: Mapped[int | None] = mapped_column(Integer)
    # a fleet.rollout.DeploymentStatus value; moves only through fleet/rollout/states.py's table
    status: Mapped[str] = mapped_column(String(32), default="in_progress")
    wave: Mapped[int] = mapped_column(Integer, default=0)
    waves: Mapped[int] = mapped_column(Integer, default=1)
    wave_started_at: Mapped[dt.datetime | None] = mapped_column(TS)
    wave_converged_at: Mapped[dt.datetime | None] = mapped_column(TS)
    abort_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(TS)
    targets: Mapped[list[DeploymentTarget]] = relationship(
        back_populates="deployment", cascade="all, delete-orphan", order_by="DeploymentTarget.position"
    )


class DeploymentTarget(Base):
    __tablename__ = "deployment_targets"
    __table_args__ = (UniqueConstraint("deployment_id", "device_id", name="uq_targets_deployment_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    position: Mapped[int] = mapped_column(Integer)
    wave: Mapped[int] = mapped_column(Integer)
    # a fleet.rollout.TargetState value; moves only through fleet/rollout/states.py's table
    state: Mapped[str] = mapped_column(String(32), default="pending")
    command_id: Mapped[str | None] = mapped_column(String(160))
    previous_name: Mapped[str | None] = mapped_column(String(128))
    previous_version: Mapped[int | None] = mapped_column(Integer)
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    assigned_at: Mapped[dt.datetime | None] = mapped_column(TS)
    finished_at: Mapped[dt.datetime | None] = mapped_column(TS)
    error: Mapped[str | None] = mapped_column(Text)
    health: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # A release deployment: the variant resolved for this device and its bundle (None: the deployment's).
    variant: Mapped[str | None] = mapped_column(String(64))
    bundle_name: Mapped[str | None] = mapped_column(String(128))
    bundle_version: Mapped[int | None] = mapped_column(Integer)
    deployment: Mapped[Deployment] = relationship(back_populates="targets")


class ReleaseRecord(Base):
    """A release: several bundles of one model, each with the rules a board must meet (manifests/variants.py).
    Immutable once created: a deployment resolves its devices' variants from it at any later tick."""

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_releases_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class TelemetrySample(Base):
    __tablename__ = "telemetry"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
        # A device's newest samples (health, baselines, charts); the unique key already covers device_id.
        Index("ix_telemetry_device_id_ts", "device_id", "ts"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[dt.datetime] = mapped_column(TS, index=True)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[int | None] = mapped_column(Integer)
    decode_tok_s: Mapped[float | None] = mapped_column(Float)
    ttft_p95_ms: Mapped[float | None] = mapped_column(Float)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class TelemetryRollup(Base):
    """Downsampled telemetry: one row per device, bucket and model version."""

    __tablename__ = "telemetry_rollups"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_start: Mapped[dt.datetime] = mapped_column(TS, primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer, primary_key=True, default=0)
    model_name: Mapped[str | None] = mapped_column(String(128))
    samples: Mapped[int] = mapped_column(Integer)
    decode_tok_s_avg: Mapped[float | None] = mapped_column(Float)
    ttft_p95_ms_max: Mapped[float | None] = mapped_column(Float)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)


class DeviceEvent(Base):
    __tablename__ = "device_events"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_events_device_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[dt.datetime] = mapped_column(TS)
    kind: Mapped[str] = mapped_column(String(32))
    deployment_id: Mapped[str | None] = mapped_column(String(160))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[dt.datetime] = mapped_column(TS, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    deployment: Mapped[str | None] = mapped_column(String(64), index=True)
    device_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class FleetNode(Base):
    """A fleet server sharing this database (fleet/lease.py): the broker sessions it holds, so the
    rollout lease holder can drain them when the server is gone."""

    __tablename__ = "fleet_nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    started_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


def make_engine(url: str, schema: str | None = None) -> Engine:
    kwargs: dict[str, Any] = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif schema:
        kwargs["connect_args"] = {"options": f"-csearch_path={schema}"}
    if not url.startswith("sqlite"):
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL: readers never block the writer; a crash loses nothing committed.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


def run_migrations(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``, the newest by default (run on every service start)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
