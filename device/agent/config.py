"""The agent's YAML configuration, validated by pydantic (``manifests/examples/agent.yaml`` documents it).

Relative paths in the file are resolved against the file's own folder, so a config and its keys can
travel together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from manifests import TrustStore
from manifests.bundle import format_validation_error
from manifests.errors import KeyFormatError

from .datadir import DataDir
from .errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(value: int | str) -> int:
    """'64MiB', '2 GB', '1048576' -> bytes."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 2GB or a number of bytes)")
    number, unit = float(m.group(1)), (m.group(2) or "").upper()
    base = _UNITS[unit[:1]] if unit else 1
    if "I" in unit:
        base = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit[:1]]
    return int(number * base)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Strict):
    ca: Path | None = Field(None, description="CA bundle that signed the broker's certificate")
    cert: Path | None = Field(None, description="client certificate (mutual TLS)")
    key: Path | None = Field(None, description="client private key (mutual TLS)")
    insecure: bool = Field(False, description="skip hostname checks (lab use only)")

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together: give both or neither")
        return self


class MQTTConfig(_Strict):
    url: str = Field(description="mqtt://host:port or mqtts://host:port")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT version; '3.1.1' for brokers without MQTT 5 (amqtt: the fleet's embedded one)"
    )
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    tls: TLSConfig | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, description="how long the broker keeps our session")
    reconnect_max_s: int = Field(30, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
            raise ValueError(f"expected mqtt://host[:port] or mqtts://host[:port], got {v!r}")
        return v

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or ""

    @property
    def use_tls(self) -> bool:
        return urlparse(self.url).scheme in ("mqtts", "ssl") or self.tls is not None

    @property
    def port(self) -> int:
        port = urlparse(self.url).port
        return port if port else (8883 if self.use_tls else 1883)

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"mqtt.password_file {self.password_file}: {exc.strerror}") from exc
        return self.password


class ArtifactsConfig(_Strict):
    base_url: str = Field(description="where bundles are fetched; relative bundle URLs resolve against it")
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(5, ge=0, description="download attempts per file after a dropped connection")
    ca: Path | None = None
    # timeout_s bounds one read, not a download: these bound a server that trickles (docs/ota.md).
    min_rate_bytes_s: int = Field(
        1024,
        ge=0,
        description="a connection slower than this over a whole rate_window_s is cut and resumed with "
        "Range (counts as an attempt); 0: no minimum",
    )
    rate_window_s: float = Field(60.0, gt=0, description="the window over which min_rate_bytes_s is measured")
    max_download_s: float | None = Field(
        6 * 3600.0,
        gt=0,
        description="each file must be complete within this many seconds, all its attempts together "
        "(else the update fails: download_timeout); null: no bound",
    )

    @field_validator("min_rate_bytes_s", mode="before")
    @classmethod
    def _rate(cls, v: int | str) -> int:
        return parse_size(v)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"expected an http(s):// URL, got {v!r}")
        return v if v.endswith("/") else v + "/"


class APIConfig(_Strict):
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    token: str | None = None
    token_file: Path | None = None

    def resolved_token(self) -> str | None:
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"api.token_file {self.token_file}: {exc.strerror}") from exc
        return self.token


class TelemetryConfig(_Strict):
    interval_s: float = Field(30.0, gt=0)
    queue_max_entries: int = Field(10_000, ge=10, description="store-and-forward bound; oldest dropped past it")


class LimitsConfig(_Strict):
    threads: int | None = Field(None, ge=1, description="inference threads (default: onnxruntime's choice)")
    max_file_bytes: int = Field(16 * 1024**3, description="hard cap on any one bundle file")
    disk_margin_bytes: int = Field(256 * 1024**2, description="free space kept beyond a bundle's size")
    max_memory_bytes: int | None = Field(None, description="refuse bundles whose files exceed this (RAM)")
    weights_cache: bool = Field(
        True,
        description="map onnxruntime's prepacked weights from <data_dir>/weights-cache (built once per model "
        "on this board) instead of packing them in memory at every load: lower peak RAM, faster swaps",
    )

    @field_validator("max_file_bytes", "disk_margin_bytes", "max_memory_bytes", mode="before")
    @classmethod
    def _size(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_size(v)


class OfflineConfig(_Strict):
    """Removable media (device.offline, docs/offline.md): the agent's config names what the watcher reads."""

    watch_dirs: list[Path] = Field(
        default_factory=list,
        description="folders where removable media appear (e.g. /media); update packages found up to two "
        "levels below are installed automatically",
    )
    poll_interval_s: float = Field(2.0, gt=0, description="how often the watched folders are scanned")
    export_telemetry_on_pickup: bool = Field(
        True,
        description="when a package for this board is picked up from a stick, also write the telemetry "
        "export onto that stick (after the install finished), so one visit carries both ways",
    )
    archive_exports: int = Field(
        10, ge=0, description="keep this many exported telemetry files in data_dir/offline/exported"
    )


class AgentConfig(_Strict):
    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    hardware_class: str | None = None
    mqtt: MQTTConfig
    artifacts: ArtifactsConfig
    trusted_keys: list[Path] = Field(min_length=1, description="PEM ed25519 public keys; several for rotation")
    data_dir: Path
    api: APIConfig = Field(default_factory=APIConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    runtime: str = Field(
        "engine", description="'engine' (onnxruntime engine + local API) or 'module:factory' for a plug-in"
    )
    bootstrap_bundle: Path | None = Field(
        None, description="a bundle folder installed into slot a when no model is installed yet"
    )
    offline: OfflineConfig = Field(
        default_factory=OfflineConfig, description="removable media: watched folders (docs/offline.md)"
    )

    @property
    def layout(self) -> DataDir:
        """The names inside ``data_dir`` (datadir.py)."""
        return DataDir(self.data_dir)

    def trust_store(self) -> TrustStore:
        try:
            return TrustStore.from_paths(list(self.trusted_keys))
        except KeyFormatError as exc:
            raise ConfigError(f"trusted_keys: {exc.message}") from exc

    def _resolve(self, base: Path) -> AgentConfig:
        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p).resolve())

        self.trusted_keys = [fix(p) for p in self.trusted_keys]  # type: ignore[misc]
        self.data_dir = fix(self.data_dir)  # type: ignore[assignment]
        self.bootstrap_bundle = fix(self.bootstrap_bundle)
        self.mqtt.password_file = fix(self.mqtt.password_file)
        if self.mqtt.tls:
            self.mqtt.tls.ca, self.mqtt.tls.cert, self.mqtt.tls.key = (
                fix(self.mqtt.tls.ca),
                fix(self.mqtt.tls.cert),
                fix(self.mqtt.tls.key),
            )
        self.artifacts.ca = fix(self.artifacts.ca)
        self.api.token_file = fix(self.api.token_file)
        self.offline.watch_dirs = [fix(p) for p in self.offline.watch_dirs]  # type: ignore[misc]
        return self


AgentConfig.model_rebuild()


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate the YAML config; raises ConfigError naming the file and the bad field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # PyYAML names a string it parsed "<unicode string>": name the file, on one line.
        where = " ".join(str(exc).replace('"<unicode string>"', f'"{path}"').split())
        raise ConfigError(f"{path} is not valid YAML: {where}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping")
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + format_validation_error(exc, "agent config")) from exc
    return cfg._resolve(path.resolve().parent)
