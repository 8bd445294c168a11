"""Inside the running agent: pick up update packages from watched folders (a stick appearing under
/media) and from `nanofleet device install` requests, and queue them on the agent's one update worker.

A package is acted on once (remembered by the sha256 of its signed document in
``<data_dir>/offline/handled.json``), so a stick left in the board does not re-trigger it; a refused package
is reported once as a ``refused`` event. When a pickup for this board finishes, the telemetry export is
written onto the same stick (``offline.export_telemetry_on_pickup``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from device.agent.config import AgentConfig
from device.agent.states import RESTING
from device.agent.store import UpdateRecord
from manifests import TrustStore, atomic_write_bytes
from manifests.mqtt import DesiredState
from manifests.offline.errors import NotForThisDeviceError, OfflineError, PackageError

from .package import VerifiedPackage, find_packages, verify_package

if TYPE_CHECKING:
    from device.agent.agent import Agent

log = logging.getLogger("nanofleet.offline")
MAX_HANDLED = 256


class AgentLike(Protocol):
    config: AgentConfig
    trust: TrustStore

    def submit(self, desired: DesiredState) -> None: ...

    def emit(self, kind: str, message: str, **fields: Any) -> None: ...


@dataclass
class _Pending:
    pkg: VerifiedPackage
    export_to: Path | None


class OfflineWatcher:
    def __init__(self, agent: AgentLike, snapshot: Callable[[], UpdateRecord]) -> None:
        self.agent = agent
        self.cfg = agent.config
        self.snapshot = snapshot
        self.layout = self.cfg.layout
        self.handled: list[str] = self._load_handled()
        self.pending: list[_Pending] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="offline-watcher", daemon=True)

    @classmethod
    def for_agent(cls, agent: Agent) -> OfflineWatcher:
        """The running agent's extension (device.agent.agent.ExtensionFactory): started once it serves."""
        return cls(agent, agent.updater.snapshot)

    def start(self) -> None:
        self.layout.offline_inbox.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _load_handled(self) -> list[str]:
        try:
            return list(json.loads(self.layout.offline_handled.read_text()))
        except (OSError, ValueError):
            return []

    def _mark(self, key: str) -> None:
        if key not in self.handled:
            self.handled = [*self.handled, key][-MAX_HANDLED:]
            atomic_write_bytes(self.layout.offline_handled, json.dumps(self.handled).encode())

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception:  # noqa: BLE001 - a bad stick must never stop the agent
                log.exception("offline watcher scan failed")
            self._stop.wait(self.cfg.offline.poll_interval_s)

    # ---- one scan ---------------------------------------------------------------------------------
    def scan_once(self) -> None:
        self._requests()
        for watch in self.cfg.offline.watch_dirs:
            for root in find_packages(watch):
                self._pickup(root, watch)
        self._finish_pending()

    def _verify(self, root: Path) -> VerifiedPackage:
        rec = self.snapshot()
        return verify_package(
            root,
            self.agent.trust,
            device_id=self.cfg.device_id,
            hardware_class=self.cfg.hardware_class,
            highest_committed=rec.highest_committed,
            max_file_bytes=self.cfg.limits.max_file_bytes,
        )

    def _requests(self) -> None:
        inbox = self.layout.offline_inbox
        if not inbox.is_dir():
            return
        for req_path in sorted(inbox.glob("*.json")):
            try:
                req = json.loads(req_path.read_text())
                pkg = self._verify(Path(req["package"]))
            except (OfflineError, OSError, ValueError, KeyError) as exc:
                message = getattr(exc, "message", str(exc))
                reason = getattr(exc, "reason", "bad_request")
                self.agent.emit("refused", f"offline package refused: {message}", details={"reason": reason})
                self._answer(req_path, {"accepted": False, "error": message, "reason": reason})
                continue
            self._mark(pkg.doc_sha256)
            self._queue(pkg, None)
            self._answer(req_path, {"accepted": True, "command_id": pkg.target.command_id})

    def _answer(self, req_path: Path, result: dict[str, Any]) -> None:
        atomic_write_bytes(self.layout.offline_results / req_path.name, json.dumps(result).encode())
        req_path.unlink(missing_ok=True)

    def _export_dir(self, root: Path, watch: Path) -> Path | None:
        """The stick's folder holding the package (never above the watched folder, never the package)."""
        if not self.cfg.offline.export_telemetry_on_pickup or root == watch:
            return None
        return root.parent

    def _pickup(self, root: Path, watch: Path) -> None:
        import hashlib

        try:
            key = hashlib.sha256((root / "package.json").read_bytes()).hexdigest()
        except OSError:
            return
        if key in self.handled:
            return
        try:
            pkg = self._verify(root)
        except NotForThisDeviceError:
            self._mark(key)  # another board's package: quietly ignored
            return
        except PackageError as exc:
            log.warning("offline package %s refused: %s", root, exc.message)
            self.agent.emit(
                "refused",
                f"offline package {root.name} refused: {exc.message}",
                details={"reason": exc.reason, "offline": True},
            )
            self._mark(key)
            return
        self._mark(key)
        rec = self.snapshot()
        cmd = pkg.target.command_id
        if cmd in rec.seen_deployments or cmd == rec.deployment_id:
            log.info("offline package %s: command %s was handled before", root.name, cmd)
            self.pending.append(_Pending(pkg, self._export_dir(root, watch)))
            return
        log.info("offline package %s picked up from %s", pkg.update.package_id, root)
        self._queue(pkg, self._export_dir(root, watch))

    def _queue(self, pkg: VerifiedPackage, export_to: Path | None) -> None:
        self.agent.emit(
            "transition",
            f"offline package {pkg.update.package_id} from {pkg.root}",
            deployment_id=pkg.target.command_id,
            bundle=pkg.ref,
            details={"offline": True, "package_id": pkg.update.package_id},
        )
        self.agent.submit(pkg.desired())
        self.pending.append(_Pending(pkg, export_to))

    def _finish_pending(self) -> None:
        if not self.pending:
            return
        rec = self.snapshot()
        still: list[_Pending] = []
        for p in self.pending:
            if not (rec.deployment_id == p.pkg.target.command_id and rec.state in RESTING):
                still.append(p)
                continue
            if p.export_to is not None:
                from .telemetry import export_telemetry

                try:
                    res = export_telemetry(self.cfg, p.export_to, keep=self.cfg.offline.archive_exports)
                    log.info(
                        "telemetry exported to %s (%d telemetry, %d events)",
                        res.path,
                        res.telemetry,
                        res.events,
                    )
                except (OfflineError, OSError) as exc:
                    log.warning("telemetry export to %s failed: %s", p.export_to, exc)
        self.pending = still
