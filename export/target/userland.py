"""The emulated board: a Debian bookworm arm64 root (Python 3.11, as on Raspberry Pi OS bookworm) and a
qemu-aarch64 user-mode emulator to run it with ``-L <root>`` (no chroot, no binfmt_misc needed).

Both are built once into the cache (see tools.py) under a lock; a half-built piece never looks complete:
it is built in a ``.tmp`` folder and renamed when done.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from manifests.runtime_compat import version_at_least

from .errors import EmulatorTooOldError, ToolMissingError, UserlandBuildError
from .tools import (
    HOST_QEMU,
    QEMU_SUITE,
    SUITE,
    apt_private_args,
    cache_lock,
    cache_root,
    debian_mirror,
    qemu_version,
    require_tool,
)

Progress = Callable[[str], None]
PYTHON_IN_ROOT = "usr/bin/python3.11"
COMPLETE = ".complete"


def _noop(_: str) -> None:
    pass


def _run(cmd: list[str], what: str, *, timeout: float = 1800, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise UserlandBuildError(f"{what} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        raise UserlandBuildError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def rootfs_dir() -> Path:
    return cache_root() / "rootfs" / f"debian-{SUITE}-arm64"


def ensure_rootfs(progress: Progress = _noop) -> Path:
    """The arm64 root, built on first use: ``debootstrap --foreign`` (download + first unpack; the second
    stage would need to run arm64 code in a chroot), then every downloaded .deb unpacked with dpkg-deb."""
    dest = rootfs_dir()
    if (dest / COMPLETE).is_file():
        return dest
    debootstrap = require_tool("debootstrap", "debootstrap", "to build the Debian arm64 userland")
    dpkg_deb = require_tool("dpkg-deb", "dpkg", "to unpack the arm64 packages")
    with cache_lock("rootfs"):
        if (dest / COMPLETE).is_file():
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        mirror = debian_mirror()
        progress(f"debootstrap {SUITE} arm64 from {mirror} (about 30 s)")
        _run(
            [debootstrap, "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3",
             SUITE, str(tmp), mirror],
            "debootstrap (it needs root and network access to the Debian mirror)",
        )  # fmt: skip
        debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
        if not debs:
            raise UserlandBuildError(f"debootstrap downloaded no packages into {tmp}")
        progress(f"unpacking {len(debs)} arm64 packages")
        for deb in debs:
            _run([dpkg_deb, "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
            deb.unlink()
        if not (tmp / PYTHON_IN_ROOT).is_file():
            raise UserlandBuildError(
                f"the arm64 root has no {PYTHON_IN_ROOT}: did debootstrap include python3?"
            )
        (tmp / COMPLETE).write_text(json.dumps({"suite": SUITE, "mirror": mirror, "packages": len(debs)}))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


@dataclass(frozen=True)
class Emulator:
    path: str
    version: tuple[int, ...]
    source: str  # "env", "cache (Debian trixie)", "host"

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


def _cached_qemu() -> Path | None:
    found = sorted((cache_root() / "qemu").glob("*/qemu-aarch64"))
    return found[-1] if found else None


def _fetch_trixie_qemu(progress: Progress) -> Path:
    """Debian trixie's statically linked qemu-user (10.0): runs on any x86-64 Linux, and runs the
    onnxruntime aarch64 wheels that bookworm's qemu 7.2 crashes on. Fetched with apt-get from the same
    mirror, through a private source list (the machine's apt configuration is left alone)."""
    apt_get = require_tool("apt-get", "apt", "to fetch Debian trixie's qemu-user")
    dpkg_deb = require_tool("dpkg-deb", "dpkg", "to unpack qemu-user")
    work = cache_root() / "qemu" / ".apt"
    args = apt_private_args(work, QEMU_SUITE, debian_mirror())
    progress(f"fetching qemu-user from Debian {QEMU_SUITE} (about 70 MiB)")
    _run([apt_get, *args, "-qq", "update"], f"apt-get update for Debian {QEMU_SUITE}", timeout=600)
    _run(
        [apt_get, *args, "-qq", "download", "qemu-user"], "apt-get download qemu-user", timeout=900, cwd=work
    )
    debs = sorted(work.glob("qemu-user_*.deb"))
    if not debs:
        raise UserlandBuildError("apt-get download qemu-user left no .deb")
    unpack = work / "unpack"
    shutil.rmtree(unpack, ignore_errors=True)
    unpack.mkdir()
    tar = subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(debs[-1])], stdout=subprocess.PIPE)
    proc = subprocess.run(["tar", "-x", "-C", str(unpack), "./usr/bin/qemu-aarch64"], stdin=tar.stdout)
    tar.wait()
    binary = unpack / "usr/bin/qemu-aarch64"
    if proc.returncode != 0 or tar.returncode != 0 or not binary.is_file():
        raise UserlandBuildError(f"could not unpack qemu-aarch64 from {debs[-1].name}")
    version = ".".join(map(str, qemu_version(str(binary))))
    dest = cache_root() / "qemu" / version
    dest.mkdir(parents=True, exist_ok=True)
    shutil.move(str(binary), dest / "qemu-aarch64")
    shutil.rmtree(work, ignore_errors=True)
    return dest / "qemu-aarch64"


def ensure_emulator(ort_version: str, progress: Progress = _noop) -> Emulator:
    """The qemu-aarch64 to use: $NANOFLEET_QEMU_AARCH64, else the cached (or freshly fetched) Debian
    trixie build, else the host's qemu-aarch64-static. Refuses a qemu older than 8 for onnxruntime 1.28+."""
    import os

    env = os.environ.get("NANOFLEET_QEMU_AARCH64")
    if env:
        emu = Emulator(env, qemu_version(env), "env")
    else:
        cached = _cached_qemu()
        fetch_error: Exception | None = None
        if cached is None:
            with cache_lock("qemu"):
                cached = _cached_qemu()
                if cached is None:
                    try:
                        cached = _fetch_trixie_qemu(progress)
                    except (UserlandBuildError, ToolMissingError) as exc:
                        fetch_error = exc
        if cached is not None:
            emu = Emulator(str(cached), qemu_version(str(cached)), f"cache (Debian {QEMU_SUITE})")
        else:
            try:
                host = require_tool(HOST_QEMU, "qemu-user-static", "to emulate the boards' aarch64 CPUs")
            except ToolMissingError as exc:
                raise ToolMissingError(
                    f"{exc.message} (fetching Debian {QEMU_SUITE}'s failed: {fetch_error})"
                ) from exc
            emu = Emulator(host, qemu_version(host), "host")
            progress(f"using the host's qemu {emu.version_text} (fetching trixie's failed: {fetch_error})")
    if emu.version < (8,) and version_at_least(ort_version, "1.28"):
        raise EmulatorTooOldError(
            f"qemu {emu.version_text} ({emu.path}) crashes importing onnxruntime {ort_version} for aarch64 "
            f"(1.28+ need qemu 8 or newer). Let nanofleet fetch Debian {QEMU_SUITE}'s qemu-user "
            "(needs apt-get and the Debian mirror), point NANOFLEET_QEMU_AARCH64 at a newer qemu-aarch64, "
            "or verify with --onnxruntime 1.26"
        )
    return emu
