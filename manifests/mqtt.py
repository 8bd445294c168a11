"""The MQTT contract between agents and the fleet: topic names and versioned JSON payloads.

Every payload carries ``schema`` ("nanofleet.<kind>/<major>"); a reader refuses a major it does not know.
QoS 1 may deliver twice, so commands carry a ``deployment_id`` and are deduplicated by it, and
telemetry and events carry a per-device monotonic ``seq``.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .adapter import AdapterInfo, AdapterRef
from .bundle import format_validation_error
from .capabilities import BoardCapabilities
from .errors import SchemaError
from .signed_doc import SignedDocument

PREFIX = "nanofleet/v1"
QOS = 1


def _t(device_id: str, leaf: str) -> str:
    if not device_id or any(c in device_id for c in "/+#\x00"):
        raise ValueError(f"invalid device id {device_id!r}")
    return f"{PREFIX}/devices/{device_id}/{leaf}"


def desired_topic(device_id: str) -> str:
    """Retained, published by the fleet."""
    return _t(device_id, "desired")


def reported_topic(device_id: str) -> str:
    """Retained, published by the device."""
    return _t(device_id, "reported")


def telemetry_topic(device_id: str) -> str:
    return _t(device_id, "telemetry")


def events_topic(device_id: str) -> str:
    return _t(device_id, "events")


def status_topic(device_id: str) -> str:
    """Online/offline; the agent's last will publishes offline here."""
    return _t(device_id, "status")


# Wildcards the fleet subscribes to.
ALL_REPORTED = f"{PREFIX}/devices/+/reported"
ALL_TELEMETRY = f"{PREFIX}/devices/+/telemetry"
ALL_EVENTS = f"{PREFIX}/devices/+/events"
ALL_STATUS = f"{PREFIX}/devices/+/status"


def parse_device_topic(topic: str) -> tuple[str, str]:
    """'nanofleet/v1/devices/<id>/<leaf>' -> (id, leaf)."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/devices":
        raise ValueError(f"not a nanofleet device topic: {topic!r}")
    return parts[3], parts[4]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes | str):  # type: ignore[no-untyped-def]
        try:
            obj = cls.model_validate_json(data)
        except ValidationError as exc:
            raise SchemaError(format_validation_error(exc, cls.__name__)) from exc
        return obj


class BundleRef(BaseModel):
    name: str
    version: int
    manifest_sha256: str | None = None
    # Where to fetch: {base_url}/manifest.yaml, /manifest.sig and each file's path beneath it.
    base_url: str


class DesiredState(_Payload):
    schema_: Literal["nanofleet.desired/1"] = Field("nanofleet.desired/1", alias="schema")
    device_id: str
    deployment_id: str
    bundle: BundleRef | None = None
    # An adapter deployment: the model stays as it is (``bundle`` is None) and this adapter is made resident.
    adapter: AdapterRef | None = None
    # A signed RollbackAuthorization lets the device go below its highest committed version.
    rollback: SignedDocument | None = None
    issued_at: dt.datetime

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode("utf-8")


class RollbackAuthorization(BaseModel):
    """Payload of a signed rollback: this deployment may install ``version`` of ``name`` on these devices."""

    kind: Literal["rollback"] = "rollback"
    deployment_id: str
    name: str
    version: int
    device_ids: list[str] | None = None  # None: any device the deployment targets
    expires_at: dt.datetime


class SlotInfo(BaseModel):
    name: str | None = None
    version: int | None = None
    manifest_sha256: str | None = None


class UpdateState(str, enum.Enum):
    """The agent's update state machine's states (``device/agent/states.py``), as reported to the fleet.

    The fleet's rollout engine reads them from ``ReportedState.state``: both sides name them only here.
    """

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    ACTIVATING = "activating"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"


class ReportedState(_Payload):
    schema_: Literal["nanofleet.reported/1"] = Field("nanofleet.reported/1", alias="schema")
    device_id: str
    state: UpdateState
    deployment_id: str | None = None
    active_slot: Literal["a", "b"] | None = None
    slots: dict[str, SlotInfo] = Field(default_factory=dict)
    committed: SlotInfo | None = None
    last_result: Literal["committed", "failed", "rolled_back", "refused"] | None = None
    error: str | None = None
    agent_version: str
    hardware_class: str | None = None
    cpu_arch: str | None = None
    ram_bytes: int | None = None
    # What the board can run (manifests/capabilities.py): the fleet resolves release variants from it.
    capabilities: BoardCapabilities | None = None
    adapters: list[AdapterInfo] = Field(default_factory=list, description="the board's LoRA adapters")
    ts: dt.datetime

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode("utf-8")


class ModelRef(BaseModel):
    name: str | None = None
    version: int | None = None
    slot: Literal["a", "b"] | None = None


class Telemetry(_Payload):
    schema_: Literal["nanofleet.telemetry/1"] = Field("nanofleet.telemetry/1", alias="schema")
    device_id: str
    seq: int
    ts: dt.datetime
    decode_tok_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    requests: int = 0
    errors: int = 0
    queue_depth: int = 0
    rss_bytes: int | None = None
    cpu_load: float | None = None
    cpu_temp_c: float | None = None
    disk_free_bytes: int | None = None
    model: ModelRef = Field(default_factory=ModelRef)
    uptime_s: float = 0.0
    agent_version: str = ""
    dropped: int = Field(0, description="entries dropped from the store-and-forward queue so far")
    capabilities: BoardCapabilities | None = Field(
        None, description="sent in the first sample after start and whenever they change (else null)"
    )

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode("utf-8")


class Event(_Payload):
    schema_: Literal["nanofleet.event/1"] = Field("nanofleet.event/1", alias="schema")
    device_id: str
    seq: int
    ts: dt.datetime
    kind: Literal["transition", "error", "refused", "result"]
    from_state: str | None = None
    to_state: str | None = None
    deployment_id: str | None = None
    bundle: str | None = None
    message: str = ""
    details: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode("utf-8")


class Status(_Payload):
    schema_: Literal["nanofleet.status/1"] = Field("nanofleet.status/1", alias="schema")
    device_id: str
    online: bool
    ts: dt.datetime | None = None
    agent_version: str | None = None

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode("utf-8")
