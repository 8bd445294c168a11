"""Unit tests of the device's package checks (in-process, packages signed here by a stand-in fleet key):
the cases the real fleet cannot produce (hardware class, escaping paths, symlinks, several packages)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from device.offline.package import find_packages, select_package, verify_package
from manifests import SignedDocument, SigningKey, TrustStore
from manifests.offline.errors import (
    NotForThisDeviceError,
    PackageExpiredError,
    PackageFormatError,
    PackageTamperedError,
)
from manifests.offline.format import (
    PACKAGE_DOC,
    OfflineUpdate,
    PackageBundle,
    PackageFile,
    PackageTarget,
)
from tests.device_agent.helpers import make_bundle

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _files(root: Path) -> list[PackageFile]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != PACKAGE_DOC:
            data = p.read_bytes()
            out.append(
                PackageFile(
                    path=str(p.relative_to(root)), size=len(data), sha256=hashlib.sha256(data).hexdigest()
                )
            )
    return out


def make_package(
    root: Path,
    fleet_key: SigningKey,
    release_key: SigningKey,
    *,
    targets: tuple[str, ...] = ("dev-1",),
    hardware_class: tuple[str, ...] = (),
    created: dt.datetime = NOW,
    expires: dt.timedelta = dt.timedelta(days=1),
    raw_payload_edit: dict[str, object] | None = None,
) -> Path:
    bdir = make_bundle(root / "bundles" / "tiny-2", release_key, name="tiny", version=2, pad_bytes=1024)
    update = OfflineUpdate(
        package_id=f"pkg-{created.timestamp():.0f}",
        deployment="d",
        deployment_id="d.1.x",
        generation=1,
        bundle=PackageBundle(
            name="tiny",
            version=2,
            manifest_sha256=hashlib.sha256((bdir / "manifest.yaml").read_bytes()).hexdigest(),
            path="bundles/tiny-2",
        ),
        targets={t: PackageTarget(command_id=f"d.1.x-{t}") for t in targets},
        hardware_class=list(hardware_class),
        created_at=created,
        expires_at=created + expires,
        files=_files(root),
    )
    payload = update.model_dump(mode="json")
    payload.update(raw_payload_edit or {})
    doc = SignedDocument.sign(payload, fleet_key)
    (root / PACKAGE_DOC).write_text(doc.model_dump_json())
    return root


@pytest.fixture(scope="module")
def keys() -> tuple[SigningKey, SigningKey, TrustStore]:
    fleet, release = SigningKey.generate(), SigningKey.generate()
    return fleet, release, TrustStore([fleet.public_key, release.public_key])


def check(root: Path, trust: TrustStore, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"device_id": "dev-1", "hardware_class": "pi5", **kw}
    return verify_package(root, trust, **args)  # type: ignore[arg-type]


def test_good_package_verifies_and_becomes_the_same_command(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    fleet, release, trust = keys
    pkg = check(make_package(tmp_path / "p", fleet, release), trust)
    desired = pkg.desired()
    assert desired.deployment_id == "d.1.x-dev-1" and desired.bundle is not None
    assert desired.bundle.base_url.startswith("file://") and desired.bundle.manifest_sha256


def test_hardware_class_must_match(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    fleet, release, trust = keys
    root = make_package(tmp_path / "p", fleet, release, hardware_class=("jetson",))
    with pytest.raises(NotForThisDeviceError, match="hardware classes"):
        check(root, trust)
    assert check(root, trust, hardware_class="jetson").device_id == "dev-1"


def test_escaping_path_in_signed_document_is_refused(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    fleet, release, trust = keys
    root = tmp_path / "p"
    make_package(root, fleet, release)
    payload = json.loads((root / PACKAGE_DOC).read_text())["payload"]
    payload["files"].append({"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64})
    (root / PACKAGE_DOC).write_text(SignedDocument.sign(payload, fleet).model_dump_json())
    with pytest.raises(PackageFormatError, match="escapes"):
        check(root, trust)


def test_symlinked_file_is_refused(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    fleet, release, trust = keys
    root = make_package(tmp_path / "p", fleet, release)
    tok = root / "bundles/tiny-2/tokenizer.json"
    outside = tmp_path / "outside.json"
    shutil.copy(tok, outside)
    tok.unlink()
    os.symlink(outside, tok)
    with pytest.raises(PackageTamperedError, match="symlink"):
        check(root, trust)


def test_expiry_is_checked_against_the_clock(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    fleet, release, trust = keys
    root = make_package(tmp_path / "p", fleet, release)
    with pytest.raises(PackageExpiredError):
        check(root, trust, now=NOW + dt.timedelta(days=2))


def test_stick_with_several_packages_picks_the_newest_for_this_board(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    fleet, release, trust = keys
    stick = tmp_path / "stick"
    make_package(stick / "old", fleet, release, created=NOW - dt.timedelta(hours=2))
    make_package(stick / "new", fleet, release, created=NOW - dt.timedelta(hours=1))
    make_package(stick / "theirs", fleet, release, targets=("dev-2",))
    (stick / ".nanofleet-tmp-half").mkdir()  # an interrupted export: skipped
    assert {p.name for p in find_packages(stick)} == {"old", "new", "theirs"}
    pkg = select_package(stick, trust, device_id="dev-1", hardware_class=None)
    assert pkg.root.name == "new"
    with pytest.raises(NotForThisDeviceError, match="none of the 3 packages"):
        select_package(stick, trust, device_id="dev-9", hardware_class=None)
