"""The board's own identity: an ed25519 key pair made on the board, whose private half never leaves it.

``ensure_device_key(data_dir)`` is what enrolment calls (``nanofleet device enroll``, the Ansible role):
it creates ``<data_dir>/device.key`` (mode 0600) the first time and returns the public half as PEM text,
which goes to the fleet in the enrolment request (``device_public_key``). The same call later returns the
same key, so enrolment can be retried. The key signs what the board hands over without a broker in
between (the offline telemetry export, docs/offline.md): the fleet verifies it with the registered public
half, so nothing the fleet stores (its database holds only hashes of tokens and public keys) is enough to
forge a board's telemetry.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from manifests import SigningKey, fsync_dir
from manifests.errors import KeyFormatError

from .datadir import DataDir
from .errors import AgentError

log = logging.getLogger("nanofleet.agent")
KEY_MODE = 0o600


class DeviceKeyError(AgentError):
    """The board's key is missing or unreadable (the message says what to do)."""

    reason = "device_key"


def ensure_device_key(data_dir: str | Path) -> str:
    """The board's public key (PEM text), creating ``<data_dir>/device.key`` (0600) if there is none."""
    path = DataDir(Path(data_dir)).device_key
    if not path.exists():
        _create(path)
    return load_device_key(data_dir).public_pem().decode("ascii")


def load_device_key(data_dir: str | Path) -> SigningKey:
    """The board's private key; DeviceKeyError if it has none (enrolled before boards had keys)."""
    path = DataDir(Path(data_dir)).device_key
    if not path.exists():
        raise DeviceKeyError(
            f"this board has no device key ({path}); it was enrolled before boards had their own keys: "
            "re-enrol it (`nanofleet device enroll` creates the key and registers its public half)",
            reason="no_device_key",
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:  # readable by others: tighten it rather than go on leaking it
        log.warning("%s had mode %o; set to %o", path, mode, KEY_MODE)
        os.chmod(path, KEY_MODE)
    try:
        return SigningKey.load(path)
    except KeyFormatError as exc:
        raise DeviceKeyError(f"the device key {path} is unreadable: {exc.message}") from exc


def _create(path: Path) -> None:
    """Write the new key under a temp name created 0600 (never readable by others, not even briefly),
    fsync, then link it into place: two enrolments racing keep whichever came first, never half a key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(SigningKey.generate().private_pem())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process made one meanwhile: keep theirs
        except FileExistsError:
            pass
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
