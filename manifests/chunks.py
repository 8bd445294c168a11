"""Fixed-size chunks of a bundle file, addressed by sha256: what lets a release that changes some layers be
downloaded as roughly those layers.

A model's external-data file holds its tensors in a fixed order at fixed offsets; a release that changes some
layers (a fine-tune merged into a few, a re-quantized block) leaves every other byte where it was. So the fleet
describes each file as the sha256 of every ``CHUNK_SIZE`` bytes (``ChunkMap``), the board computes the same of
the files it holds, copies every chunk it has and fetches the rest with HTTP Range requests (adjacent ones
merged). The map is a hint, never trusted: the assembled file is verified against the sha256 in the signed
manifest, as a plain download is, and a wrong map only costs a refetch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, Field

CHUNK_SIZE = 256 * 1024
# Below this a file is fetched whole: a map and several requests cost more than they save.
MIN_CHUNKED_SIZE = 4 * CHUNK_SIZE


class ChunkMap(BaseModel):
    """The sha256 of each ``chunk_size`` bytes of one file (the last chunk may be shorter)."""

    chunk_size: int = Field(gt=0)
    size: int = Field(ge=0)
    sha256: str = Field(description="of the whole file")
    chunks: list[str]

    def span(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk ``i``."""
        start = i * self.chunk_size
        return start, min(self.chunk_size, self.size - start)


def chunk_map(path: str | Path, chunk_size: int = CHUNK_SIZE) -> ChunkMap:
    """Hash a file chunk by chunk (and whole) in one read."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
            size += len(block)
    return ChunkMap(chunk_size=chunk_size, size=size, sha256=whole.hexdigest(), chunks=chunks)
