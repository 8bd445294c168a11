"""Secrets the fleet hands out (enrolment tokens, device tokens): made here, stored only as hashes."""

from __future__ import annotations

import hashlib
import secrets

DEVICE_TOKEN_PREFIX = "nfd_"
ENROLLMENT_TOKEN_PREFIX = "nfe_"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_device_token() -> str:
    """A device's bearer token for the REST API, and its MQTT password."""
    return DEVICE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_enrollment_token() -> str:
    return ENROLLMENT_TOKEN_PREFIX + secrets.token_urlsafe(24)
