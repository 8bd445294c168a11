"""`nanofleet device export-telemetry`: the store-and-forward queue, carried home on a stick.

The file holds every queued telemetry sample and event (update transitions and results among them) plus
the current reported update state, signed with the board's own ed25519 key (``<data_dir>/device.key``,
made at enrolment: device/agent/identity.py); the fleet verifies it with the public half registered at
enrolment. It is written atomically (temp name on the stick, fsync, rename, fsync the folder).
Only once it is on the stick are the exported entries taken out of the queue, in one transaction: the
stick is their acknowledgement, as a PUBACK is online, so the MQTT path never sends them again. A copy
stays in ``<data_dir>/offline/exported`` (last N) in case the stick is lost before it reaches the fleet.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from device.agent.config import AgentConfig
from device.agent.identity import DeviceKeyError, load_device_key
from device.agent.store import StateStore
from device.agent.wiring import agent_version, now_utc, reported_state
from manifests import atomic_write_bytes
from manifests.offline.errors import MediaError, OfflineError
from manifests.offline.format import (
    TEMP_PREFIX,
    ExportedEntry,
    TelemetryExport,
    TelemetryFile,
    sign_telemetry,
    telemetry_file_name,
)
from manifests.offline.media import check_room

PAUSE_ENV = "NANOFLEET_OFFLINE_PAUSE_IN"  # test hook: "export-telemetry" pauses after writing half the file


@dataclass
class ExportResult:
    path: str
    export_id: str
    device_id: str
    telemetry: int
    events: int
    bytes: int
    reported_state: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_outbox(path: Path) -> tuple[list[tuple[int, str, bytes]], int]:
    if not path.exists():
        return [], 0
    db = sqlite3.connect(str(path), timeout=30)
    try:
        db.execute("PRAGMA busy_timeout=30000")
        rows = db.execute("SELECT id, topic, payload FROM outbox ORDER BY id").fetchall()
        row = db.execute("SELECT v FROM meta WHERE k='dropped'").fetchone()
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows], int(row[0]) if row else 0
    except sqlite3.OperationalError:
        return [], 0  # no table yet: the agent never queued anything
    finally:
        db.close()


def _delete_exported(path: Path, ids: list[int]) -> None:
    db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("BEGIN IMMEDIATE")
        db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])
        db.execute("COMMIT")
    finally:
        db.close()


def build_export(cfg: AgentConfig) -> tuple[TelemetryFile, TelemetryExport, list[int]]:
    try:  # first: a board that cannot sign must not be told its export worked
        key = load_device_key(cfg.data_dir)
    except DeviceKeyError as exc:
        raise OfflineError(f"cannot sign the telemetry export: {exc.message}", reason=exc.reason) from exc
    rows, dropped = _read_outbox(cfg.layout.outbox_file)
    rec = StateStore(cfg.layout.state_file).load()
    # As the agent would report it, stamped with the record's own time (the export may run much later).
    rep = reported_state(cfg, rec, version=agent_version(), ts=rec.updated_at or now_utc())
    body = TelemetryExport(
        export_id=now_utc().strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8],
        device_id=cfg.device_id,
        created_at=now_utc(),
        agent_version=rep.agent_version,
        outbox_dropped=dropped,
        reported=json.loads(rep.to_bytes()),
        entries=[ExportedEntry(topic=t, payload=p.decode("utf-8", errors="replace")) for _, t, p in rows],
    )
    f = sign_telemetry(cfg.device_id, body.model_dump_json().encode("utf-8"), key)
    return f, body, [i for i, _, _ in rows]


def _write_to_media(out_dir: Path, name: str, data: bytes) -> Path:
    """Temp file on the stick, fsync, rename, fsync the folder (the test hook can stop it half-way)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tmp = out_dir / f"{TEMP_PREFIX}{name}"
    try:
        with open(tmp, "wb") as fh:
            half = len(data) // 2
            fh.write(data[:half])
            if os.environ.get(PAUSE_ENV) == "export-telemetry":
                fh.flush()
                os.fsync(fh.fileno())
                atomic_write_bytes(out_dir.parent / "paused-in-export-telemetry", b"")
                import threading

                threading.Event().wait()
            fh.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        from manifests import fsync_dir

        fsync_dir(out_dir)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise MediaError(f"cannot write {final}: {exc.strerror}") from exc
    return final


def export_telemetry(cfg: AgentConfig, out_dir: Path, *, keep: int = 10) -> ExportResult:
    f, body, ids = build_export(cfg)
    data = f.model_dump_json().encode("utf-8")
    out_dir = Path(out_dir)
    check_room(out_dir, len(data))
    name = telemetry_file_name(cfg.device_id, body.export_id)
    path = _write_to_media(out_dir, name, data)
    # On the stick and synced: now (and only now) the entries leave the queue.
    if ids:
        try:
            _delete_exported(cfg.layout.outbox_file, ids)
        except sqlite3.Error as exc:
            raise OfflineError(
                f"the export is on the stick ({path}) but the queue could not be updated: {exc}; "
                "the fleet de-duplicates by sequence number, so re-sending them is harmless"
            ) from exc
    if keep > 0:
        archive = cfg.layout.offline_exported
        atomic_write_bytes(archive / name, data)
        old = sorted(archive.glob(f"*{Path(name).suffix}"), key=lambda p: p.stat().st_mtime)
        for p in old[:-keep]:
            p.unlink(missing_ok=True)
    n_tel = sum(1 for e in body.entries if e.topic.endswith("/telemetry"))
    return ExportResult(
        path=str(path),
        export_id=body.export_id,
        device_id=cfg.device_id,
        telemetry=n_tel,
        events=len(body.entries) - n_tel,
        bytes=len(data),
        reported_state=(body.reported or {}).get("state"),
    )
