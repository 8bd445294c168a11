"""The download edge: small documents and resumable file downloads (HTTP Range), behind a protocol.

``fetch_to`` never writes past the size the signed manifest declares (the hard cap), resumes a partial
file from its current length, and starts over only when the server ignores Range.

Time is bounded too (``DownloadLimits``): httpx's timeout is per read, so a server that trickles one byte
a second would otherwise hold an update in Downloading forever. A connection whose rate stays under
``min_rate_bytes_s`` for a whole ``rate_window_s`` is cut and resumed with Range (an attempt, like a
dropped connection); a file that is still not complete after ``max_download_s`` (all its attempts
together) fails the update with reason ``download_timeout``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .disk import is_disk_full
from .errors import DiskFullError, DownloadError, DownloadTimeoutError, TooSlowError

CHUNK = 256 * 1024
Progress = Callable[[int], None]  # called with the bytes written so far for the current file
Clock = Callable[[], float]  # monotonic seconds


class Fetcher(Protocol):
    def get_bytes(self, url: str, max_bytes: int) -> bytes: ...

    def fetch_to(self, url: str, dest: Path, size: int, progress: Progress | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DownloadLimits:
    """How slow and how long a download may be (``artifacts`` in agent.yaml; defaults there)."""

    min_rate_bytes_s: float = 1024.0  # below this for a whole window: cut the connection, resume later
    rate_window_s: float = 60.0
    max_download_s: float | None = 6 * 3600.0  # per file, every attempt together; None: no bound


class _Pace:
    """Watches one download's byte stream against the limits; ``check`` raises when it breaks them."""

    def __init__(self, url: str, limits: DownloadLimits, deadline: float | None, clock: Clock) -> None:
        self.url, self.limits, self.deadline, self.clock = url, limits, deadline, clock
        self.window_start = clock()
        self.window_bytes = 0

    def check(self, n: int) -> None:
        now = self.clock()
        if self.deadline is not None and now >= self.deadline:
            raise DownloadTimeoutError(
                f"{self.url} was not complete within max_download_s={self.limits.max_download_s:g}"
            )
        self.window_bytes += n
        elapsed = now - self.window_start
        if elapsed >= self.limits.rate_window_s:
            rate = self.window_bytes / elapsed
            if rate < self.limits.min_rate_bytes_s:
                raise TooSlowError(
                    f"{self.url} arrives at {rate:.0f} B/s, under min_rate_bytes_s="
                    f"{self.limits.min_rate_bytes_s:g} for {elapsed:.0f} s"
                )
            self.window_start, self.window_bytes = now, 0

    def chunks(self, resp) -> Iterator[bytes]:  # noqa: ANN001 - an httpx.Response
        self.check(0)
        for chunk in resp.iter_bytes():  # each read waits at most timeout_s: checks happen that often
            self.check(len(chunk))
            yield chunk


