"""Downloads that a hostile or broken artifact server makes go wrong, in process against a real HTTP
server: a trickle (1 B/s) that the per-read timeout never catches, a file that never completes, a body
longer than the signed size or one that never ends, and files or signatures mixed in from another
version. The update fails with a named reason and the old model keeps serving."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from device.agent.config import ArtifactsConfig
from device.agent.errors import DownloadError
from device.agent.fetch import DownloadLimits, HttpFetcher
from manifests import SigningKey, TrustStore

from .harness import Harness
from .helpers import ArtifactServer, make_bundle
from .procs import wait_for


@pytest.fixture
def h(tmp_path: Path, release_key: SigningKey, trust: TrustStore, artifacts: ArtifactServer) -> Harness:
    return Harness(tmp_path, release_key, trust, artifacts)


def with_fetcher(h: Harness, **limits: float | None) -> None:
    """The harness's updater over a fetcher with these limits (a quick backoff, 3 connections per file)."""
    h.fetcher.close()
    h.fetcher = HttpFetcher(retries=2, backoff_s=0.01, timeout_s=5, limits=DownloadLimits(**limits))  # type: ignore[arg-type]
    h.updater = h._make(None)
    h.updater.startup()


def committed_v1(h: Harness) -> None:
    assert h.deploy(h.publish(1)) == "committed"


def assert_old_serves(h: Harness, reason: str) -> None:
    rec = h.updater.record
    assert rec.state.value == "failed" and rec.error_reason == reason, rec.error
    assert reason in h.reasons()
    assert h.serving() == ("tiny", 1)
    h.assert_serving_verifies()
    assert rec.slots["b"] is None and not any((h.data / "slots" / "b").iterdir())


def weights_requests(h: Harness, base: str) -> list:  # noqa: ANN001
    return [r for r in h.artifacts.log if r.path == base + "weights.bin"]


# ---- a server that trickles -------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_one_byte_per_second_is_cut_resumed_then_refused_as_too_slow(h: Harness) -> None:
    """At 1 B/s each read returns within the read timeout, so only a rate bound ends it: each connection
    is cut after one window and resumed with Range; after `retries` more the update fails."""
    committed_v1(h)
    with_fetcher(h, min_rate_bytes_s=1000, rate_window_s=1.0, max_download_s=None)
    ref = h.publish(2, pad_bytes=20_000)
    h.artifacts.throttle[ref.base_url + "weights.bin"] = (1.0, 100)
    assert h.deploy(ref) == "failed"
    assert_old_serves(h, "too_slow")
    assert "too slow on 3 connections" in (h.updater.record.error or "")
    wait_for(lambda: len(weights_requests(h, ref.base_url)) >= 2, 30, "the cut connections in the log")
    ranges = [r.range for r in weights_requests(h, ref.base_url)]
    assert None in ranges
    # the next connection asked only for what the first did not deliver
    offset = int(next(r for r in ranges if r).removeprefix("bytes=").rstrip("-"))
    assert 1 <= offset <= 20_000


@pytest.mark.timeout(180)
def test_a_slow_connection_is_resumed_with_range_and_completes(h: Harness) -> None:
    committed_v1(h)
    with_fetcher(h, min_rate_bytes_s=1000, rate_window_s=1.0, max_download_s=None)
    ref = h.publish(2, pad_bytes=200_000)
    h.artifacts.throttle[ref.base_url + "weights.bin"] = (4.0, 1)  # only the first connection trickles
    assert h.deploy(ref) == "committed"
    h.assert_serving_verifies()
    # (the cut connection is logged once the server notices that the client hung up)
    wait_for(lambda: len(weights_requests(h, ref.base_url)) == 2, 30, "the cut connection in the log")
    first, second = sorted(weights_requests(h, ref.base_url), key=lambda r: r.range is not None)
    assert first.range is None and second.status == 206
    offset = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert offset >= 1 and second.bytes_sent == 200_000 - offset  # nothing fetched twice after the cut


@pytest.mark.timeout(180)
def test_a_download_that_takes_too_long_fails_with_download_timeout(h: Harness) -> None:
    """Fast enough per window, but the file would take hours: max_download_s ends it."""
    committed_v1(h)
    with_fetcher(h, min_rate_bytes_s=1, rate_window_s=60.0, max_download_s=2.0)
    ref = h.publish(2, pad_bytes=20_000)
    h.artifacts.throttle[ref.base_url + "weights.bin"] = (20.0, 100)
    assert h.deploy(ref) == "failed"
    assert_old_serves(h, "download_timeout")
    assert "max_download_s=2" in (h.updater.record.error or "")


@pytest.mark.timeout(180)
def test_a_trickled_manifest_is_cut_too(h: Harness) -> None:
    committed_v1(h)
    with_fetcher(h, min_rate_bytes_s=1000, rate_window_s=1.0, max_download_s=None)
    ref = h.publish(2)
    h.artifacts.throttle[ref.base_url + "manifest.yaml"] = (1.0, 100)
    assert h.deploy(ref) == "failed"
    assert_old_serves(h, "too_slow")


