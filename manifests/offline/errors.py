"""One exception tree for offline media (both the device and the fleet side). Each names a ``reason``."""

from __future__ import annotations


class OfflineError(Exception):
    """Base of every error raised by ``device.offline`` and ``fleet.offline``."""

    reason: str = "offline_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class MediaTooSmallError(OfflineError):
    """The stick has less free space than the package or file needs (checked before writing)."""

    reason = "media_too_small"


class MediaError(OfflineError):
    """The stick cannot be read or written (removed, read-only, I/O error)."""

    reason = "media_io"


class PackageError(OfflineError):
    """An update package is refused; nothing on the device changed."""

    reason = "package_refused"


class NoPackageError(PackageError):
    reason = "no_package"


class PackageFormatError(PackageError):
    reason = "schema"


class PackageSignatureError(PackageError):
    reason = "bad_signature"


class PackageExpiredError(PackageError):
    reason = "expired"


class NotForThisDeviceError(PackageError):
    reason = "not_for_this_device"


class PackageTamperedError(PackageError):
    reason = "tampered"


class PackageRollbackError(PackageError):
    reason = "anti_rollback"


class TelemetryFileError(OfflineError):
    """A telemetry export is refused (truncated, corrupt, wrong MAC, unknown device); nothing ingested."""

    reason = "telemetry_refused"


class InstallTimeoutError(OfflineError):
    reason = "timeout"
