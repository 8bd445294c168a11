"""A new signed version of a bundle's files: `nanofleet bundle resign`, and the demo's v2 and v3.

The files are checked against the source manifest (size and sha256) before anything is signed, so a key
never vouches for files that changed since they were released. The new bundle is assembled in a temporary
folder beside ``--out`` (files hard-linked where the filesystem allows, copied otherwise) and renamed into
place whole: ``--out`` holds a complete, verified bundle or does not exist.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from manifests import (
    BundleManifest,
    ManifestError,
    SigningKey,
    TrustStore,
    fsync_dir,
    read_manifest_unverified,
    verify_bundle,
    verify_file,
    write_signed_manifest,
)

KEEP = "keep"
_DURATION = re.compile(r"^(\d+)\s*([dhw])$")


class ResignError(ManifestError):
    reason = "resign"


def parse_expiry(value: str, *, now: dt.datetime | None = None) -> dt.datetime | None | str:
    """``never``, ``keep`` (the source's expiry), a duration (``90d``, ``12h``, ``2w``) or an ISO date/time."""
    now = now or dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    v = value.strip().lower()
    if v == "never":
        return None
    if v == KEEP:
        return KEEP
    if m := _DURATION.match(v):
        n, unit = int(m.group(1)), m.group(2)
        return now + {"d": dt.timedelta(days=n), "h": dt.timedelta(hours=n), "w": dt.timedelta(weeks=n)}[unit]
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ResignError(
            f"--expires {value!r}: use never, keep, a duration (90d, 12h, 2w) or a date (2027-06-30)"
        ) from None
    when = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    if when <= now:
        raise ResignError(f"--expires {value}: that is in the past")
    return when


def resign_bundle(
    source: Path,
    out: Path,
    key: SigningKey,
    *,
    version: int,
    expires_at: dt.datetime | None | str = KEEP,
    trust: TrustStore | None = None,
    update: dict[str, Any] | None = None,
) -> BundleManifest:
    """Sign ``source``'s files as ``version`` into the new folder ``out``. ``update``: other manifest fields
    to change (the demo's broken golden check). With ``trust``, the source's signature is checked too."""
    if out.exists():
        raise ResignError(f"{out} already exists: give --out a new folder")
    if not source.is_dir():
        raise ResignError(f"{source} does not exist or is not a folder")
    if trust is not None:
        m = verify_bundle(source, trust, now=dt.datetime.min.replace(tzinfo=dt.timezone.utc))
    else:
        m = read_manifest_unverified(source)
        for f in m.files:
            verify_file(source, f)
    if version < 1:
        raise ResignError("--version must be 1 or more")
    fields: dict[str, Any] = {
        "version": version,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
        **(update or {}),
    }
    if expires_at != KEEP:
        fields["expires_at"] = expires_at
    new = BundleManifest.model_validate({**m.model_dump(), **fields})
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.resign-", dir=out.parent))
    try:
        for f in m.files:
            dest = staging / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / f.path, dest)
            except OSError:
                shutil.copy2(source / f.path, dest)
        write_signed_manifest(staging, new, key)
        # What was written must verify with the signing key, as a board will check it.
        verify_bundle(staging, TrustStore([key.public_key]))
        os.replace(staging, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return new
