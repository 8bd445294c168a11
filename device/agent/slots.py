"""A/B slots on disk: ``<data_dir>/slots/a`` and ``/b``, each a complete bundle folder or empty."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from manifests import MANIFEST_NAME, SIGNATURE_NAME, BundleManifest, check_relative_path
from manifests.errors import UnsafePathError

from .datadir import DataDir
from .store import SLOTS, SlotName


class Slots:
    def __init__(self, data_dir: Path) -> None:
        self.root = DataDir(data_dir).slots
        for s in SLOTS:
            (self.root / s).mkdir(parents=True, exist_ok=True)

    def path(self, slot: SlotName) -> Path:
        return self.root / slot

    def wipe(self, slot: SlotName) -> None:
        """Empty a slot (never the serving one: the caller guarantees it)."""
        p = self.path(slot)
        if p.is_symlink():
            p.unlink()
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True, exist_ok=True)

    def safe_dest(self, slot: SlotName, rel: str) -> Path:
        """Where a bundle file goes: inside the slot, through real folders only (no symlinks on the way)."""
        check_relative_path(rel)
        root = self.path(slot).resolve()
        dest = root / rel
        cur = root
        for part in Path(rel).parts[:-1]:
            cur = cur / part
            if cur.is_symlink():
                raise UnsafePathError(f"{rel}: {cur.name} is a symlink")
        if dest.is_symlink():
            raise UnsafePathError(f"{rel} is a symlink")
        if not dest.resolve().is_relative_to(root):
            raise UnsafePathError(f"{rel} escapes the slot folder")
        return dest

    def remove_strays(self, slot: SlotName, manifest: BundleManifest) -> None:
        """Delete files the manifest does not list (partials, leftovers): a slot holds exactly the bundle."""
        root = self.path(slot)
        keep = {MANIFEST_NAME, SIGNATURE_NAME, *(f.path for f in manifest.files)}
        for dirpath, dirnames, files in os.walk(root, topdown=False):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                if rel not in keep:
                    os.unlink(os.path.join(dirpath, f))
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    os.unlink(full)
                elif not os.listdir(full):
                    os.rmdir(full)

    def fsync_tree(self, slot: SlotName) -> None:
        for dirpath, _dirs, files in os.walk(self.path(slot)):
            for f in files:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fd = os.open(dirpath, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
