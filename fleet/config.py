"""The fleet service's configuration: one YAML file, every field with a default that works on a laptop."""

from __future__ import annotations

import secrets
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manifests.bundle import format_validation_error

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Strict):
    """``embedded: true`` starts amqtt in-process; otherwise ``url`` names an external broker."""

    embedded: bool = True
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0: a free port (1883 when it is free)")
    url: str | None = Field(None, description="mqtt://host:port of an external broker (embedded: false)")
    # Devices log in with their per-device credentials; the fleet with its own service account.
    require_auth: bool = True
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 15


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
    admin_token: str | None = Field(None, description="default: generated into data_dir/admin.token")
    trusted_keys: list[Path] = Field(default_factory=list, description="public keys that sign bundles")
    signing_key: Path | None = Field(None, description="signs rollbacks; default data_dir/keys/nanofleet.key")
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
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
            raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
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
        return cfg

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    def ensure_admin_token(self) -> str:
        """The configured admin token, or one generated once into data_dir/admin.token (mode 0600)."""
        if self.admin_token:
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
