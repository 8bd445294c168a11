"""The fleet service's configuration: one YAML file, every field with a default that works on a laptop."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manifests.bundle import format_validation_error

from .errors import ConfigError

ADMIN_TOKEN_ENV = "NANOFLEET_FLEET_ADMIN_TOKEN"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DynsecConfig(_Strict):
    """Mosquitto's dynamic-security plugin, driven by the fleet over ``$CONTROL/dynamic-security/v1``."""

    username: str | None = Field(None, description="a dynsec admin; default: broker.username")
    password: str | None = None
    role: str = Field("nanofleet-device", description="the role every device gets (created if missing)")


class BrokerConfig(_Strict):
    """``embedded: true`` starts amqtt in-process; otherwise ``url`` (or ``urls``) names an external broker."""

    embedded: bool = True
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0: a free port (1883 when it is free)")
    url: str | None = Field(None, description="mqtt://host:port of an external broker (embedded: false)")
    urls: list[str] = Field(
        default_factory=list, description="more nodes of a clustered broker: tried in turn when one fails"
    )
    device_url: str | None = Field(None, description="the broker URL devices are given; default: url")
    # Devices log in with their per-device credentials; the fleet with its own service account.
    require_auth: bool = True
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 15
    protocol: Literal["5", "3.1.1"] | None = Field(
        None, description="the bridge's MQTT version; default 3.1.1 embedded (amqtt), 5 external"
    )
    persistent_session: bool = Field(
        True, description="the broker keeps unacknowledged and new messages while this server is away"
    )
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, le=2**32 - 1)
    receive_maximum: int = Field(
        2000, ge=1, le=65535, description="MQTT 5: unacknowledged messages in flight per connection"
    )
    shared_group: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description="ingest through $share/<group>/... subscriptions"
    )
    accounts: Literal["none", "dynsec"] = Field(
        "none", description="dynsec: the fleet creates and deletes device logins in Mosquitto's dynamic security"
    )
    dynsec: DynsecConfig = Field(default_factory=DynsecConfig)

    def all_urls(self) -> list[str]:
        return [u for u in [self.url, *self.urls] if u]


class ClusterConfig(_Strict):
    """Several ``fleet serve`` on one PostgreSQL: one holds the rollout lease, all serve and ingest."""

    shared: bool = Field(
        False,
        description="this server is one of several: needs PostgreSQL, a shared blob store, the admin token "
        "and signing key from configuration; ingest uses shared subscriptions",
    )
    node_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,48}$", description="stable across restarts; default from host and data_dir"
    )
    lease_poll_s: float = Field(1.0, gt=0, description="how often a server without the lease tries to take it")
    drain_dead_nodes: bool = Field(True, description="the lease holder empties the broker sessions of dead servers")


class S3Config(_Strict):
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = Field(None, description="an S3-compatible endpoint (MinIO, Ceph, moto...)")
    region: str | None = None
    access_key_id: str | None = Field(None, description="default: the usual AWS environment and files")
    secret_access_key: str | None = None
    public_read: bool = Field(
        False,
        description="published bundles get the public-read ACL (else a bucket policy or a CDN makes bundles/ public)",
    )


class BlobsConfig(_Strict):
    path: Path | None = Field(
        None, description="a directory (a shared mount for several servers); default data_dir/blobs"
    )
    s3: S3Config | None = Field(None, description="an S3-compatible bucket instead of a directory")


class IngestConfig(_Strict):
    batch_limit: int = Field(1000, ge=1, le=100_000, description="messages per transaction at most")
    lane_limit: int = Field(20_000, ge=100, description="queued messages per lane before the broker holds the rest")


class TelemetryConfig(_Strict):
    raw_retention_s: float = Field(24 * 3600, gt=0, description="raw samples older than this are downsampled")
    rollup_bucket_s: int = Field(300, gt=0)
    rollup_retention_s: float = Field(30 * 24 * 3600, gt=0)
    compact_every_s: float = Field(60, gt=0)


