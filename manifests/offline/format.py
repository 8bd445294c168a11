"""What travels on the stick: the offline update package and the telemetry export file.

It is a contract between the fleet and the boards: ``fleet/offline`` writes packages and reads telemetry,
``device/offline`` does the reverse, and both import it from here.

An update package is a folder::

    nanofleet-update-<deployment>-<id>/
      package.json                   SignedDocument (fleet key) over OfflineUpdate: targets, expiry, and
                                     the size + sha256 of every other file in the package
      deployment.yaml                the deployment manifest it came from (for people; checksummed)
      bundles/<name>-<version>/      the signed bundle, exactly as the registry holds it

A telemetry export is one file ``<device>-<export id>.nftelemetry``: the device's store-and-forward queue
(telemetry, events) and its reported update state, signed with the board's own ed25519 key (made on the
board at enrolment; the fleet holds only its public half), format ``nanofleet-offline-telemetry/2``.

Format 1 was authenticated with HMAC-SHA256 keyed by the sha256 of the device token, which is exactly
what the fleet's database stores: anyone able to read the database could forge any board's telemetry.
Readers refuse it (``telemetry_file_format`` names it so the refusal can say why).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..bundle import check_relative_path
from ..errors import BadSignatureError, UnknownKeyError, UnsafePathError
from ..signed_doc import SignedDocument
from ..signing import Signature, SigningKey, TrustStore, key_id_of, load_public_key

PACKAGE_DOC = "package.json"
DEPLOYMENT_DOC = "deployment.yaml"
PACKAGE_PREFIX = "nanofleet-update-"
UPDATE_KIND = "nanofleet-offline-update"
TELEMETRY_KIND = "nanofleet-offline-telemetry"
FORMAT_VERSION = 1
TELEMETRY_FORMAT = "nanofleet-offline-telemetry/2"
TELEMETRY_FORMAT_V1 = "nanofleet-offline-telemetry/1"  # HMAC keyed by what the fleet stores: refused
TELEMETRY_SUFFIX = ".nftelemetry"
TEMP_PREFIX = ".nanofleet-tmp-"  # a half-written package or file: readers skip dot names
MAX_PACKAGE_DOC_BYTES = 4 * 1024 * 1024
MAX_TELEMETRY_FILE_BYTES = 512 * 1024 * 1024


def _safe_path(v: str) -> str:
    try:
        check_relative_path(v)
    except UnsafePathError as exc:  # a ValueError for pydantic, so it becomes a schema error
        raise ValueError(exc.message) from exc
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PackageFile(_Strict):
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        return _safe_path(v)


class PackageBundle(_Strict):
    name: str
    version: int = Field(ge=1)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    path: str = Field(description="the bundle folder inside the package")

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        return _safe_path(v)


class PackageTarget(_Strict):
    """One device the package is for: the command id the fleet's rollout waits for, and (for a signed
    rollback deployment) the rollback authorization the device needs to go below its highest version."""

    command_id: str
    rollback: SignedDocument | None = None


class OfflineUpdate(_Strict):
    kind: Literal["nanofleet-offline-update"] = UPDATE_KIND
    format_version: int = FORMAT_VERSION
    package_id: str
    deployment: str
    deployment_id: str
    generation: int
    bundle: PackageBundle
    targets: dict[str, PackageTarget] = Field(description="device id -> its command")
    hardware_class: list[str] = Field(default_factory=list, description="the deployment's selector")
    created_at: dt.datetime
    expires_at: dt.datetime
    files: list[PackageFile]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


class ExportedEntry(_Strict):
    topic: str
    payload: str = Field(description="the MQTT payload, UTF-8 JSON text")


class TelemetryExport(_Strict):
    kind: Literal["nanofleet-offline-telemetry"] = TELEMETRY_KIND
    format_version: Literal[2] = 2
    export_id: str
    device_id: str
    created_at: dt.datetime
    agent_version: str = ""
    outbox_dropped: int = 0
    reported: dict[str, Any] | None = Field(None, description="ReportedState JSON: the update result")
    entries: list[ExportedEntry]


class TelemetryFile(_Strict):
    """The file on the stick: the exact body bytes (as text) and the board's ed25519 signature over them."""

    format: Literal["nanofleet-offline-telemetry/2"] = TELEMETRY_FORMAT
    device_id: str
    alg: Literal["ed25519"] = "ed25519"
    key_id: str = Field(description="the signing key's id (manifests.signing.key_id_of)")
    body: str
    signature: str = Field(description="base64 ed25519 signature over the UTF-8 body bytes")


def sign_telemetry(device_id: str, body: bytes, key: SigningKey) -> TelemetryFile:
    """The envelope for ``body``, signed with the board's own key."""
    sig = key.sign(body)
    return TelemetryFile(
        device_id=device_id,
        key_id=sig.key_id,
        body=body.decode("utf-8"),
        signature=base64.b64encode(sig.signature).decode("ascii"),
    )


def verify_telemetry(f: TelemetryFile, public_key_pem: str | bytes) -> bytes:
    """The body bytes if ``f`` is signed by this public key; BadSignatureError / UnknownKeyError if not."""
    key = load_public_key(public_key_pem.encode("ascii") if isinstance(public_key_pem, str) else public_key_pem)
    if f.key_id != key_id_of(key):
        raise UnknownKeyError(
            f"signed by key {f.key_id}, not by the key registered for device {f.device_id} ({key_id_of(key)})"
        )
    try:
        raw = base64.b64decode(f.signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadSignatureError(f"the signature is not base64: {exc}") from exc
    body = f.body.encode("utf-8")
    TrustStore([key]).verify(body, Signature(key_id=f.key_id, signature=raw))
    return body


def telemetry_file_format(data: bytes) -> str | None:
    """The ``format`` a telemetry file claims (read before validating it, so an old format is named)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    value = doc.get("format") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def telemetry_file_name(device_id: str, export_id: str) -> str:
    return f"{device_id}-{export_id}{TELEMETRY_SUFFIX}"