def test_download_limits_come_from_agent_yaml() -> None:
    a = ArtifactsConfig(base_url="http://x/")
    assert (a.min_rate_bytes_s, a.rate_window_s, a.max_download_s) == (1024, 60.0, 6 * 3600.0)
    a = ArtifactsConfig(base_url="http://x/", min_rate_bytes_s="8KiB", rate_window_s=10, max_download_s=None)
    assert (a.min_rate_bytes_s, a.max_download_s) == (8192, None)
    with pytest.raises(ValueError, match="rate_window_s"):
        ArtifactsConfig(base_url="http://x/", rate_window_s=0)


# ---- more bytes than signed ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["oversized", "endless"])
@pytest.mark.timeout(120)
def test_more_bytes_than_signed_are_cut_at_the_signed_length(h: Harness, kind: str) -> None:
    committed_v1(h)
    ref = h.publish(2, pad_bytes=300_000)
    path = ref.base_url + "weights.bin"
    if kind == "oversized":
        h.artifacts.oversize[path] = 5_000_000  # Content-Length says 5.3 MB
    else:
        h.artifacts.endless.add(path)  # chunked, never ends
    assert h.deploy(ref) == "failed"
    assert_old_serves(h, "file_too_large")
    assert "sends more than the 300000 bytes" in (h.updater.record.error or "")
    assert len(weights_requests(h, ref.base_url)) == 1  # not retried: a server that lies is not resumed


@pytest.mark.timeout(120)
def test_fetch_to_keeps_exactly_the_signed_length(tmp_path: Path, artifacts: ArtifactServer) -> None:
    """The edge itself: whatever the server sends, the file on disk never grows past the signed size."""
    (artifacts.root / "f.bin").write_bytes(b"a" * 100_000)
    artifacts.endless.add("f.bin")
    fetcher = HttpFetcher(retries=0, backoff_s=0.01, timeout_s=5)
    dest = tmp_path / "f.bin.part"
    sizes: list[int] = []
    with pytest.raises(DownloadError) as info:
        fetcher.fetch_to(artifacts.url + "f.bin", dest, 100_000, sizes.append)
    assert info.value.reason == "file_too_large"
    assert dest.stat().st_size == 100_000 and max(sizes) <= 100_000
    assert dest.read_bytes() == b"a" * 100_000
    fetcher.close()


# ---- mix and match ------------------------------------------------------------------------------------
def _v1_and_v2(h: Harness) -> tuple[Path, Path]:
    v1 = h.artifacts.root / "mix-v1"
    v2 = h.artifacts.root / "mix-v2"
    make_bundle(v1, h.key, version=1, pad_bytes=4096)
    make_bundle(v2, h.key, version=2, pad_bytes=4096)
    return v1, v2


def test_a_v1_file_under_the_v2_manifest_is_refused(h: Harness) -> None:
    from .helpers import ref_for

    committed_v1(h)
    v1, v2 = _v1_and_v2(h)
    assert (v1 / "weights.bin").stat().st_size == (v2 / "weights.bin").stat().st_size  # same size, v1 bytes
    shutil.copy(v1 / "weights.bin", v2 / "weights.bin")
    assert h.deploy(ref_for(v2, "mix-v2/")) == "failed"
    assert_old_serves(h, "tampered_file")
    assert "weights.bin" in (h.updater.record.error or "")


@pytest.mark.parametrize("pin", [True, False], ids=["pinned_sha", "unpinned"])
def test_a_v1_signature_under_the_v2_manifest_is_refused(h: Harness, pin: bool) -> None:
    from .helpers import ref_for

    committed_v1(h)
    v1, v2 = _v1_and_v2(h)
    ref = ref_for(v2, "mix-v2/")  # the deployment pins v2's manifest sha256, which stays true
    shutil.copy(v1 / "manifest.sig", v2 / "manifest.sig")
    if not pin:
        ref = ref.model_copy(update={"manifest_sha256": None})
    assert h.deploy(ref) == "failed"
    assert_old_serves(h, "bad_signature")
    assert not weights_requests(h, "mix-v2/")  # refused before a byte of the model was fetched


def test_the_v1_manifest_and_signature_under_a_v2_deployment_are_refused(h: Harness) -> None:
    """A mirror serving an older, genuinely signed manifest where v2 should be: the pinned sha256 or the
    signed name/version gives it away."""
    from .helpers import ref_for

    committed_v1(h)
    v1, v2 = _v1_and_v2(h)
    ref = ref_for(v2, "mix-v2/")
    for name in ("manifest.yaml", "manifest.sig"):
        shutil.copy(v1 / name, v2 / name)
    assert h.deploy(ref) == "failed"
    assert_old_serves(h, "manifest_mismatch")
    assert h.deploy(ref.model_copy(update={"manifest_sha256": None})) == "failed"
    rec = h.updater.record
    assert rec.error_reason == "manifest_mismatch" and "tiny@1" in (rec.error or "")
    assert hashlib.sha256((v2 / "manifest.yaml").read_bytes()).hexdigest() != ref.manifest_sha256