class HttpFetcher:
    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        retries: int = 5,
        ca: Path | None = None,
        backoff_s: float = 0.5,
        limits: DownloadLimits | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        import httpx

        self._httpx = httpx
        verify: bool | str = str(ca) if ca else True
        self._client = httpx.Client(timeout=timeout_s, verify=verify, follow_redirects=True)
        self.retries = retries
        self.backoff_s = backoff_s
        self.limits = limits or DownloadLimits()
        self.clock = clock

    def close(self) -> None:
        self._client.close()

    def _deadline(self) -> float | None:
        m = self.limits.max_download_s
        return None if m is None else self.clock() + m

    def get_bytes(self, url: str, max_bytes: int) -> bytes:
        if url.startswith("file://"):
            return _local_bytes(url, max_bytes)
        httpx = self._httpx
        last: Exception | None = None
        deadline = self._deadline()
        for attempt in range(self.retries + 1):
            try:
                with self._client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise DownloadError(f"GET {url}: HTTP {resp.status_code}", reason="http_status")
                    buf = bytearray()
                    for chunk in _Pace(url, self.limits, deadline, self.clock).chunks(resp):
                        buf += chunk
                        if len(buf) > max_bytes:
                            raise DownloadError(f"{url} is over {max_bytes} bytes", reason="file_too_large")
                    return bytes(buf)
            except (httpx.HTTPError, TooSlowError) as exc:
                last = exc
                time.sleep(self.backoff_s * (2**attempt))
        reason = "too_slow" if isinstance(last, TooSlowError) else "network"
        raise DownloadError(f"GET {url} failed after {self.retries + 1} attempts: {last}", reason=reason)

    def get_range(self, url: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes of ``url`` from ``start`` (HTTP Range; a server that ignores it is an error:
        the caller, device/agent/reuse.py, then downloads the whole file instead)."""
        httpx = self._httpx
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.get(url, headers={"Range": f"bytes={start}-{start + length - 1}"})
                if resp.status_code != 206 or len(resp.content) != length:
                    raise DownloadError(f"GET {url} bytes {start}+{length}: HTTP {resp.status_code}, "
                                        f"{len(resp.content)} bytes", reason="http_status")  # fmt: skip
                return resp.content
            except httpx.HTTPError as exc:
                last = exc
                time.sleep(self.backoff_s * (2**attempt))
        raise DownloadError(f"GET {url} bytes {start}+{length} failed: {last}", reason="network")

    def fetch_to(self, url: str, dest: Path, size: int, progress: Progress | None = None) -> None:
        if url.startswith("file://"):
            return _local_copy(url, dest, size, progress)
        httpx = self._httpx
        last: Exception | None = None
        attempt = 0
        deadline = self._deadline()
        while True:
            have = dest.stat().st_size if dest.exists() else 0
            if have > size:  # more than the manifest allows: never trust it
                dest.unlink()
                have = 0
            if have == size:
                return
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with self._client.stream("GET", url, headers=headers) as resp:
                    if resp.status_code == 416 and have:
                        dest.unlink()  # our partial file does not fit the server's: start over
                        attempt += 1
                        if attempt > self.retries:
                            raise DownloadError(
                                f"{url}: server refuses our Range requests", reason="http_status"
                            )
                        continue
                    if resp.status_code == 200:
                        have = 0  # the server ignored Range: start from scratch
                    elif resp.status_code != 206:
                        raise DownloadError(f"GET {url}: HTTP {resp.status_code}", reason="http_status")
                    pace = _Pace(url, self.limits, deadline, self.clock)
                    written = self._write(pace.chunks(resp), dest, have, size, url, progress)
                if written < size:  # a short, clean response: count it like a dropped connection
                    attempt = attempt + 1 if written == have else 0
                    if attempt > self.retries:
                        raise DownloadError(f"{url} ends at {written} of {size} bytes", reason="short_file")
                else:
                    attempt = 0
            except TooSlowError as exc:  # the connection is cut; what arrived stays: resume with Range
                last = exc
                attempt += 1  # progress does not reset the count here: a trickle must not go on forever
                if attempt > self.retries:
                    raise TooSlowError(
                        f"download of {url} too slow on {self.retries + 1} connections in a row: {exc.message}"
                    ) from exc
                time.sleep(self.backoff_s * (2 ** (attempt - 1)))
            except httpx.HTTPError as exc:  # dropped connection, truncated body, timeout: resume
                last = exc
                progressed = dest.exists() and dest.stat().st_size > have
                attempt = 1 if progressed else attempt + 1
                if attempt > self.retries:
                    raise DownloadError(
                        f"download of {url} failed after {self.retries + 1} attempts: {last}",
                        reason="network",
                    ) from exc
                time.sleep(self.backoff_s * (2 ** (attempt - 1)))
            if deadline is not None and self.clock() >= deadline and _size(dest) < size:
                raise DownloadTimeoutError(
                    f"{url} was not complete within max_download_s={self.limits.max_download_s:g} "
                    f"({_size(dest)} of {size} bytes)"
                )

    @staticmethod
    def _write(
        chunks: Iterator[bytes], dest: Path, offset: int, size: int, url: str, progress: Progress | None
    ) -> int:
        dest.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if offset and dest.exists() else "wb"
        written = offset
        try:
            with open(dest, mode) as fh:
                fh.seek(offset)
                fh.truncate()
                try:
                    for chunk in chunks:  # as it arrives: a dropped or cut connection loses nothing
                        if written + len(chunk) > size:
                            # keep exactly the signed length; the rest is never written
                            fh.write(chunk[: size - written])
                            fh.flush()
                            raise DownloadError(
                                f"{url} sends more than the {size} bytes the manifest declares",
                                reason="file_too_large",
                            )
                        fh.write(chunk)
                        written += len(chunk)
                        if progress:
                            fh.flush()
                            progress(written)
                finally:  # what arrived before a cut is kept for the Range resume: on disk for good
                    fh.flush()
                    os.fsync(fh.fileno())
            return written
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(f"disk full while writing {dest.name}: {exc.strerror}") from exc
            raise DownloadError(f"cannot write {dest}: {exc.strerror}", reason="io") from exc


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _local_path(url: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(url).path))


def _local_bytes(url: str, max_bytes: int) -> bytes:
    """file:// sources (a bootstrap bundle in the OS image, removable media): same caps as HTTP."""
    path = _local_path(url)
    try:
        if path.stat().st_size > max_bytes:
            raise DownloadError(f"{path} is over {max_bytes} bytes", reason="file_too_large")
        return path.read_bytes()
    except OSError as exc:
        raise DownloadError(f"cannot read {path}: {exc.strerror}", reason="missing_file") from exc


def _local_copy(url: str, dest: Path, size: int, progress: Progress | None) -> None:
    src = _local_path(url)
    have = dest.stat().st_size if dest.exists() else 0
    if have > size:
        dest.unlink()
        have = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(src, "rb") as fin, open(dest, "r+b" if have else "wb") as fout:
            fin.seek(have)
            fout.seek(have)
            written = have
            while chunk := fin.read(CHUNK):
                if written + len(chunk) > size:
                    raise DownloadError(
                        f"{src} is larger than the {size} bytes declared", reason="file_too_large"
                    )
                fout.write(chunk)
                written += len(chunk)
                if progress:
                    progress(written)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(f"disk full while writing {dest.name}: {exc.strerror}") from exc
        raise DownloadError(f"cannot copy {src}: {exc.strerror}", reason="io") from exc
