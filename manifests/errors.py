"""The root of every nanofleet exception, and the contract's own tree. Every failure names its reason.

Each package (``export``, ``device.agent``, ``device.engine``, ``device.api``, ``fleet``, offline media)
has one base class derived from :class:`NanofleetError`, so a caller (the CLI, a test) can catch any of our
errors in one place and always finds a one-line ``message`` and a machine-readable ``reason``.
"""

from __future__ import annotations


class NanofleetError(Exception):
    """Base of every error nanofleet raises: a one-line ``message`` and a machine-readable ``reason``."""

    reason: str = "error"

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class ManifestError(NanofleetError):
    """Base of every error raised by ``manifests``."""

    reason = "invalid"


class SchemaError(ManifestError):
    """A document does not match its schema (the message names the field's path)."""

    reason = "schema"


class KeyFormatError(ManifestError):
    """A key file is not an ed25519 key in the expected PEM format."""

    reason = "key_format"


class KeyExistsError(ManifestError):
    """keygen refuses to overwrite an existing key."""

    reason = "key_exists"


class VerificationError(ManifestError):
    """A signed document or bundle failed verification."""


class UnknownKeyError(VerificationError):
    reason = "unknown_key"


class BadSignatureError(VerificationError):
    reason = "bad_signature"


class ExpiredError(VerificationError):
    reason = "expired"


class UnsupportedFormatError(VerificationError):
    reason = "unknown_format_version"


class MissingFileError(VerificationError):
    reason = "missing_file"


class TamperedFileError(VerificationError):
    reason = "tampered_file"


class FileTooLargeError(VerificationError):
    reason = "file_too_large"


class UnsafePathError(VerificationError):
    reason = "unsafe_path"
