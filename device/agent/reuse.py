"""No byte downloaded twice: files (and chunks of files) the board already holds are copied, not fetched.

A bundle file is named in its signed manifest by size and sha256. Before fetching one, the agent looks for a
file with that sha256 among what it already holds (the serving slot's bundle, the adapters on disk), each
known by its own verified manifest, and copies it. Nothing copied is trusted for what it claims: the slot (or
the adapter folder) is verified against the new signed manifest afterwards, byte for byte, as a download is.

``DownloadStats`` counts what came over the network and what was copied locally, per update; the agent puts
it in the update's result event (``details.bytes``) and the benchmarks read it there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from manifests import MANIFEST_NAME, BundleFile, read_manifest_unverified
from manifests.adapter import is_adapter_manifest, read_adapter_manifest_unverified
from manifests.chunks import MIN_CHUNKED_SIZE, ChunkMap, chunk_map
from manifests.errors import ManifestError, NanofleetError

from .fetch import Fetcher

if TYPE_CHECKING:
    from .updater import Updater

log = logging.getLogger("nanofleet.agent")
MAX_CHUNK_MAP_BYTES = 8 * 1024 * 1024
# One Range request fetches at most this much (adjacent missing chunks are merged up to it).
MAX_RANGE_BYTES = 16 * 1024 * 1024

COPY_BLOCK = 1024 * 1024


@dataclass
class DownloadStats:
    """Bytes of one update: fetched over the network, copied from files the board held, in chunks reused."""

    fetched: int = 0
    copied: int = 0
    files_fetched: int = 0
    files_copied: int = 0
    chunks_reused: int = 0
    chunks_fetched: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class LocalFiles:
    """sha256 -> a file on the board that claims it (by its folder's manifest, verified when it was installed)."""

    def __init__(self) -> None:
        self._by_sha: dict[str, tuple[Path, int]] = {}

    def add_bundle(self, folder: Path) -> None:
        """Index a bundle or adapter folder by its manifest (a folder without a readable one adds nothing)."""
        mpath = folder / MANIFEST_NAME
        if not mpath.is_file():
            return
        try:
            body = mpath.read_bytes()
            adapter = is_adapter_manifest(body)
            m = read_adapter_manifest_unverified(folder) if adapter else read_manifest_unverified(folder)
        except (ManifestError, OSError):
            return
        for f in m.files:
            p = folder / f.path
            if p.is_file() and not p.is_symlink():
                self._by_sha.setdefault(f.sha256, (p, f.size))

    def find(self, sha256: str, size: int) -> Path | None:
        """A local file that claims this content and still has its size (else None)."""
        hit = self._by_sha.get(sha256)
        if hit is None or hit[1] != size:
            return None
        path = hit[0]
        try:
            return path if path.stat().st_size == size else None
        except OSError:
            return None

    def copy_to(self, sha256: str, size: int, dest: Path) -> bool:
        """Copy the held file with this content to ``dest`` (through ``dest.part``, then renamed); False when
        the board holds no such file. The copy is verified later with everything else."""
        src = self.find(sha256, size)
        if src is None or src.resolve() == dest.resolve():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        with open(src, "rb") as fin, open(part, "wb") as fout:
            shutil.copyfileobj(fin, fout, COPY_BLOCK)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(part, dest)
        return True

    def __len__(self) -> int:
        return len(self._by_sha)

    def chunk_index(self, chunk_size: int) -> dict[str, tuple[Path, int, int]]:
        """chunk sha256 -> (file, offset, length) over every held file big enough to be chunked."""
        index: dict[str, tuple[Path, int, int]] = {}
        for path, size in {v for v in self._by_sha.values()}:
            if size < MIN_CHUNKED_SIZE:
                continue
            m = _local_map(path, chunk_size)
            for i, sha in enumerate(m.chunks):
                index.setdefault(sha, (path, *m.span(i)))
        return index


_MAPS: dict[tuple[str, int, int, int], ChunkMap] = {}


def _local_map(path: Path, chunk_size: int) -> ChunkMap:
    """The chunk map of a held file, computed once per process (keyed by path, size and mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, chunk_size)
    if key not in _MAPS:
        _MAPS[key] = chunk_map(path, chunk_size)
    return _MAPS[key]


def held_files(updater: Updater) -> LocalFiles:
    """What the board holds: the serving slot's bundle and every adapter folder on disk."""
    local = LocalFiles()
    rec = updater.record
    if rec.active_slot is not None:
        local.add_bundle(updater.slots.path(rec.active_slot))
    root = updater.adapters.store.root
    if root.is_dir():
        for name_dir in sorted(root.iterdir()):
            if name_dir.is_dir() and not name_dir.name.startswith("."):
                for v in sorted(name_dir.iterdir()):
                    local.add_bundle(v)
    return local


def fetch_file(
    fetcher: Fetcher,
    url: str,
    part: Path,
    entry: BundleFile,
    local: LocalFiles,
    stats: DownloadStats,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Download one bundle file into ``part``: by chunks (the held ones copied, the rest fetched by Range) when
    the server has a chunk map and the board holds some of its chunks, else whole (resumable)."""
    if not (part.is_file() and part.stat().st_size) and _try_chunked(fetcher, url, part, entry, local, stats):
        return
    fetcher.fetch_to(url, part, entry.size, progress)
    stats.fetched += entry.size
    stats.files_fetched += 1


def _remote_map(fetcher: Fetcher, url: str, entry: BundleFile) -> ChunkMap | None:
    try:
        m = ChunkMap.model_validate_json(fetcher.get_bytes(url + "?chunks=1", MAX_CHUNK_MAP_BYTES))
    except (NanofleetError, ValidationError, ValueError) as exc:  # no map here (a plain file server): whole file
        log.info("no chunk map for %s (%s): downloading it whole", url, getattr(exc, "message", exc))
        return None
    n = -(-entry.size // m.chunk_size) if entry.size else 0
    if m.size != entry.size or m.sha256 != entry.sha256 or len(m.chunks) != n:
        log.warning("the chunk map of %s does not describe the file the manifest signs: downloading it whole", url)
        return None
    return m


def _try_chunked(
    fetcher: Fetcher, url: str, part: Path, entry: BundleFile, local: LocalFiles, stats: DownloadStats
) -> bool:
    get_range: Any = getattr(fetcher, "get_range", None)
    if get_range is None or entry.size < MIN_CHUNKED_SIZE or url.startswith("file://") or not len(local):
        return False
    remote = _remote_map(fetcher, url, entry)
    if remote is None:
        return False
    held = local.chunk_index(remote.chunk_size)
    if not any(c in held for c in remote.chunks):
        return False
    fetched = copied = reused = 0
    try:
        with open(part, "wb") as out:
            i = 0
            while i < len(remote.chunks):
                if remote.chunks[i] in held:
                    src, off, n = held[remote.chunks[i]]
                    with open(src, "rb") as f:
                        f.seek(off)
                        out.write(f.read(n))
                    copied += n
                    reused += 1
                    i += 1
                    continue
                j = i  # a run of missing chunks: one Range request
                limit = i + max(1, MAX_RANGE_BYTES // remote.chunk_size)
                while j < min(len(remote.chunks), limit) and remote.chunks[j] not in held:
                    j += 1
                start = remote.span(i)[0]
                end = sum(remote.span(j - 1))
                data = get_range(url, start, end - start)
                for k in range(i, j):
                    off, n = remote.span(k)
                    if hashlib.sha256(data[off - start : off - start + n]).hexdigest() != remote.chunks[k]:
                        raise ManifestError(f"chunk {k} of {url} differs from its map")
                out.write(data)
                fetched += len(data)
                i = j
            out.flush()
            os.fsync(out.fileno())
    except (NanofleetError, OSError) as exc:
        log.warning("chunked download of %s failed (%s): downloading it whole", url, getattr(exc, "message", exc))
        part.unlink(missing_ok=True)
        return False
    stats.fetched += fetched
    stats.copied += copied
    stats.chunks_reused += reused
    stats.chunks_fetched += len(remote.chunks) - reused
    stats.files_fetched += 1
    return True
