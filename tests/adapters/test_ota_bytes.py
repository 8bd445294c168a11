"""No byte downloaded twice, measured: the real Updater fetching from a real `nanofleet fleet serve` (its
artifacts route, HTTP Range and chunk maps) with a fake model runtime (the bytes do not depend on the model):
a bundle, the same files re-signed, then a release that changes 100 KiB in the middle of its 3 MiB weights."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device.agent.fetch import HttpFetcher
from device.agent.updater import Updater
from manifests import (
    SigningKey,
    TrustStore,
    describe_file,
    manifest_sha256,
    read_manifest_unverified,
    write_keypair,
    write_signed_manifest,
)
from manifests.chunks import CHUNK_SIZE
from manifests.mqtt import BundleRef, DesiredState
from tests.device_agent.fake_runtime import FakeRuntime
from tests.device_agent.helpers import make_bundle
from tests.offline.conftest import FleetProc

MIB = 1024 * 1024


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def fleet(tmp_path: Path, key: SigningKey) -> Iterator[FleetProc]:
    _, pub = write_keypair(tmp_path / "keys", key)
    (tmp_path / "fleet").mkdir()
    f = FleetProc(tmp_path / "fleet", pub).start()
    yield f
    f.stop()


def _release(src: Path, dest: Path, key: SigningKey, version: int, change: tuple[int, int] | None = None) -> Path:
    """A copy of ``src`` signed as ``version``; ``change`` = (offset, length) of weights.bin bytes inverted."""
    shutil.copytree(src, dest)
    m = read_manifest_unverified(dest)
    files = list(m.files)
    if change is not None:
        data = bytearray((dest / "weights.bin").read_bytes())
        off, n = change
        data[off : off + n] = bytes(255 - b for b in data[off : off + n])
        (dest / "weights.bin").write_bytes(bytes(data))
        files = [describe_file(dest, f.path, f.role) if f.path == "weights.bin" else f for f in files]
    write_signed_manifest(dest, m.model_copy(update={"version": version, "files": files}), key)
    return dest


def test_re_signed_and_one_region_changed_releases_fetch_only_what_changed(
    tmp_path: Path, key: SigningKey, fleet: FleetProc
) -> None:
    v1 = make_bundle(tmp_path / "v1", key, name="tiny", version=1, pad_bytes=3 * MIB)
    v2 = _release(v1, tmp_path / "v2", key, 2)
    changed = (7 * CHUNK_SIZE - 50 * 1024, 100 * 1024)  # across chunks 6 and 7 of the 256 KiB grid
    v3 = _release(v1, tmp_path / "v3", key, 3, change=changed)
    with fleet.admin() as c:
        for b in (v1, v2, v3):
            c.upload_bundle(b)
    events: list[dict[str, Any]] = []
    updater = Updater(
        data_dir=tmp_path / "board", device_id="bytes-1", trust=TrustStore([key.public_key]),
        fetcher=HttpFetcher(retries=2, backoff_s=0.01, timeout_s=10), runtime=FakeRuntime(),
        artifacts_base_url=fleet.url + "/bundles/", disk_margin_bytes=0,
        emit=lambda kind, msg, **f: events.append({"kind": kind, "message": msg, **f}),
    )  # fmt: skip

    def deploy(version: int, folder: Path) -> dict[str, int]:
        ref = BundleRef(name="tiny", version=version, manifest_sha256=manifest_sha256(folder),
                        base_url=f"tiny/{version}/")  # fmt: skip
        desired = DesiredState(device_id="bytes-1", deployment_id=f"d{version}", bundle=ref,
                               issued_at=dt.datetime.now(dt.timezone.utc))  # fmt: skip
        assert updater.handle_desired(desired) == "committed", events[-3:]
        return [e for e in events if e["kind"] == "result"][-1]["details"]["bytes"]

    total = sum(f.size for f in read_manifest_unverified(v1).files)
    first = deploy(1, v1)
    assert first["fetched"] == total and first["copied"] == 0  # nothing held yet: everything fetched
    same = deploy(2, v2)
    assert same["fetched"] == 0 and same["copied"] == total and same["files_copied"] == 3
    third = deploy(3, v3)
    touched = {changed[0] // CHUNK_SIZE, (changed[0] + changed[1] - 1) // CHUNK_SIZE}
    assert third["chunks_fetched"] == len(touched) == 2 and third["chunks_reused"] == 12 - 2, third
    assert third["fetched"] == len(touched) * CHUNK_SIZE, third  # 512 KiB of a 3 MiB file
    assert third["copied"] == total - third["fetched"], third
    assert updater.runtime.serving().version == 3  # type: ignore[union-attr]  # and it verified and serves
