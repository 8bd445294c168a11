"""Run the verification program (_remote.py) in the emulated board or natively on the build machine.

The emulated run is ``qemu-aarch64 -cpu <cpu> -L <arm64 root> <root>/usr/bin/python3.11 _remote.py JOB``
with PYTHONPATH = (a folder exposing only the repo's device/ and manifests/) + (the aarch64 wheels).
``-L`` makes qemu look up the ELF interpreter and absolute paths in the root first, so the emulated
Python finds its own stdlib and libc while the bundle and the repo are read from the host's file system.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RemoteRunError, UnsupportedCpuError
from .tools import SUPPORTED_CPUS
from .userland import PYTHON_IN_ROOT, Emulator, ensure_emulator, ensure_rootfs
from .wheels import ensure_site

REPO = Path(__file__).resolve().parents[2]
REMOTE = Path(__file__).with_name("_remote.py")
MARKER = "NANOFLEET_RESULT "
# What a board gets of ours: the engine and the contract, nothing else (no export/, fleet/, torch).
DEVICE_PACKAGES = ("device", "manifests")


def check_cpu(cpu: str) -> str:
    if cpu not in SUPPORTED_CPUS:
        choices = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_CPUS.items())
        raise UnsupportedCpuError(f"unknown target CPU {cpu!r}; choose one of: {choices}")
    return cpu


@dataclass(frozen=True)
class TargetEnv:
    """Everything needed to run aarch64 Python for one CPU model and one onnxruntime version."""

    cpu: str
    onnxruntime: str
    emulator: Emulator
    rootfs: Path
    site: Path

    def argv(self, script: Path, job_file: Path) -> list[str]:
        return [self.emulator.path, "-cpu", self.cpu, "-L", str(self.rootfs),
                str(self.rootfs / PYTHON_IN_ROOT), str(script), str(job_file)]  # fmt: skip


def prepare_target(cpu: str, ort_version: str, progress: Callable[[str], None] = lambda _: None) -> TargetEnv:
    """Build (first time) or reuse the cached root, wheels and emulator."""
    check_cpu(cpu)
    emulator = ensure_emulator(ort_version, progress)
    rootfs = ensure_rootfs(progress)
    site = ensure_site(ort_version, progress)
    return TargetEnv(cpu, ort_version, emulator, rootfs, site)


def _device_code_dir(parent: Path) -> Path:
    """A folder holding links to the repo's device/ and manifests/ only (the board's view of our code)."""
    code = parent / "code"
    code.mkdir()
    for name in DEVICE_PACKAGES:
        (code / name).symlink_to(REPO / name, target_is_directory=True)
    return code


def _clean_env(pythonpath: list[Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "TZ")}
    env.update(
        PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONNOUSERSITE="1",
        LANG="C.UTF-8",
        LC_ALL="C.UTF-8",
    )
    return env


@dataclass
class RemoteResult:
    data: dict[str, Any]
    seconds: float
    stderr_tail: str


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the parent dies, so that a killed `verify-target` (Ctrl-C, a test
    timeout) never leaves an orphaned emulator burning CPU for half an hour."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run(argv: list[str], env: dict[str, str], timeout: float, where: str) -> RemoteResult:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise RemoteRunError(f"the {where} run took longer than {timeout:.0f} s and was stopped") from exc
    seconds = time.monotonic() - t0
    stderr_tail = proc.stderr[-3000:]
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return RemoteResult(json.loads(line[len(MARKER) :]), seconds, stderr_tail)
    hint = ""
    if "uncaught target signal" in proc.stderr:
        hint = " (the emulated process crashed: an onnxruntime wheel too new for this qemu?)"
    raise RemoteRunError(
        f"the {where} run exited {proc.returncode} without a result{hint}: {stderr_tail[-800:]}", stderr_tail
    )


def run_on_target(env_: TargetEnv, job: dict[str, Any], timeout: float = 3600) -> RemoteResult:
    with tempfile.TemporaryDirectory(prefix="nanofleet-target-") as tmp:
        tmp_path = Path(tmp)
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(job))
        code = _device_code_dir(tmp_path)
        return _run(
            env_.argv(REMOTE, job_file), _clean_env([code, env_.site]), timeout, f"emulated {env_.cpu}"
        )


def run_on_host(job: dict[str, Any], timeout: float = 3600, python: str | None = None) -> RemoteResult:
    """The same program on the build machine's Python and onnxruntime: the reference the target must match."""
    with tempfile.TemporaryDirectory(prefix="nanofleet-host-") as tmp:
        tmp_path = Path(tmp)
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(job))
        code = _device_code_dir(tmp_path)
        env = _clean_env([code])
        env.pop("PYTHONNOUSERSITE")
        return _run([python or sys.executable, str(REMOTE), str(job_file)], env, timeout, "host")
