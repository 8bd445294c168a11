"""REST API request and response bodies (they are the OpenAPI schema)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from manifests import BoardCapabilities

# Device ids end up in MQTT topics, file names and database keys: one level of a topic (no / + # $),
# no dot first (a hidden file), at most 64 characters (the column).
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Names the fleet's own MQTT accounts use (the embedded broker's service user "nanofleet-fleet", the
# ansible role's default superuser, and its agents' client ids "nanofleet-agent-..."): never a device's.
RESERVED_ID_PREFIX = "nanofleet"
TAG_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$"
GROUP_PATTERN = DEVICE_ID_PATTERN
MAX_TAGS = 64
MAX_GROUPS = 64
MAX_TAG_VALUE = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(value: str) -> str:
    """Text that every later reader can encode: valid Unicode (no unpaired surrogate: JSON bodies may
    escape one, and every response holding it would fail with 500), no control characters (PostgreSQL
    refuses NUL in text)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds an unpaired UTF-16 surrogate (not valid Unicode)") from None
    if _CONTROL.search(value):
        raise ValueError("holds a control character")
    return value


def _device_id(value: str) -> str:
    if value.lower().startswith(RESERVED_ID_PREFIX):
        raise ValueError(f"ids starting with {RESERVED_ID_PREFIX!r} are reserved for the fleet's own accounts")
    return value


def _ed25519_pem(value: str) -> str:
    from manifests import load_public_key
    from manifests.errors import KeyFormatError

    try:
        load_public_key(value.encode("ascii"))
    except (UnicodeEncodeError, KeyFormatError):
        raise ValueError("not a PEM ed25519 public key") from None
    return value


def document_text(doc: Any) -> Any:
    """Every string anywhere in a stored document follows the same rule as any other text (``_text``)."""
    data = doc.model_dump() if isinstance(doc, BaseModel) else doc
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _text(item)
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return doc


Text = Annotated[str, AfterValidator(_text)]
ShortText = Annotated[str, Field(max_length=64), AfterValidator(_text)]
DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN), AfterValidator(_device_id)]
TagKey = Annotated[str, Field(pattern=TAG_KEY_PATTERN)]
TagValue = Annotated[str, Field(max_length=MAX_TAG_VALUE), AfterValidator(_text)]
Tags = Annotated[dict[TagKey, TagValue], Field(max_length=MAX_TAGS)]
Group = Annotated[str, Field(pattern=GROUP_PATTERN)]
Groups = Annotated[list[Group], Field(max_length=MAX_GROUPS)]


class ErrorBody(BaseModel):
    detail: str
    reason: str
    errors: list[dict[str, str]] = Field(default_factory=list)


class EnrollmentTokenRequest(BaseModel):
    uses: int = Field(1, ge=1, le=100000, description="how many devices may enrol with it")
    ttl_s: float = Field(24 * 3600, gt=0, le=365 * 24 * 3600)
    tags: Tags = Field(default_factory=dict, description="given to every device that enrols")
    groups: Groups = Field(default_factory=list)
    hardware_class: ShortText | None = None


class EnrollmentTokenOut(BaseModel):
    id: str
    token: str = Field(description="shown once; the fleet stores only its hash")
    expires_at: dt.datetime
    uses: int


class EnrollRequest(BaseModel):
    token: Text = Field(min_length=1, max_length=200)
    device_id: DeviceId | None = Field(None, description="default: generated")
    hardware_class: ShortText | None = None
    cpu_arch: Text | None = Field(None, max_length=32)
    ram_bytes: int | None = Field(None, ge=0, le=2**50)
    tags: Tags = Field(default_factory=dict)
    groups: Groups = Field(default_factory=list)
    capabilities: Annotated[BoardCapabilities, AfterValidator(document_text)] | None = Field(
        None, description="what the board can run (manifests.BoardCapabilities): the fleet picks release variants"
    )
    device_public_key: Annotated[str, AfterValidator(_ed25519_pem)] | None = Field(
        None,
        max_length=1024,
        description="PEM ed25519 public key made on the board (device.agent.ensure_device_key); verifies "
        "its offline telemetry exports. Without it, its exports are refused (docs/offline.md)",
    )


class MqttCredentials(BaseModel):
    url: str
    protocol: str | None = Field(
        None, description="'3.1.1' for the embedded broker (amqtt has no MQTT 5); null: the broker decides"
    )
    username: str
    password: str | None = Field(None, description="the device token; only in the enrolment/rotate answer")
    topics: dict[str, str]


