"""The operator's side: write an update package onto a stick, read telemetry exports off it.

Writing is all or nothing: free space is checked first (a dry run gives the size), everything goes into a
dot-named temp folder on the stick itself (same filesystem, so the final rename is atomic), each file is
fsynced and checked against its sha256 as it is written, ``package.json`` last, then the folder is renamed
to its final name and the stick's folder fsynced. A stick pulled (or a SIGKILL) mid-copy leaves at most a
dot-named temp folder, which devices ignore and the next export removes.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manifests import atomic_write_bytes
from manifests.offline.errors import MediaError, OfflineError
from manifests.offline.format import DEPLOYMENT_DOC, PACKAGE_DOC, PACKAGE_PREFIX, TELEMETRY_SUFFIX, TEMP_PREFIX
from manifests.offline.media import (
    check_room,
    fsync_tree,
    publish_dir,
    remove_quietly,
    temp_dir_in,
    write_synced,
)

if TYPE_CHECKING:
    from ..client import FleetClient

PAUSE_ENV = "NANOFLEET_OFFLINE_PAUSE_IN"  # test hook: "export-update" pauses half-way through the copy
CHUNK = 1 << 20


@dataclass
class PackageWritten:
    path: str
    package_id: str
    deployment: str
    bundle: str
    devices: list[str]
    bytes: int
    expires_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pause(out_dir: Path, what: str) -> None:
    if os.environ.get(PAUSE_ENV) == what:
        atomic_write_bytes(out_dir.parent / f"paused-in-{what}", b"")
        threading.Event().wait()


def clean_stale_temp(out_dir: Path) -> list[str]:
    """Remove temp folders/files an interrupted export left on the stick."""
    removed = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if p.name.startswith(TEMP_PREFIX):
                remove_quietly(p)
                removed.append(p.name)
    return removed


def write_package(
    client: FleetClient,
    deployment: str,
    out_dir: Path,
    *,
    devices: list[str] | None = None,
    all_waves: bool = False,
    valid_days: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> PackageWritten:
    out_dir = Path(out_dir)
    request = {"devices": devices or None, "all_waves": all_waves, "valid_days": valid_days}
    plan = client.offline_package(deployment, **request, dry_run=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temp(out_dir)
    check_room(out_dir, int(plan["total_size"]) + 64 * 1024)
    resp = client.offline_package(deployment, **request)
    total = int(resp["total_size"])
    tmp = temp_dir_in(out_dir)
    done = 0
    try:
        write_synced(tmp / DEPLOYMENT_DOC, resp["deployment_yaml"].encode("utf-8"))
        bdir = tmp / resp["bundle_path"]
        write_synced(bdir / "manifest.yaml", resp["manifest_yaml"].encode("utf-8"))
        write_synced(bdir / "manifest.sig", resp["signature"].encode("utf-8"))
        files = resp["bundle_files"]
        for i, f in enumerate(files):
            if i == len(files) // 2 or (len(files) == 1 and i == 0):
                _pause(out_dir, "export-update")
            done = _download(client, f, bdir / f["path"], done, total, progress)
        # The signed document goes in last: a folder without it is not a package to any reader.
        write_synced(tmp / PACKAGE_DOC, json.dumps(resp["document"], indent=1).encode("utf-8"))
        fsync_tree(tmp)
        final = out_dir / f"{PACKAGE_PREFIX}{resp['package_id']}"
        publish_dir(tmp, final)
    except BaseException:
        remove_quietly(tmp)
        raise
    return PackageWritten(
        path=str(final),
        package_id=resp["package_id"],
        deployment=resp["deployment"],
        bundle=resp["bundle"],
        devices=list(resp["devices"]),
        bytes=total,
        expires_at=resp["expires_at"],
    )


def _download(
    client: FleetClient,
    f: dict[str, Any],
    dest: Path,
    done: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> int:
    import hashlib

    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    n = 0
    try:
        with client.http.stream("GET", f["url"]) as r, open(dest, "wb") as fh:
            if r.status_code != 200:
                raise OfflineError(f"GET {f['url']}: HTTP {r.status_code}", reason="fleet_http")
            for chunk in r.iter_bytes(CHUNK):
                n += len(chunk)
                if n > f["size"]:
                    raise OfflineError(f"{f['path']} is larger than the registry says", reason="tampered")
                fh.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise MediaError(f"cannot write {dest}: {exc.strerror}") from exc
    if n != f["size"] or h.hexdigest() != f["sha256"]:
        raise OfflineError(f"{f['path']} does not match the registry's size/sha256", reason="tampered")
    return done


def telemetry_files(path: Path) -> list[Path]:
    """Export files in ``path`` (a file, or a folder searched two levels deep); temp names skipped."""
    path = Path(path)
    if path.is_file():
        return [path]
    found: list[Path] = []
    if not path.is_dir():
        raise OfflineError(f"{path} does not exist", reason="no_file")
    for depth_glob in (f"*{TELEMETRY_SUFFIX}", f"*/*{TELEMETRY_SUFFIX}"):
        found += [p for p in sorted(path.glob(depth_glob)) if not p.name.startswith(".")]
    return found


def import_files(client: FleetClient, path: Path) -> list[dict[str, Any]]:
    """POST each export file; one refused file is reported and the others still import."""
    results = []
    files = telemetry_files(path)
    if not files:
        raise OfflineError(f"no telemetry exports (*{TELEMETRY_SUFFIX}) found in {path}", reason="no_file")
    from fleet.errors import FleetError

    for f in files:
        try:
            res = client.import_telemetry(f.read_bytes())
            results.append({"file": str(f), "ok": True, **res})
        except FleetError as exc:
            results.append({"file": str(f), "ok": False, "error": exc.message, "reason": exc.reason})
        except OSError as exc:
            results.append(
                {"file": str(f), "ok": False, "error": f"cannot read: {exc.strerror}", "reason": "media_io"}
            )
    return results
