"""The removable-media edge: free space, synced copies, and all-or-nothing folder publication.

A stick can be pulled at any moment, so everything is first written under a dot-named temp name on the
same filesystem, fsynced, then renamed into place (and the folder fsynced): a reader sees the whole
package or file, or nothing it would pick up.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .._files import fsync_dir
from .errors import MediaError, MediaTooSmallError
from .format import TEMP_PREFIX

CHUNK = 1 << 20
MARGIN_BYTES = 1 << 20  # directory entries, the package document, filesystem slack


def free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError as exc:
        raise MediaError(f"cannot read the free space of {probe}: {exc.strerror}") from exc


def check_room(path: Path, needed: int, *, margin: int = MARGIN_BYTES) -> int:
    """Raise MediaTooSmallError unless ``needed`` + ``margin`` bytes fit on the filesystem of ``path``."""
    free = free_bytes(path)
    if free < needed + margin:
        raise MediaTooSmallError(
            f"{path} has {free:,} bytes free; this needs {needed:,} bytes (+{margin:,} margin). "
            "Use a larger stick or free some space; nothing was written."
        )
    return free


def temp_dir_in(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def write_synced(dst: Path, data: bytes) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(dst, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise MediaError(f"cannot write {dst}: {exc.strerror}") from exc


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        fsync_dir(dirpath)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a complete temp folder to its final name (same filesystem), then fsync the parent."""
    if final.exists():
        raise MediaError(f"{final} already exists")
    try:
        fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        raise MediaError(f"cannot publish {final.name}: {exc.strerror}") from exc


def remove_quietly(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass
