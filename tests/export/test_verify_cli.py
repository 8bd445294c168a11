"""`nanofleet bundle verify` on a real exported bundle: a flipped byte, an unknown key, an expired or edited
manifest each fail with their named reason."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from manifests import SigningKey, read_manifest_unverified, write_keypair, write_signed_manifest
from tests.export.conftest import run_cli

# Building the cached bundles takes minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture
def bundle_copy(default_bundle: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, SigningKey]:
    src, pub = default_bundle
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst, pub, SigningKey.load(pub.parent / "nanofleet.key")


def _verify(bundle: Path, pub: Path) -> dict:
    proc = run_cli(["bundle", "verify", str(bundle), "--pubkey", str(pub), "--json"])
    doc = json.loads(proc.stdout)
    assert (proc.returncode == 0) == doc["ok"]
    return doc


def test_untouched_copy_verifies(bundle_copy) -> None:
    bundle, pub, _ = bundle_copy
    assert _verify(bundle, pub)["ok"] is True


@pytest.mark.parametrize("role", ["model", "tokenizer"])
def test_flipped_byte_is_a_tampered_file(bundle_copy, role: str) -> None:
    bundle, pub, _ = bundle_copy
    entry = read_manifest_unverified(bundle).file(role)
    assert entry is not None
    path = bundle / entry.path
    with open(path, "r+b") as fh:
        fh.seek(entry.size // 2)
        b = fh.read(1)
        fh.seek(entry.size // 2)
        fh.write(bytes([b[0] ^ 0x01]))
    doc = _verify(bundle, pub)
    assert doc["reason"] == "tampered_file" and entry.path in doc["error"]


def test_unknown_key(bundle_copy, tmp_path: Path) -> None:
    bundle, _, _ = bundle_copy
    _, other_pub = write_keypair(tmp_path / "other")
    doc = _verify(bundle, other_pub)
    assert doc["reason"] == "unknown_key"


def test_expired_manifest(bundle_copy) -> None:
    bundle, pub, key = bundle_copy
    m = read_manifest_unverified(bundle)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    write_signed_manifest(
        bundle, m.model_copy(update={"created_at": past - dt.timedelta(days=2), "expires_at": past}), key
    )
    doc = _verify(bundle, pub)
    assert doc["reason"] == "expired"


def test_edited_manifest_breaks_the_signature(bundle_copy) -> None:
    bundle, pub, _ = bundle_copy
    path = bundle / "manifest.yaml"
    text = path.read_text()
    assert "\nversion: 1\n" in text
    path.write_text(text.replace("\nversion: 1\n", "\nversion: 2\n", 1))
    doc = _verify(bundle, pub)
    assert doc["reason"] == "bad_signature"


def test_missing_file(bundle_copy) -> None:
    bundle, pub, _ = bundle_copy
    (bundle / "tokenizer.json").unlink()
    assert _verify(bundle, pub)["reason"] == "missing_file"
