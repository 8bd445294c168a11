"""One exception tree for target verification. Each error names what failed and what to do about it."""

from __future__ import annotations

from export.errors import ExportError


class TargetError(ExportError):
    """Base of every error raised by ``export.target``."""

    reason = "target_error"


class ToolMissingError(TargetError):
    """qemu-aarch64 / debootstrap / dpkg-deb / pip is not installed (the message says how to install it)."""

    reason = "tool_missing"


class UnsupportedCpuError(TargetError):
    reason = "unsupported_cpu"


class UserlandBuildError(TargetError):
    """debootstrap or unpacking the arm64 root failed."""

    reason = "userland_build"


class WheelDownloadError(TargetError):
    """pip could not fetch the aarch64 wheels."""

    reason = "wheel_download"


class EmulatorTooOldError(TargetError):
    """The qemu at hand cannot run this onnxruntime (1.28+ crash at import under qemu 7.2)."""

    reason = "emulator_too_old"


class RemoteRunError(TargetError):
    """The verification program crashed or printed no result (in the emulator or on the host)."""

    reason = "remote_run"

    def __init__(self, message: str, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.stderr_tail = stderr_tail


class TargetRefusedError(TargetError):
    """The bundle was refused before running (signature, files, or runtime compatibility)."""

    reason = "refused"

    def __init__(self, message: str, reason: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.problems = problems or []


class BadInputError(TargetError):
    reason = "bad_input"
