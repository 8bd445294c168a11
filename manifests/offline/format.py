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
(telemetry, events) and its reported update state, authenticated with HMAC-SHA256 keyed by the device's
credential as the fleet stores it (sha256 of the device token, hex).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..bundle import check_relative_path
from ..errors import UnsafePathError
from ..signed_doc import SignedDocument

PACKAGE_DOC = "package.json"
DEPLOYMENT_DOC = "deployment.yaml"
PACKAGE_PREFIX = "nanofleet-update-"
UPDATE_KIND = "nanofleet-offline-update"
TELEMETRY_KIND = "nanofleet-offline-telemetry"
FORMAT_VERSION = 1
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
    format_version: int = FORMAT_VERSION
    export_id: str
    device_id: str
    created_at: dt.datetime
    agent_version: str = ""
    outbox_dropped: int = 0
    reported: dict[str, Any] | None = Field(None, description="ReportedState JSON: the update result")
    entries: list[ExportedEntry]


class TelemetryFile(_Strict):
    """The file on the stick: the exact body bytes (as text) and their MAC."""

    format: Literal["nanofleet-offline-telemetry/1"] = "nanofleet-offline-telemetry/1"
    device_id: str
    alg: Literal["hmac-sha256"] = "hmac-sha256"
    body: str
    mac: str


def device_secret_hash(device_token: str) -> str:
    """What the fleet keeps of a device's token (``fleet.service.hash_secret``): sha256, hex."""
    return hashlib.sha256(device_token.encode("utf-8")).hexdigest()


def telemetry_mac(secret_hash: str, body: bytes) -> str:
    return hmac.new(secret_hash.encode("ascii"), body, hashlib.sha256).hexdigest()


def telemetry_file_name(device_id: str, export_id: str) -> str:
    return f"{device_id}-{export_id}{TELEMETRY_SUFFIX}"