class EnrollResponse(BaseModel):
    device_id: str
    device_token: str = Field(description="Bearer token for the REST API and the MQTT password; shown once")
    mqtt: MqttCredentials
    fleet_url: str
    fleet_public_key: str = Field(description="PEM ed25519 key that signs rollback authorisations")
    fleet_key_id: str


class BrokerInfo(BaseModel):
    url: str = Field(description="mqtt://host:port as the fleet knows its broker")
    protocol: str | None = Field(None, description="'3.1.1' for the embedded broker; null: the broker decides")


class TrustedKeyOut(BaseModel):
    key_id: str
    pem: str = Field(description="PEM ed25519 public key")


class EnrollInfo(BaseModel):
    """What a board needs before it enrols (public: no secrets), for `nanofleet device enroll`."""

    fleet_url: str
    mqtt: BrokerInfo
    artifacts_base_url: str = Field(description="base for relative bundle URLs (rollouts send absolute ones)")
    trusted_keys: list[TrustedKeyOut] = Field(description="the keys whose bundle signatures the fleet accepts")
    fleet_public_key: str = Field(description="PEM ed25519 key that signs rollback authorisations")
    fleet_key_id: str


class CredentialsOut(BaseModel):
    device_id: str
    mqtt: MqttCredentials
    fleet_url: str
    fleet_public_key: str
    fleet_key_id: str


class DevicePatch(BaseModel):
    tags: Tags | None = None
    groups: Groups | None = None
    hardware_class: ShortText | None = None


class DeviceOut(BaseModel):
    id: str
    hardware_class: str | None
    cpu_arch: str | None
    ram_bytes: int | None
    tags: dict[str, str]
    groups: list[str]
    enrolled_at: dt.datetime
    last_seen: dt.datetime | None
    online: bool
    agent_version: str | None
    model: str | None = Field(description="name@version of the committed model")
    update_state: str | None
    reported: dict[str, Any] | None
    telemetry: dict[str, Any] | None
    desired: dict[str, Any] | None


class TelemetryPoint(BaseModel):
    ts: dt.datetime
    resolution: str
    model_version: int | None
    decode_tok_s: float | None
    ttft_p95_ms: float | None
    requests: int
    errors: int
    samples: int = 1


class EventOut(BaseModel):
    seq: int
    ts: dt.datetime
    kind: str
    deployment_id: str | None
    payload: dict[str, Any]


class BundleFileOut(BaseModel):
    path: str
    size: int
    sha256: str
    role: str


class ModelOut(BaseModel):
    name: str
    version: int
    manifest_sha256: str
    key_id: str
    total_size: int
    created_at: dt.datetime
    summary: dict[str, Any]
    files: list[BundleFileOut]
    base_url: str
    in_use_by: list[str] = Field(default_factory=list)


class TargetOut(BaseModel):
    device_id: str
    wave: int
    state: str
    variant: str | None = Field(None, description="a release deployment: the variant chosen for this device")
    bundle: str | None = Field(None, description="name@version this device is sent (null: not started or unfit)")
    previous: str | None
    assigned_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    baseline: dict[str, Any] | None
    health: dict[str, Any] | None


class DeploymentOut(BaseModel):
    id: str
    name: str
    generation: int
    bundle: str = Field(description="name@version; for a release, its first variant's (each target has its own)")
    release: str | None = Field(None, description="name@version of the release, when the deployment names one")
    strategy: str
    status: str
    wave: int
    waves: int
    abort_reason: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    counts: dict[str, int]
    manifest: dict[str, Any]
    targets: list[TargetOut] = Field(default_factory=list)


class VariantOut(BaseModel):
    name: str
    bundle: str = Field(description="name@version")
    rules: dict[str, Any] = Field(description="the declared rules (manifests/variants.py VariantRules)")
    description: str = ""


class ReleaseOut(BaseModel):
    name: str
    version: int
    description: str
    created_at: dt.datetime
    variants: list[VariantOut]
    document: dict[str, Any] = Field(description="the release document as stored")


class CreateReleaseResult(BaseModel):
    result: str = Field(description="created | unchanged")
    release: ReleaseOut


class ApplyResult(BaseModel):
    result: str = Field(description="created | configured | unchanged")
    deployment: DeploymentOut


class AuditOut(BaseModel):
    id: int
    ts: dt.datetime
    actor: str
    action: str
    deployment: str | None
    device_id: str | None
    details: dict[str, Any]


class StatusOut(BaseModel):
    devices: int
    online: int
    models: int
    deployments: dict[str, int]
    mqtt_url: str
    mqtt_connected: bool
    public_url: str
    fleet_key_id: str
