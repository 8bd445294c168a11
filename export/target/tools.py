"""Where the target pieces live and which host tools build them: cache folders, locks, qemu, debootstrap.

Cache layout (``$NANOFLEET_TARGET_CACHE``, else ``$XDG_CACHE_HOME/nanofleet/target``, else
``~/.cache/nanofleet/target``)::

    rootfs/debian-bookworm-arm64/      the unpacked Debian arm64 userland (python3.11), + .complete
    qemu/<version>/qemu-aarch64        a static qemu-user from Debian trixie (runs onnxruntime 1.28+)
    wheels/ort-<v>-cp311/site/         the aarch64 wheels, unzipped: onnxruntime, numpy, tokenizers, ...
    locks/                             flock files: concurrent builders wait instead of racing
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .errors import ToolMissingError

# The boards: Raspberry Pi 4 (Cortex-A72), Pi 5 (Cortex-A76), Jetson Orin (Cortex-A78AE: qemu has no such
# model; Neoverse-N1 shares the A76 microarchitecture generation). Never qemu's default `max`: it enables
# i8mm/SVE/SME paths no board has, and gave garbage for dynamic INT8 (FACTS.md).
SUPPORTED_CPUS: dict[str, str] = {
    "cortex-a72": "Raspberry Pi 4 (ARMv8.0-A: no dot product)",
    "cortex-a76": "Raspberry Pi 5 (ARMv8.2-A: dot product, fp16)",
    "neoverse-n1": "stand-in for Jetson Orin's Cortex-A78AE (ARMv8.2-A)",
}

DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# The suite whose static qemu-user runs onnxruntime 1.28+ (qemu 10.0); bookworm's 7.2 crashes them.
QEMU_SUITE = "trixie"
HOST_QEMU = "qemu-aarch64-static"


def cache_root() -> Path:
    env = os.environ.get("NANOFLEET_TARGET_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nanofleet" / "target"


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """An exclusive flock so two builds of the same piece (two test workers, two exports) never race."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def require_tool(name: str, package: str, why: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if not path:
        raise ToolMissingError(
            f"{name} is not installed; it is needed {why}. Install it with: "
            f"sudo apt-get install {package}   (or run scripts/ensure_services.sh, which does it)"
        )
    return path


def debian_mirror() -> str:
    """The Debian URI apt on this machine uses (its mirror or proxy), else deb.debian.org."""
    env = os.environ.get("NANOFLEET_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    candidates: list[Path] = [Path("/etc/apt/sources.list")]
    src_dir = Path("/etc/apt/sources.list.d")
    if src_dir.is_dir():
        candidates += sorted(src_dir.glob("*.sources")) + sorted(src_dir.glob("*.list"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            m = re.match(r"URIs:\s*(\S+)", line) or re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            if m and "/debian" in m.group(1) and "security" not in m.group(1):
                return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def qemu_version(path: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolMissingError(f"cannot run {path}: {exc}") from exc
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        raise ToolMissingError(f"{path} --version printed no version: {out[:200]!r}")
    return tuple(int(x) for x in m.groups() if x is not None)


def apt_private_args(workdir: Path, suite: str, mirror: str) -> list[str]:
    """apt options for a private, throw-away source list: fetch one .deb of another suite without
    touching the machine's apt configuration."""
    for sub in ("lists/partial", "cache/archives/partial"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    signed = f"[signed-by={keyring}] " if Path(keyring).is_file() else ""
    (workdir / "sources.list").write_text(f"deb {signed}{mirror} {suite} main\n")
    return [
        "-o", f"Dir::Etc::SourceList={workdir / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={workdir / 'lists'}",
        "-o", f"Dir::Cache={workdir / 'cache'}",
        "-o", "Dir::State::status=/dev/null",
        "-o", "APT::Sandbox::User=root",
        "-o", "Debug::NoLocking=1",
    ]  # fmt: skip
