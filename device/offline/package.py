"""Reading an update package on the device: every check that can refuse it runs BEFORE the update state
machine starts, so a refused package changes nothing (the state machine then checks again).

Order: package document (size cap) → its signature (the agent's trusted keys) → format → expiry →
addressed to this device (id, hardware class) → every file's path, size and sha256, and no unlisted
files → the bundle's own signature, expiry and name/version → anti-rollback.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from manifests import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleFile,
    SignedDocument,
    TrustStore,
    verify_file,
    verify_manifest_bytes,
)
from manifests.bundle import check_not_expired, format_validation_error
from manifests.errors import ExpiredError, ManifestError, VerificationError
from manifests.mqtt import BundleRef, DesiredState
from manifests.offline.errors import (
    NoPackageError,
    NotForThisDeviceError,
    PackageError,
    PackageExpiredError,
    PackageFormatError,
    PackageRollbackError,
    PackageSignatureError,
    PackageTamperedError,
)
from manifests.offline.format import (
    FORMAT_VERSION,
    MAX_PACKAGE_DOC_BYTES,
    PACKAGE_DOC,
    UPDATE_KIND,
    OfflineUpdate,
    PackageTarget,
)


@dataclass(frozen=True)
class VerifiedPackage:
    root: Path
    update: OfflineUpdate
    device_id: str
    doc_sha256: str

    @property
    def target(self) -> PackageTarget:
        return self.update.targets[self.device_id]

    @property
    def bundle_dir(self) -> Path:
        return self.root / self.update.bundle.path

    @property
    def ref(self) -> str:
        return f"{self.update.bundle.name}@{self.update.bundle.version}"

    def desired(self) -> DesiredState:
        """The same command an online device would get, with the stick folder as the artifact source."""
        b = self.update.bundle
        return DesiredState(
            device_id=self.device_id,
            deployment_id=self.target.command_id,
            bundle=BundleRef(
                name=b.name,
                version=b.version,
                manifest_sha256=b.manifest_sha256,
                base_url=self.bundle_dir.resolve().as_uri() + "/",
            ),
            rollback=self.target.rollback,
            issued_at=self.update.created_at,
        )


def find_packages(path: Path, depth: int = 2) -> list[Path]:
    """Package folders at ``path`` or up to ``depth`` levels below it (dot names are skipped: temp)."""
    path = Path(path)
    if (path / PACKAGE_DOC).is_file():
        return [path]
    found: list[Path] = []
    if depth <= 0 or not path.is_dir():
        return found
    try:
        children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError:
        return found
    for child in children:
        if child.is_dir() and not child.is_symlink():
            found += find_packages(child, depth - 1)
    return found


def read_update_document(root: Path, trust: TrustStore) -> tuple[OfflineUpdate, str]:
    doc_path = root / PACKAGE_DOC
    if doc_path.is_symlink() or not doc_path.is_file():
        raise NoPackageError(f"{root} is not an update package (no {PACKAGE_DOC})")
    try:
        if doc_path.stat().st_size > MAX_PACKAGE_DOC_BYTES:
            raise PackageFormatError(f"{doc_path} is over {MAX_PACKAGE_DOC_BYTES} bytes")
        raw = doc_path.read_bytes()
    except OSError as exc:
        raise PackageError(f"cannot read {doc_path}: {exc.strerror}", reason="media_io") from exc
    try:
        doc = SignedDocument.model_validate_json(raw)
    except ValidationError as exc:
        raise PackageFormatError(
            f"{doc_path} is not a signed package document (truncated or corrupt?): "
            + format_validation_error(exc, PACKAGE_DOC)
        ) from exc
    try:
        payload = doc.verify(trust)
    except VerificationError as exc:
        raise PackageSignatureError(
            f"package signature refused ({exc.reason}): {exc.message}", reason=exc.reason
        ) from exc
    if payload.get("kind") != UPDATE_KIND or payload.get("format_version") != FORMAT_VERSION:
        raise PackageFormatError(
            f"not a nanofleet offline update package of format {FORMAT_VERSION} "
            f"(kind={payload.get('kind')!r}, format_version={payload.get('format_version')!r})"
        )
    try:
        update = OfflineUpdate.model_validate(payload)
    except ValidationError as exc:
        raise PackageFormatError(format_validation_error(exc, "package document")) from exc
    return update, hashlib.sha256(raw).hexdigest()


def check_files(root: Path, update: OfflineUpdate, *, max_file_bytes: int | None = None) -> None:
    listed = {f.path for f in update.files}
    for f in update.files:
        try:
            verify_file(root, BundleFile(path=f.path, size=f.size, sha256=f.sha256), max_size=max_file_bytes)
        except VerificationError as exc:
            raise PackageTamperedError(
                f"package file check failed: {exc.message}", reason="tampered"
            ) from exc
        except OSError as exc:
            raise PackageTamperedError(f"cannot read {f.path}: {exc.strerror}", reason="media_io") from exc
    for dirpath, dirnames, files in os.walk(root):
        for name in files + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel != PACKAGE_DOC and rel not in listed:
                raise PackageTamperedError(f"package holds a file it does not list: {rel}")


def verify_package(
    root: Path,
    trust: TrustStore,
    *,
    device_id: str,
    hardware_class: str | None,
    highest_committed: dict[str, int] | None = None,
    max_file_bytes: int | None = None,
    now: dt.datetime | None = None,
    check_contents: bool = True,
) -> VerifiedPackage:
    """All the checks, in order; raises a PackageError subclass naming the reason."""
    root = Path(root)
    now = now or dt.datetime.now(dt.timezone.utc)
    update, doc_sha = read_update_document(root, trust)
    try:
        check_not_expired(update.expires_at, f"package {update.package_id}", now=now)
    except ExpiredError as exc:
        raise PackageExpiredError(exc.message) from exc
    if device_id not in update.targets:
        names = ", ".join(sorted(update.targets)[:10]) + (" ..." if len(update.targets) > 10 else "")
        raise NotForThisDeviceError(
            f"package {update.package_id} ({update.deployment}) is for {names}; this board is {device_id}"
        )
    if update.hardware_class and hardware_class not in update.hardware_class:
        raise NotForThisDeviceError(
            f"package {update.package_id} is for hardware classes {update.hardware_class}; "
            f"this board is {hardware_class!r}"
        )
    if check_contents:
        check_files(root, update, max_file_bytes=max_file_bytes)
    b = update.bundle
    bdir = root / b.path
    try:
        body = (bdir / MANIFEST_NAME).read_bytes()
        sig = (bdir / SIGNATURE_NAME).read_bytes()
    except OSError as exc:
        raise PackageTamperedError(f"the bundle in the package is incomplete: {exc.strerror}") from exc
    if hashlib.sha256(body).hexdigest() != b.manifest_sha256:
        raise PackageTamperedError("the bundle manifest differs from the one the package names")
    try:
        manifest = verify_manifest_bytes(body, sig, trust, now=now)
    except ExpiredError as exc:
        raise PackageExpiredError(f"bundle {b.name}@{b.version}: {exc.message}") from exc
    except VerificationError as exc:
        raise PackageSignatureError(f"bundle {b.name}@{b.version}: {exc.message}", reason=exc.reason) from exc
    except ManifestError as exc:
        raise PackageFormatError(f"bundle {b.name}@{b.version}: {exc.message}") from exc
    if (manifest.name, manifest.version) != (b.name, b.version):
        raise PackageTamperedError(f"the package names {b.name}@{b.version} but the bundle is {manifest.ref}")
    highest = (highest_committed or {}).get(b.name, 0)
    target = update.targets[device_id]
    if b.version < highest and target.rollback is None:
        raise PackageRollbackError(
            f"{b.name}@{b.version} is below the highest version this board committed ({highest}); "
            "only a signed rollback deployment may go back"
        )
    return VerifiedPackage(root=root, update=update, device_id=device_id, doc_sha256=doc_sha)


def select_package(
    path: Path,
    trust: TrustStore,
    *,
    device_id: str,
    hardware_class: str | None,
    highest_committed: dict[str, int] | None = None,
    max_file_bytes: int | None = None,
    now: dt.datetime | None = None,
) -> VerifiedPackage:
    """The package under ``path`` addressed to this board (the newest when several are).

    A package folder given directly is checked and its refusal raised as is; on a stick holding packages
    for several boards, the ones for other boards are skipped.
    """
    candidates = find_packages(Path(path))
    if not candidates:
        raise NoPackageError(f"no update package ({PACKAGE_DOC}) found in {path}")
    if len(candidates) == 1:
        return verify_package(
            candidates[0],
            trust,
            device_id=device_id,
            hardware_class=hardware_class,
            highest_committed=highest_committed,
            max_file_bytes=max_file_bytes,
            now=now,
        )
    mine: list[tuple[OfflineUpdate, Path]] = []
    errors: list[str] = []
    for c in candidates:
        try:
            update, _ = read_update_document(c, trust)
        except PackageError as exc:
            errors.append(f"{c.name}: {exc.message}")
            continue
        if device_id in update.targets:
            mine.append((update, c))
    if not mine:
        detail = ("; " + "; ".join(errors)) if errors else ""
        raise NotForThisDeviceError(
            f"none of the {len(candidates)} packages in {path} is for {device_id}{detail}"
        )
    mine.sort(key=lambda uc: uc[0].created_at)
    return verify_package(
        mine[-1][1],
        trust,
        device_id=device_id,
        hardware_class=hardware_class,
        highest_committed=highest_committed,
        max_file_bytes=max_file_bytes,
        now=now,
    )
