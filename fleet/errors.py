"""One exception tree for the fleet service. The API layer maps each to an HTTP status."""

from __future__ import annotations

from manifests.errors import NanofleetError


class FleetError(NanofleetError):
    """Base of every error raised by ``fleet``."""

    status_code = 400
    reason = "fleet_error"


class ConfigError(FleetError):
    reason = "config"


class NotFoundError(FleetError):
    status_code = 404
    reason = "not_found"


class ConflictError(FleetError):
    status_code = 409
    reason = "conflict"


class InvalidBundleError(FleetError):
    """An uploaded bundle is incomplete, tampered with, or not signed by a trusted key."""

    status_code = 422
    reason = "invalid_bundle"


class InvalidManifestError(FleetError):
    """A deployment manifest does not validate; ``errors`` names each field's path."""

    status_code = 422
    reason = "invalid_manifest"

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class EnrollmentError(FleetError):
    status_code = 401
    reason = "enrollment"


class BrokerError(FleetError):
    reason = "broker"


class ServiceUnavailableError(FleetError):
    """The service cannot take this now (a backlog, a shutdown, the database away): retry later."""

    status_code = 503
    reason = "unavailable"
