"""Chunk maps of stored blobs (manifests/chunks.py), computed on first request and kept: a blob is immutable
(content-addressed), so its map never changes. Kept in memory, bounded; a restart recomputes on demand."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from manifests.chunks import CHUNK_SIZE, ChunkMap, chunk_map

MAX_MAPS = 256
_lock = threading.Lock()
_maps: OrderedDict[str, ChunkMap] = OrderedDict()


def chunk_map_of(blob: Path, sha256: str) -> ChunkMap:
    with _lock:
        hit = _maps.get(sha256)
        if hit is not None:
            _maps.move_to_end(sha256)
            return hit
    m = chunk_map(blob, CHUNK_SIZE)  # outside the lock: hashing a large file takes a while
    with _lock:
        _maps[sha256] = m
        while len(_maps) > MAX_MAPS:
            _maps.popitem(last=False)
    return m
