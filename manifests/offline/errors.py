"""One exception tree for offline media (both the device and the fleet side). Each names a ``reason``."""

from __future__ import annotations

from ..errors import NanofleetError


class OfflineError(NanofleetError):
    """Base of every error raised by ``device.offline`` and ``fleet.offline``."""

    reason = "offline_error"


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


class InstallTimeoutError(OfflineError):
    reason = "timeout"
