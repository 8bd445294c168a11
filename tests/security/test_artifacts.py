"""Artifacts and the registry against hostile clients (issue 15): Range and If-None-Match as RFC 9110
says, an upload may not add parts to a known bundle, and a refused upload leaves no blob behind."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet.config import FleetConfig
from fleet.server import ServerThread
from manifests import MANIFEST_NAME, SIGNATURE_NAME, read_manifest_unverified
from tests.fleet.conftest import make_bundle


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, signing, tiny_bundle: Path) -> Iterator[ServerThread]:
    server = ServerThread(
        FleetConfig(data_dir=tmp_path_factory.mktemp("artifacts"), port=0, trusted_keys=[signing[1]])
    ).start()
    r = upload(server, tiny_bundle)
    assert r.status_code == 201, r.text
    yield server
    server.stop()


def upload(fleet: ServerThread, root: Path, extra: dict[str, bytes] | None = None, **replace: bytes) -> httpx.Response:
    manifest = read_manifest_unverified(root)
    files = [
        ("files", (p, replace.get(p.replace(".", "_"), (root / p).read_bytes()), "application/octet-stream"))
        for p in [MANIFEST_NAME, SIGNATURE_NAME, *(f.path for f in manifest.files)]
    ]
    files += [("files", (name, data, "application/octet-stream")) for name, data in (extra or {}).items()]
    return httpx.post(
        f"{fleet.url}/api/v1/models",
        files=files,
        headers={"Authorization": f"Bearer {fleet.svc.admin_token}"},
        timeout=60,
    )


def blobs(fleet: ServerThread) -> set[str]:
    return {p.name for p in (fleet.svc.config.data_dir / "blobs").rglob("*") if p.is_file()}


def test_range_headers_follow_rfc_9110(fleet: ServerThread, tiny_bundle: Path) -> None:
    url = f"{fleet.url}/bundles/sec-model/1/model.onnx"
    whole = (tiny_bundle / "model.onnx").read_bytes()
    for bad in ("bytes=abc", "items=0-5", "bytes=5-2", "bytes", "bytes=--", "0-10", "bytes=1-2,x"):
        r = httpx.get(url, headers={"Range": bad})
        assert r.status_code in (200, 206), (bad, r.status_code)
        if r.status_code == 200:
            assert r.content == whole, bad
    for ignored in ("bytes=abc", "items=0-5", "bytes=5-2", "bytes"):
        assert httpx.get(url, headers={"Range": ignored}).status_code == 200, ignored
    r = httpx.get(url, headers={"Range": "bytes=0-3"})
    assert r.status_code == 206 and r.content == whole[:4]
    r = httpx.get(url, headers={"Range": f"bytes={len(whole) + 10}-"})
    assert r.status_code == 416


def test_if_none_match(fleet: ServerThread, tiny_bundle: Path) -> None:
    url = f"{fleet.url}/bundles/sec-model/1/model.onnx"
    sha = hashlib.sha256((tiny_bundle / "model.onnx").read_bytes()).hexdigest()
    for header in ("*", f'"{sha}"', f'W/"{sha}"', f'"other", "{sha}"'):
        r = httpx.get(url, headers={"If-None-Match": header})
        assert r.status_code == 304, header
        assert r.headers["etag"] == f'"{sha}"'
    for header in ('"deadbeef"', f'"{sha}0"', f'"x{sha}"'):  # a tag that merely holds the sha is another tag
        assert httpx.get(url, headers={"If-None-Match": header}).status_code == 200, header
    man = f"{fleet.url}/bundles/sec-model/1/{MANIFEST_NAME}"
    assert httpx.get(man, headers={"If-None-Match": "*"}).status_code == 304
    assert httpx.get(f"{fleet.url}/bundles/sec-model/1/nope.bin", headers={"If-None-Match": "*"}).status_code == 404


def test_a_known_bundle_cannot_gain_a_part(fleet: ServerThread, tiny_bundle: Path) -> None:
    before = blobs(fleet)
    r = upload(fleet, tiny_bundle, extra={"evil.so": b"\x7fELF" + b"\0" * 100})
    assert r.status_code == 422 and "evil.so" in r.json()["detail"], r.text
    assert blobs(fleet) == before
    assert upload(fleet, tiny_bundle).status_code == 200  # the same bundle again is still a no-op
    assert httpx.get(f"{fleet.url}/bundles/sec-model/1/evil.so").status_code == 404


def test_a_refused_upload_leaves_no_orphan_blob(fleet: ServerThread, signing, tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "v2", signing[0], 2, name="sec-model", size=8192)
    before = blobs(fleet)
    # model.onnx (new content, stored first) is fine; tokenizer.json is not what the manifest signed.
    r = upload(fleet, root, tokenizer_json=b'{"tampered": true}')
    assert r.status_code == 422, r.text
    assert blobs(fleet) == before, "the refused upload left blobs behind"
    # Nor does a refusal take away a blob a registered bundle uses: this other bundle's model.onnx is v1's.
    other = make_bundle(tmp_path / "other", signing[0], 1, name="sec-other")
    r = upload(fleet, other, tokenizer_json=b'{"tampered": true}')
    assert r.status_code == 422, r.text
    assert httpx.get(f"{fleet.url}/bundles/sec-model/1/model.onnx").status_code == 200
    assert blobs(fleet) == before
    assert upload(fleet, root).status_code == 201  # the genuine v2 still goes in
    assert len(blobs(fleet)) == len(before) + 2
