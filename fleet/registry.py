"""The model registry: signed bundles in, checked against the trusted keys before a byte is stored."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, BinaryIO

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from manifests import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleManifest,
    ManifestError,
    TrustStore,
    VerificationError,
    check_relative_path,
    verify_manifest_bytes,
)
from manifests.adapter import AdapterManifest, is_adapter_manifest, verify_adapter_manifest_bytes

from .adapters import runs_adapter, summarize_adapter
from .blobs import BlobStore
from .db import BundleFileRecord, BundleRecord, Deployment, Device
from .errors import ConflictError, InvalidBundleError, NotFoundError
from .rollout.states import ACTIVE


def summarize(manifest: BundleManifest | AdapterManifest) -> dict[str, Any]:
    if isinstance(manifest, AdapterManifest):
        return summarize_adapter(manifest)
    q = manifest.quality
    return {
        "recipe": manifest.recipe.model_dump(mode="json", exclude_defaults=True),
        "target": manifest.runtime.target,
        "architecture": manifest.arch.architecture,
        "quality": None
        if q is None
        else {
            "ppl_increase_pct": q.ppl_increase_pct,
            "greedy_agreement": q.greedy_agreement,
            "passed": q.passed,
        },
        "has_golden": manifest.golden is not None,
        "expires_at": manifest.expires_at.isoformat() if manifest.expires_at else None,
    }


@dataclass(frozen=True)
class VerifiedBundle:
    """An uploaded manifest whose signature checked out against the trusted keys."""

    manifest: BundleManifest | AdapterManifest  # an adapter bundle is registered like a model (fleet/adapters.py)
    manifest_bytes: bytes
    signature: bytes
    manifest_sha256: str


def verify_upload(trust: TrustStore, parts: dict[str, BinaryIO]) -> VerifiedBundle:
    """Check an upload's manifest signature before anything is read or stored. ``parts`` maps each
    bundle path to its content."""
    for required in (MANIFEST_NAME, SIGNATURE_NAME):
        if required not in parts:
            raise InvalidBundleError(f"the upload has no {required}")
    body = parts[MANIFEST_NAME].read()
    sig = parts[SIGNATURE_NAME].read()
    verify = verify_adapter_manifest_bytes if is_adapter_manifest(body) else verify_manifest_bytes
    try:
        manifest = verify(body, sig, trust)
    except VerificationError as exc:
        raise InvalidBundleError(f"bundle refused ({exc.reason}): {exc.message}") from exc
    except ManifestError as exc:
        raise InvalidBundleError(exc.message) from exc
    return VerifiedBundle(manifest, body, sig, hashlib.sha256(body).hexdigest())


def registered(session: Session, bundle: VerifiedBundle) -> BundleRecord | None:
    """The record of this very bundle when it is registered already; a conflict when another bundle
    holds its name and version (versions are immutable: anti-rollback depends on it)."""
    m = bundle.manifest
    existing = session.scalar(
        select(BundleRecord).where(BundleRecord.name == m.name, BundleRecord.version == m.version)
    )
    if existing is None or existing.manifest_sha256 == bundle.manifest_sha256:
        return existing
    raise ConflictError(f"{m.ref} is already registered with different content; bundle versions are immutable")


def check_parts(bundle: VerifiedBundle, parts: dict[str, BinaryIO]) -> None:
    """Refuse an upload holding a part its signed manifest does not list (also when the bundle is
    registered already: the same bundle again may repeat its files, never add one)."""
    declared = {f.path for f in bundle.manifest.files}
    extra = set(parts) - declared - {MANIFEST_NAME, SIGNATURE_NAME}
    if extra:
        raise InvalidBundleError(f"files not listed in the manifest: {', '.join(sorted(extra)[:20])}")


def store_files(
    blobs: BlobStore, bundle: VerifiedBundle, parts: dict[str, BinaryIO], new_blobs: set[str] | None = None
) -> None:
    """Stream every file the manifest lists into the blob store, checking size and sha256 on the way
    (content-addressed: a file stored already is only checked). No database row is written. The sha256
    of each blob this call added goes into ``new_blobs``, so a refused upload can take them away again
    (``commands.discard_blobs``)."""
    check_parts(bundle, parts)
    for entry in bundle.manifest.files:
        check_relative_path(entry.path)
        src = parts.get(entry.path)
        if src is None:
            raise InvalidBundleError(f"{entry.path} is listed in the manifest but missing from the upload")
        existed = blobs.has(entry.sha256)
        blobs.put_stream(src, expected_sha256=entry.sha256, expected_size=entry.size, name=entry.path)
        if not existed and new_blobs is not None:
            new_blobs.add(entry.sha256)


def register(session: Session, blobs: BlobStore, bundle: VerifiedBundle) -> tuple[BundleRecord, bool]:
    """Record a verified bundle whose files are in the blob store. Returns (record, created): the same
    bundle again is a no-op."""
    existing = registered(session, bundle)
    if existing is not None:
        return existing, False
    manifest = bundle.manifest
    missing = [f.path for f in manifest.files if not blobs.has(f.sha256)]
    if missing:
        # Only when a delete of a bundle sharing these files raced the upload: nothing half-registered.
        raise ConflictError(f"{manifest.ref}: {', '.join(missing)} left the blob store during the upload; retry")
    record = BundleRecord(
        name=manifest.name,
        version=manifest.version,
        manifest_sha256=bundle.manifest_sha256,
        manifest_yaml=bundle.manifest_bytes.decode("utf-8"),
        signature=bundle.signature.decode("utf-8"),
        key_id=_key_id(bundle.signature),
        total_size=manifest.total_size,
        summary=summarize(manifest),
        files=[
            BundleFileRecord(path=f.path, size=f.size, sha256=f.sha256, role=f.role) for f in manifest.files
        ],
    )
    session.add(record)
    session.flush()
    return record, True


def _key_id(sig: bytes) -> str:
    import json

    try:
        return str(json.loads(sig)["key_id"])
    except (ValueError, KeyError, TypeError):
        return ""


def get_bundle(session: Session, name: str, version: int) -> BundleRecord:
    rec = session.scalar(
        select(BundleRecord).where(BundleRecord.name == name, BundleRecord.version == version)
    )
    if rec is None:
        # Say what is there: the usual cause is a name that differs from what export wrote.
        have = session.execute(
            select(BundleRecord.name, BundleRecord.version).order_by(BundleRecord.name, BundleRecord.version)
        ).all()
        listed = ", ".join(f"{n}@{v}" for n, v in have[:10]) + (f" and {len(have) - 10} more" if len(have) > 10 else "")
        raise NotFoundError(
            f"no bundle {name}@{version} in the registry; it holds "
            + (listed if have else "no bundles yet (push one with `nanofleet fleet models push BUNDLE`)")
        )
    return rec


def users_of(session: Session, name: str, version: int) -> list[str]:
    """Who uses a bundle: devices running or told to run it, deployments still active with it."""
    users: list[str] = []
    devices = session.scalars(
        select(Device).where(
            or_(
                (Device.current_name == name) & (Device.current_version == version),
                Device.desired.is_not(None),
            )
        )
    ).all()
    for d in devices:
        if d.current_name == name and d.current_version == version:
            users.append(f"device {d.id} runs it")
            continue
        b = (d.desired or {}).get("bundle") or (d.desired or {}).get("adapter") or {}
        if b.get("name") == name and b.get("version") == version:
            users.append(f"device {d.id} is told to run it")
        elif runs_adapter(d.reported, name, version):
            users.append(f"device {d.id} holds it as an adapter")
    deps = session.scalars(
        select(Deployment).where(
            Deployment.bundle_name == name,
            Deployment.bundle_version == version,
            Deployment.status.in_([s.value for s in ACTIVE]),
        )
    ).all()
    users += [f"deployment {d.name} is {d.status}" for d in deps]
    users += _release_users(session, name, version)
    return users


def _release_users(session: Session, name: str, version: int) -> list[str]:
    """Active deployments of a release that has this bundle as a variant (their devices may still get it)."""
    from .rollout.variants import get_release  # rollout imports this module

    deps = session.scalars(
        select(Deployment).where(Deployment.release_name.is_not(None), Deployment.status.in_([s.value for s in ACTIVE]))
    ).all()
    out = []
    for d in deps:
        assert d.release_name is not None and d.release_version is not None
        release = get_release(session, d.release_name, d.release_version)
        for v in release.spec.variants:
            if (v.bundle.name, v.bundle.version) == (name, version):
                out.append(f"deployment {d.name} is {d.status} with it as variant {v.name} of {release.ref}")
    return out


def delete_bundle(session: Session, name: str, version: int) -> set[str]:
    """Delete a bundle's record (refused while it is in use); returns the sha256 of each of its files
    no other bundle shares, for the caller to remove from the blob store once the deletion is committed."""
    rec = get_bundle(session, name, version)
    users = users_of(session, name, version)
    if users:
        raise ConflictError(f"{name}@{version} is in use: " + "; ".join(users[:10]))
    shas = {f.sha256 for f in rec.files}
    session.delete(rec)
    session.flush()
    still_used = set(
        session.scalars(select(BundleFileRecord.sha256).where(BundleFileRecord.sha256.in_(shas))).all()
    )
    return shas - still_used
