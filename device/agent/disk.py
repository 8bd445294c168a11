"""The disk edge: free space (injected so a test can pretend a disk is full)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Protocol


class Disk(Protocol):
    def free_bytes(self, path: Path) -> int: ...


class RealDisk:
    def free_bytes(self, path: Path) -> int:
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        return shutil.disk_usage(probe).free


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
