"""Content-addressed file storage: every bundle file lives once, under its sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from manifests import fsync_dir

from .errors import InvalidBundleError

CHUNK = 1 << 20


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_stream(self, src: BinaryIO, *, expected_sha256: str, expected_size: int, name: str) -> Path:
        """Copy ``src`` in, checking size and sha256 on the way; a mismatch stores nothing."""
        dest = self.path(expected_sha256)
        if dest.is_file():
            # Already stored (content-addressed): still read the upload to check it is what it claims.
            digest, size = _hash_stream(src)
            _check(name, digest, size, expected_sha256, expected_size)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=dest.parent)
        try:
            h, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: src.read(CHUNK), b""):
                    if size + len(chunk) > expected_size:
                        raise InvalidBundleError(f"{name}: over the {expected_size} bytes in the manifest")
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            _check(name, h.hexdigest(), size, expected_sha256, expected_size)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return dest

    def delete(self, sha256: str) -> None:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            pass


def _hash_stream(src: BinaryIO) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: src.read(CHUNK), b""):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _check(name: str, digest: str, size: int, expected_sha256: str, expected_size: int) -> None:
    if size != expected_size:
        raise InvalidBundleError(f"{name}: {size} bytes uploaded, the manifest says {expected_size}")
    if digest != expected_sha256:
        raise InvalidBundleError(f"{name}: sha256 {digest[:16]}… does not match the manifest")
