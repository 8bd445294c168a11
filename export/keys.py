"""The signing key for export: --key, else the default key in ~/.config/nanofleet/keys (made on first use)."""

from __future__ import annotations

import os
from pathlib import Path

from manifests import KeyFormatError, SigningKey, write_keypair
from manifests.signing import PRIVATE_KEY_NAME

from .errors import SigningKeyError


def default_key_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nanofleet" / "keys"


def load_signing_key(path: Path | None) -> tuple[SigningKey, Path, bool]:
    """Returns (key, private key path, created). Creates the default key (keygen semantics) when needed."""
    created = False
    if path is None:
        path = default_key_dir() / PRIVATE_KEY_NAME
        if not path.exists():
            write_keypair(path.parent)
            created = True
    try:
        return SigningKey.load(path), path, created
    except KeyFormatError as exc:
        raise SigningKeyError(exc.message) from exc