class FleetConfig(_Strict):
    data_dir: Path = Path(".nanofleet-fleet")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in data_dir")
    database_schema: str | None = Field(None, description="PostgreSQL schema (search_path) to use")
    host: str = "127.0.0.1"
    port: int = Field(8600, ge=0, le=65535)
    public_url: str | None = Field(None, description="base URL devices use to reach this service")
    artifacts_base_url: str | None = Field(
        None, description="where devices fetch bundles (a CDN, object store or nginx); default public_url/bundles"
    )
    admin_token: str | None = Field(None, description="default: generated into data_dir/admin.token")
    admin_token_file: Path | None = Field(None, description="a file holding the admin token (shared by servers)")
    trusted_keys: list[Path] = Field(default_factory=list, description="public keys that sign bundles")
    signing_key: Path | None = Field(None, description="signs rollbacks; default data_dir/keys/nanofleet.key")
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    blobs: BlobsConfig = Field(default_factory=BlobsConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    start_batch: int = Field(1000, ge=1, description="devices a rollout tick starts at most (bounded steps)")
    resend_s: float = Field(
        15.0, gt=0, description="an online device that has not started its command gets its desired state again"
    )
    health_evidence_s: float = Field(
        120.0,
        gt=0,
        description="with a health abort rule, how long a converged wave waits for a sample from each of its "
        "devices on the new model before it moves on without one (audited as health_unjudged)",
    )
    tick_s: float = Field(0.5, gt=0, description="how often the rollout engine re-evaluates")
    rollback_validity_s: float = Field(7 * 24 * 3600, gt=0)

    @classmethod
    def load(cls, path: str | Path) -> FleetConfig:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {p}") from exc
        except yaml.YAMLError as exc:
            # PyYAML names a parsed string "<unicode string>": name the file, on one line.
            where = " ".join(str(exc).replace('"<unicode string>"', f'"{p}"').split())
            raise ConfigError(f"{p} is not valid YAML: {where}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a YAML mapping")
        try:
            cfg = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"fleet config {p}")) from exc
        # Relative paths in the file are relative to the file.
        base = p.resolve().parent
        cfg.data_dir = cfg.data_dir if cfg.data_dir.is_absolute() else base / cfg.data_dir
        cfg.trusted_keys = [k if k.is_absolute() else base / k for k in cfg.trusted_keys]
        if cfg.signing_key is not None and not cfg.signing_key.is_absolute():
            cfg.signing_key = base / cfg.signing_key
        if cfg.admin_token_file is not None and not cfg.admin_token_file.is_absolute():
            cfg.admin_token_file = base / cfg.admin_token_file
        if cfg.blobs.path is not None and not cfg.blobs.path.is_absolute():
            cfg.blobs.path = base / cfg.blobs.path
        return cfg

    def check(self) -> None:
        """What a server that shares its database with others needs (one line per problem)."""
        if not self.cluster.shared:
            return
        problems = []
        if self.resolved_database_url().startswith("sqlite"):
            problems.append("database_url must be PostgreSQL")
        if not (self.admin_token or self.admin_token_file or os.environ.get(ADMIN_TOKEN_ENV)):
            problems.append(f"set admin_token, admin_token_file or ${ADMIN_TOKEN_ENV}")
        if self.signing_key is None:
            problems.append("set signing_key (every server signs rollbacks with the same key)")
        if self.blobs.path is None and self.blobs.s3 is None:
            problems.append("set blobs.path (a shared mount) or blobs.s3")
        if self.broker.embedded:
            problems.append("broker.embedded must be false (every server must reach the same broker)")
        if problems:
            raise ConfigError("cluster.shared: " + "; ".join(problems))

    def resolved_node_id(self) -> str:
        """This server's name among several: stable across restarts (it names its broker sessions)."""
        if self.cluster.node_id:
            return self.cluster.node_id
        where = f"{socket.gethostname()}:{self.data_dir.resolve()}"
        return f"{socket.gethostname()[:24]}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"

    def shared_group(self) -> str | None:
        return self.broker.shared_group or ("nanofleet" if self.cluster.shared else None)

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    def ensure_admin_token(self) -> str:
        """The configured admin token (``admin_token``, ``admin_token_file``, ``$NANOFLEET_FLEET_ADMIN_TOKEN``),
        or one generated once into data_dir/admin.token (mode 0600)."""
        if self.admin_token:
            return self.admin_token
        if self.admin_token_file is not None:
            try:
                self.admin_token = self.admin_token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"admin_token_file {self.admin_token_file}: {exc.strerror}") from exc
            if not self.admin_token:
                raise ConfigError(f"admin_token_file {self.admin_token_file} is empty")
            return self.admin_token
        if os.environ.get(ADMIN_TOKEN_ENV):
            self.admin_token = os.environ[ADMIN_TOKEN_ENV].strip()
            return self.admin_token
        path = self.data_dir / "admin.token"
        if path.is_file():
            self.admin_token = path.read_text().strip()
            return self.admin_token
        from manifests import atomic_write_text

        token = "nfa_" + secrets.token_urlsafe(32)
        atomic_write_text(path, token + "\n", mode=0o600)
        self.admin_token = token
        return token
