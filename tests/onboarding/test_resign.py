"""`nanofleet bundle resign`: a new signed version of the same files, without a re-export, atomic."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from manifests import TrustStore, read_manifest_unverified, verify_bundle, write_keypair
from nanofleet.resign import ResignError, parse_expiry

from .conftest import nanofleet


@pytest.fixture
def bundle(tmp_path: Path, default_bundle: tuple[Path, Path]) -> Path:
    src, _pub = default_bundle
    dst = tmp_path / "v1"
    shutil.copytree(src, dst)
    return dst


def test_resign_makes_a_new_version_of_the_same_files(tmp_path: Path, bundle: Path) -> None:
    priv, pub = write_keypair(tmp_path / "release")
    out = tmp_path / "v7"
    r = nanofleet(
        "bundle",
        "resign",
        str(bundle),
        "--key",
        str(priv),
        "--version",
        "7",
        "--expires",
        "30d",
        "--out",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["version"] == 7 and doc["bundle"] == str(out)
    m = verify_bundle(out, TrustStore.from_paths([pub]))
    old = read_manifest_unverified(bundle)
    assert m.version == 7 and m.name == old.name and m.files == old.files and m.quality == old.quality
    assert m.expires_at is not None
    assert dt.timedelta(days=29) < m.expires_at - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(days=30)
    assert not list(tmp_path.glob(".v7.resign-*"))


def test_resign_refuses_changed_files_an_existing_out_and_bad_input(tmp_path: Path, bundle: Path) -> None:
    priv, _pub = write_keypair(tmp_path / "release")
    taken = tmp_path / "taken"
    taken.mkdir()
    cases = [
        (["--out", str(taken)], "already exists"),
        (["--out", str(tmp_path / "a"), "--expires", "2001-01-01"], "in the past"),
        (["--out", str(tmp_path / "a"), "--expires", "soon"], "use never, keep"),
    ]
    for extra, expect in cases:
        r = nanofleet("bundle", "resign", str(bundle), "--key", str(priv), "--version", "2", *extra)
        assert r.returncode == 1 and len(r.lines) == 1 and expect in r.lines[0], (extra, r.lines)
    r = nanofleet("bundle", "resign", str(tmp_path / "nope"), "--key", str(priv), "--version", "2", "--out", "x")
    assert r.returncode == 1 and "does not exist" in r.lines[0], r.lines
    # A file changed after release: nothing is signed, --out never appears.
    with open(bundle / "tokenizer.json", "ab") as fh:
        fh.write(b" ")
    out = tmp_path / "v2"
    r = nanofleet("bundle", "resign", str(bundle), "--key", str(priv), "--version", "2", "--out", str(out))
    assert r.returncode == 1 and "nothing was signed" in r.lines[0] and len(r.lines) == 1, r.lines
    assert not out.exists() and not list(tmp_path.glob(".v2.resign-*"))


def test_parse_expiry() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert parse_expiry("never", now=now) is None
    assert parse_expiry("keep", now=now) == "keep"
    assert parse_expiry("2w", now=now) == now + dt.timedelta(weeks=2)
    assert parse_expiry("2026-06-30", now=now) == dt.datetime(2026, 6, 30, tzinfo=dt.timezone.utc)
    with pytest.raises(ResignError):
        parse_expiry("yesterday", now=now)
