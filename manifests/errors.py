"""One exception tree for the contract. Every verification failure names its reason."""

from __future__ import annotations


class ManifestError(Exception):
    """Base of every error raised by ``manifests``."""

    reason: str = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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
