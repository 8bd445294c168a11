"""The fleet's side of offline media, as functions of one database session (run on the service's worker
thread by the commands in ``fleet.commands.offline``, so rollout state keeps its one writer).

- ``prepare_package``: the signed package document for a deployment's devices that wait for it. Devices
  still ``pending`` are started exactly as the rollout engine starts them (same command id, desired state
  and audit entry), so a board that later comes online gets the same command and deduplicates it.
- ``import_telemetry_file``: check a telemetry export's ed25519 signature against the public key the
  board registered at enrolment (nothing in this database can forge it), then feed each entry and the
  reported update state through the same idempotent handlers as MQTT, in one savepoint.
  The rollout engine counts the device's result on its next tick, as for an online device.
- ``offline_devices``: devices with their last import (and export) time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manifests import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleManifest,
    DeploymentManifest,
    SignedDocument,
    SigningKey,
    atomic_write_bytes,
)
from manifests import mqtt as contract
from manifests.errors import BadSignatureError, KeyFormatError, UnknownKeyError
from manifests.offline.format import (
    DEPLOYMENT_DOC,
    TELEMETRY_FORMAT,
    TELEMETRY_FORMAT_V1,
    OfflineUpdate,
    PackageBundle,
    PackageFile,
    PackageTarget,
    TelemetryExport,
    TelemetryFile,
    telemetry_file_format,
    verify_telemetry,
)

from ..audit import audit
from ..db import AuditEntry, BundleRecord, Deployment, DeploymentTarget, Device, DeviceEvent, TelemetrySample, aware
from ..errors import ConflictError, FleetError, NotFoundError
from ..ingest import handle_message
from ..registry import get_bundle
from ..rollout import DeploymentStatus, RolloutEngine, TargetState, get_deployment

EXPORT_ACTION = "offline_export"
IMPORT_ACTION = "offline_import"
PAUSE_ENV = "NANOFLEET_OFFLINE_PAUSE_IN"
WAITING = (TargetState.PENDING, TargetState.IN_FLIGHT)  # targets whose device waits for its update


class TelemetryImportError(FleetError):
    """A telemetry export is refused: truncated, corrupt, not authentic, or for an unknown device."""

    status_code = 422
    reason = "telemetry_refused"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class PreparedPackage:
    """The package (or, for a dry run, only its plan) as the REST API answers it, and the devices whose
    desired state changed because it started them."""

    body: dict[str, Any]
    changed_devices: frozenset[str] = frozenset()


def _waiting_targets(dep: Deployment, devices: list[str] | None, all_waves: bool) -> list[DeploymentTarget]:
    if dep.status != DeploymentStatus.IN_PROGRESS:
        hint = " (resume it first)" if dep.status == DeploymentStatus.PAUSED else ""
        raise ConflictError(f"deployment {dep.name} is {dep.status}, not in_progress{hint}")
    if devices:
        unknown = set(devices) - {t.device_id for t in dep.targets}
        if unknown:
            raise NotFoundError(f"not targets of deployment {dep.name}: {', '.join(sorted(unknown))}")
    chosen = [
        t
        for t in dep.targets
        if t.state in WAITING and (all_waves or t.wave <= dep.wave) and (not devices or t.device_id in devices)
    ]
    if not chosen:
        later = sum(1 for t in dep.targets if t.state == TargetState.PENDING and t.wave > dep.wave)
        hint = f"; {later} wait in later waves (use --all-waves)" if later else ""
        raise ConflictError(f"no device of deployment {dep.name} is waiting for its update{hint}")
    return chosen


def _expiry(bundle: BundleRecord, now: dt.datetime, valid_for_s: float) -> dt.datetime:
    """The package expires after ``valid_for_s``, and never after its bundle."""
    bmanifest = BundleManifest.from_yaml(bundle.manifest_yaml)
    expires = now + dt.timedelta(seconds=valid_for_s)
    if bmanifest.expires_at is not None:
        bexp = aware(bmanifest.expires_at)
        assert bexp is not None
        if bexp <= now:
            raise ConflictError(f"bundle {bmanifest.ref} expired at {bexp.isoformat()}")
        expires = min(expires, bexp)
    return expires


def _package_files(bpath: str, dep_yaml: bytes, bundle: BundleRecord) -> list[PackageFile]:
    return [
        PackageFile(path=DEPLOYMENT_DOC, size=len(dep_yaml), sha256=_sha(dep_yaml)),
        PackageFile(
            path=f"{bpath}/{MANIFEST_NAME}",
            size=len(bundle.manifest_yaml.encode()),
            sha256=bundle.manifest_sha256,
        ),
        PackageFile(
            path=f"{bpath}/{SIGNATURE_NAME}",
            size=len(bundle.signature.encode()),
            sha256=_sha(bundle.signature.encode()),
        ),
        *(PackageFile(path=f"{bpath}/{f.path}", size=f.size, sha256=f.sha256) for f in bundle.files),
    ]


def _start_targets(
    session: Session,
    rollouts: RolloutEngine,
    dep: Deployment,
    manifest: DeploymentManifest,
    chosen: list[DeploymentTarget],
    now: dt.datetime,
) -> tuple[dict[str, PackageTarget], set[str]]:
    """Start the chosen devices still pending exactly as the rollout would (same command id, desired
    state and audit entry), and give each its command id and signed rollback authorisation."""
    device_rows = {
        d.id: d for d in session.scalars(select(Device).where(Device.id.in_([t.device_id for t in chosen])))
    }
    changed: set[str] = set()
    targets: dict[str, PackageTarget] = {}
    for t in chosen:
        if t.state == TargetState.PENDING:
            changed.add(rollouts.start_target(session, dep, t, device_rows.get(t.device_id), manifest, now))
        assert t.command_id is not None
        rollback = None
        if manifest.spec.rollback:
            rollback = rollouts.sign_rollback(t.command_id, dep.bundle_name, dep.bundle_version, t.device_id, now)
        targets[t.device_id] = PackageTarget(command_id=t.command_id, rollback=rollback)
    return targets, changed


def prepare_package(
    session: Session,
    rollouts: RolloutEngine,
    signing_key: SigningKey,
    deployment_name: str,
    *,
    actor: str,
    now: dt.datetime,
    devices: list[str] | None = None,
    all_waves: bool = False,
    valid_for_s: float = 30 * 24 * 3600,
    dry_run: bool = False,
) -> PreparedPackage:
    dep = get_deployment(session, deployment_name)
    if dep.release_name is not None:  # a package carries one bundle; a release sends each board its own
        raise ConflictError(
            f"deployment {dep.name} names release {dep.release_name}@{dep.release_version}: offline packages "
            "carry one bundle; deploy each variant's bundle by name for boards reached by stick"
        )
    chosen = _waiting_targets(dep, devices, all_waves)
    manifest = DeploymentManifest.model_validate(dep.manifest)
    bundle = get_bundle(session, dep.bundle_name, dep.bundle_version)
    expires = _expiry(bundle, now, valid_for_s)
    bpath = f"bundles/{bundle.name}-{bundle.version}"
    dep_yaml = manifest.to_yaml().encode("utf-8")
    files = _package_files(bpath, dep_yaml, bundle)
    plan = {
        "deployment": dep.name,
        "bundle": f"{bundle.name}@{bundle.version}",
        "devices": [t.device_id for t in chosen],
        "total_size": sum(f.size for f in files),
    }
    if dry_run:
        return PreparedPackage(plan)
    targets, changed = _start_targets(session, rollouts, dep, manifest, chosen, now)
    update = OfflineUpdate(
        package_id=f"{dep.name}-g{dep.generation}-{uuid.uuid4().hex[:8]}",
        deployment=dep.name,
        deployment_id=dep.id,
        generation=dep.generation,
        bundle=PackageBundle(
            name=bundle.name, version=bundle.version, manifest_sha256=bundle.manifest_sha256, path=bpath
        ),
        targets=targets,
        hardware_class=list(manifest.spec.selector.hardware_class),
        created_at=now,
        expires_at=expires,
        files=files,
    )
    doc = SignedDocument.sign(update, signing_key)
    audit(
        session,
        actor,
        EXPORT_ACTION,
        deployment=dep.name,
        ts=now,
        package_id=update.package_id,
        devices=sorted(targets),
        expires_at=expires.isoformat(),
    )
    body = {
        **plan,
        "package_id": update.package_id,
        "expires_at": expires.isoformat(),
        "document": doc.model_dump(mode="json"),
        "deployment_yaml": dep_yaml.decode("utf-8"),
        "bundle_files": [
            {
                "path": f.path,
                "size": f.size,
                "sha256": f.sha256,
                "url": f"/bundles/{bundle.name}/{bundle.version}/{f.path}",
            }
            for f in bundle.files
        ],
        "bundle_path": bpath,
        "manifest_yaml": bundle.manifest_yaml,
        "signature": bundle.signature,
    }
    return PreparedPackage(body, frozenset(changed))


def _counts(session: Session, device_id: str) -> tuple[int, int]:
    tel = session.scalar(
        select(func.count()).select_from(TelemetrySample).where(TelemetrySample.device_id == device_id)
    )
    ev = session.scalar(
        select(func.count()).select_from(DeviceEvent).where(DeviceEvent.device_id == device_id)
    )
    return int(tel or 0), int(ev or 0)


def _previous_import(session: Session, device_id: str, export_id: str) -> AuditEntry | None:
    for entry in session.scalars(
        select(AuditEntry).where(AuditEntry.action == IMPORT_ACTION, AuditEntry.device_id == device_id)
    ):
        if (entry.details or {}).get("export_id") == export_id:
            return entry
    return None


def _pause_hook(pause_dir: Path | None) -> None:
    """Test hook (real-process tests): NANOFLEET_OFFLINE_PAUSE_IN=import-telemetry stops an import
    half-way, before its transaction commits, until the process is killed."""
    if pause_dir is not None and os.environ.get(PAUSE_ENV) == "import-telemetry":
        atomic_write_bytes(pause_dir / "paused-in-import-telemetry", b"")
        threading.Event().wait()


def import_telemetry_file(
    session: Session, data: bytes, *, actor: str, now: dt.datetime, pause_dir: Path | None = None
) -> dict[str, Any]:
    """Verify and ingest one export; importing the same export again ingests nothing."""
    claimed = telemetry_file_format(data)
    if claimed == TELEMETRY_FORMAT_V1:
        raise TelemetryImportError(
            f"format {TELEMETRY_FORMAT_V1} is refused: it was authenticated with a key derived from what "
            "this fleet's database stores, so anyone able to read the database could have forged it; "
            f"update the board's agent (it writes {TELEMETRY_FORMAT}, signed with the board's own key) and "
            "export again",
            reason="old_format",
        )
    try:
        outer = TelemetryFile.model_validate_json(data)
    except ValidationError as exc:
        raise TelemetryImportError(
            "not a complete nanofleet telemetry export (truncated or corrupt?): "
            f"{exc.error_count()} error(s), first: {exc.errors()[0]['msg']}"
        ) from exc
    device = session.get(Device, outer.device_id)
    if device is None:
        raise TelemetryImportError(f"device {outer.device_id!r} is not enrolled in this fleet")
    if not device.public_key:
        raise TelemetryImportError(
            f"device {device.id} has no registered public key (enrolled before boards had their own keys), "
            "so its export cannot be authenticated; enrol it again with a key (`nanofleet device enroll`)",
            reason="no_device_key",
        )
    try:
        body_bytes = verify_telemetry(outer, device.public_key)
    except (BadSignatureError, UnknownKeyError, KeyFormatError) as exc:
        raise TelemetryImportError(
            f"the export's signature does not verify with device {device.id}'s key: {exc.message} "
            "(tampered, or not written by that board)",
            reason="bad_signature",
        ) from exc
    try:
        body = TelemetryExport.model_validate_json(body_bytes)
    except ValidationError as exc:
        raise TelemetryImportError(f"the export's body does not validate: {exc.errors()[0]['msg']}") from exc
    if body.device_id != device.id:
        raise TelemetryImportError("the export's body names another device than its envelope")
    file_sha = _sha(data)
    prev = _previous_import(session, device.id, body.export_id)
    if prev is not None:
        return {
            "device_id": device.id,
            "export_id": body.export_id,
            "duplicate": True,
            "imported_at": aware(prev.ts).isoformat() if prev.ts else None,  # type: ignore[union-attr]
            "telemetry": 0,
            "events": 0,
            "entries": len(body.entries),
            "reported_state": (body.reported or {}).get("state"),
        }
    for e in body.entries:
        try:
            dev_id, leaf = contract.parse_device_topic(e.topic)
        except ValueError as exc:
            raise TelemetryImportError(f"entry on a foreign topic {e.topic!r}") from exc
        if dev_id != device.id or leaf not in ("telemetry", "events"):
            raise TelemetryImportError(f"entry on topic {e.topic!r} does not belong to device {device.id}")
    tel0, ev0 = _counts(session, device.id)
    for i, e in enumerate(body.entries):
        if i == len(body.entries) // 2:
            _pause_hook(pause_dir)
        handle_message(session, e.topic, e.payload.encode("utf-8"))
        session.flush()
    if body.reported is not None:
        handle_message(session, contract.reported_topic(device.id), json.dumps(body.reported).encode("utf-8"))
    session.flush()
    tel1, ev1 = _counts(session, device.id)
    result = {
        "device_id": device.id,
        "export_id": body.export_id,
        "duplicate": False,
        "imported_at": now.isoformat(),
        "telemetry": tel1 - tel0,
        "events": ev1 - ev0,
        "entries": len(body.entries),
        "already_known": len(body.entries) - (tel1 - tel0) - (ev1 - ev0),
        "reported_state": (body.reported or {}).get("state"),
        "last_result": (body.reported or {}).get("last_result"),
        "deployment_id": (body.reported or {}).get("deployment_id"),
        "outbox_dropped": body.outbox_dropped,
    }
    audit(
        session,
        actor,
        IMPORT_ACTION,
        device_id=device.id,
        ts=now,
        export_id=body.export_id,
        file_sha256=file_sha,
        exported_at=body.created_at.isoformat(),
        telemetry=result["telemetry"],
        events=result["events"],
        already_known=result["already_known"],
        reported_state=result["reported_state"],
    )
    return result


def offline_devices(session: Session) -> list[dict[str, Any]]:
    """Devices served by removable media: the last package sent to them and the last time their
    telemetry came home (None: a stick went out, nothing came back yet), with what they run now."""
    last: dict[str, dict[str, Any]] = {}
    for entry in session.scalars(
        select(AuditEntry)
        .where(AuditEntry.action.in_((EXPORT_ACTION, IMPORT_ACTION)))
        .order_by(AuditEntry.ts, AuditEntry.id)
    ):
        details = entry.details or {}
        if entry.action == EXPORT_ACTION:
            for device_id in details.get("devices") or []:
                rec = last.setdefault(device_id, {"imports": 0})
                rec["last_package"] = details.get("package_id")
                rec["last_package_at"] = aware(entry.ts)
            continue
        if entry.device_id is None:
            continue
        rec = last.setdefault(entry.device_id, {"imports": 0})
        rec["imports"] += 1
        rec["last_import"] = aware(entry.ts)
        rec["last_export_id"] = details.get("export_id")
        rec["last_exported_at"] = details.get("exported_at")
    out = []
    for dev in session.scalars(select(Device).where(Device.id.in_(list(last))).order_by(Device.id)):
        info = last[dev.id]
        out.append(
            {
                "device_id": dev.id,
                "last_import": info["last_import"].isoformat() if info.get("last_import") else None,
                "imports": info["imports"],
                "last_export_id": info.get("last_export_id"),
                "last_exported_at": info.get("last_exported_at"),
                "last_package": info.get("last_package"),
                "last_package_at": info["last_package_at"].isoformat()
                if info.get("last_package_at")
                else None,
                "model": f"{dev.current_name}@{dev.current_version}" if dev.current_name else None,
                "update_state": (dev.reported or {}).get("state"),
                "last_result": (dev.reported or {}).get("last_result"),
                "online": dev.online,
                "telemetry_ts": aware(dev.telemetry_ts).isoformat() if dev.telemetry_ts else None,  # type: ignore[union-attr]
            }
        )
    return out
