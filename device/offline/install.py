"""`nanofleet device install PATH`: run the agent's own update state machine on a package from a stick.

Only the transport differs from an online update: the command's bundle URL is the stick folder
(``file://``), which the agent's fetcher copies like a download (capped at the declared sizes, resumable).
Verification, the A/B slots, the health check and rollback are the agent's, unchanged.

Two ways to run it:
- the agent is running (its status file names a live pid): the request is handed to it through
  ``<data_dir>/offline/inbox`` (its offline watcher re-verifies it and queues the command on its one
  update worker), and we wait for the result in the update record; the agent keeps serving throughout;
- no agent is running: the update runs in this process, with a runtime that loads and health-checks the
  new model but does not serve it (the next `nanofleet device run` serves the committed slot).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device.agent.config import AgentConfig
from device.agent.datadir import DataDir
from device.agent.runtime import LoadedModel, ModelRuntime, ServingInfo, make_runtime
from device.agent.states import RESTING
from device.agent.store import StateStore, UpdateRecord
from device.agent.wiring import OutboxEmitter, make_fetcher, make_updater, now_utc, open_outbox
from manifests import BundleManifest, atomic_write_bytes
from manifests.offline.errors import InstallTimeoutError

from .package import VerifiedPackage, select_package

log = logging.getLogger("nanofleet.offline")


@dataclass
class InstallResult:
    outcome: str  # committed | in_service | duplicate | failed | refused | rolled_back
    ok: bool
    package_id: str
    deployment: str
    command_id: str
    bundle: str
    via: str  # "agent" (handed to the running agent) or "direct" (run in this process)
    state: str
    active_slot: str | None
    committed: str | None
    error: str | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class InstallOnlyRuntime:
    """Loads and health-checks through the configured runtime, but serves nothing (no agent running)."""

    def __init__(self, inner: ModelRuntime) -> None:
        self.inner = inner
        self._info: ServingInfo | None = None

    def start(self) -> None:
        pass

    def load(self, bundle_dir: Path, manifest: BundleManifest) -> LoadedModel:
        return self.inner.load(bundle_dir, manifest)

    def serve(self, model: LoadedModel, info: ServingInfo) -> None:
        self._info = info
        model.close()

    def serving(self) -> ServingInfo | None:
        return self._info

    def stats(self) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        pass


def agent_pid(data_dir: Path) -> int | None:
    """The pid of a live agent on this data dir, from the status file it rewrites every second."""
    from device.agent.agent import read_status

    live = read_status(data_dir)
    if not live:
        return None
    pid = int(live.get("pid") or 0)
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _result(pkg: VerifiedPackage, rec: UpdateRecord, via: str, outcome: str | None = None) -> InstallResult:
    committed = rec.committed
    command = pkg.target.command_id
    mine = rec.deployment_id == command
    if outcome is None:
        outcome = (rec.last_result or rec.state.value) if mine else "unknown"
    serves_it = committed is not None and (committed.name, committed.version) == (
        pkg.update.bundle.name,
        pkg.update.bundle.version,
    )
    # Done before counts as success when that install committed, or the board runs the bundle anyway.
    ok = outcome in ("committed", "in_service") or (
        outcome == "duplicate" and ((mine and rec.last_result == "committed") or serves_it)
    )
    return InstallResult(
        outcome=outcome,
        ok=ok,
        package_id=pkg.update.package_id,
        deployment=pkg.update.deployment,
        command_id=command,
        bundle=pkg.ref,
        via=via,
        state=rec.state.value,
        active_slot=rec.active_slot,
        committed=f"{committed.name}@{committed.version}" if committed else None,
        error=rec.error if mine and outcome not in ("committed", "in_service") else None,
        reason=rec.error_reason if mine and outcome not in ("committed", "in_service") else None,
        details={"previous_result": rec.last_result} if outcome == "duplicate" else {},
    )


def verify_for(cfg: AgentConfig, path: Path, rec: UpdateRecord | None = None) -> VerifiedPackage:
    rec = rec or StateStore(cfg.layout.state_file).load()
    return select_package(
        path,
        cfg.trust_store(),
        device_id=cfg.device_id,
        hardware_class=cfg.hardware_class,
        highest_committed=rec.highest_committed,
        max_file_bytes=cfg.limits.max_file_bytes,
    )


def install(
    cfg: AgentConfig, path: Path, *, timeout_s: float = 3600.0, runtime: ModelRuntime | None = None
) -> InstallResult:
    """Verify the package for this board (refusals raise a PackageError; nothing changed), then run it."""
    store = StateStore(cfg.layout.state_file)
    rec = store.load()
    pkg = verify_for(cfg, path, rec)
    command = pkg.target.command_id
    seen = command in rec.seen_deployments or command == rec.deployment_id
    pid = agent_pid(cfg.data_dir)
    if seen and (pid is not None or rec.state in RESTING):
        return _result(pkg, rec, "none", outcome="duplicate")
    if pid is not None:
        return _handoff(cfg, pkg, timeout_s)
    # No agent running: this process owns the update record (an interrupted install is resumed first).
    return _direct(cfg, pkg, runtime)


def _direct(cfg: AgentConfig, pkg: VerifiedPackage, runtime: ModelRuntime | None) -> InstallResult:
    outbox = open_outbox(cfg)
    fetcher = make_fetcher(cfg)
    try:
        emit = OutboxEmitter(outbox, cfg.device_id)  # queued exactly as the running agent queues them
        updater = make_updater(
            cfg, fetcher=fetcher, runtime=InstallOnlyRuntime(runtime or make_runtime(cfg)), emit=emit
        )
        resumed = updater.pending_resume()
        if resumed:  # an earlier install was cut short: finish it (or roll it back) first
            log.warning("an interrupted update (%s) is resumed first", updater.record.state.value)
            updater.resume()
        same = updater.record.deployment_id == pkg.target.command_id
        if resumed and same:  # it was this package's install: the resume finished it
            return _result(pkg, updater.snapshot(), "direct")
        emit(
            "transition",
            f"offline package {pkg.update.package_id} from {pkg.root}",
            deployment_id=pkg.target.command_id,
            bundle=pkg.ref,
            details={"offline": True, "package_id": pkg.update.package_id},
        )
        outcome = updater.handle_desired(pkg.desired())
        rec = updater.snapshot()
        return _result(
            pkg, rec, "direct", outcome=None if outcome not in ("duplicate", "in_service") else outcome
        )
    finally:
        fetcher.close()
        outbox.close()


def submit_request(data_dir: Path, package_root: Path) -> str:
    request_id = uuid.uuid4().hex[:12]
    doc = {
        "request_id": request_id,
        "package": str(Path(package_root).resolve()),
        "ts": now_utc().isoformat(),
    }
    atomic_write_bytes(DataDir(data_dir).offline_inbox / f"{request_id}.json", json.dumps(doc).encode())
    return request_id


def _handoff(cfg: AgentConfig, pkg: VerifiedPackage, timeout_s: float) -> InstallResult:
    request_id = submit_request(cfg.data_dir, pkg.root)
    result_path = cfg.layout.offline_results / f"{request_id}.json"
    store = StateStore(cfg.layout.state_file)
    deadline = time.monotonic() + timeout_s
    accepted = False
    while time.monotonic() < deadline:
        if result_path.is_file():
            res = json.loads(result_path.read_text())
            if not res.get("accepted"):
                result_path.unlink(missing_ok=True)
                rec = store.load()
                r = _result(pkg, rec, "agent", outcome="refused")
                r.ok, r.error, r.reason = False, res.get("error"), res.get("reason")
                return r
            accepted = True
        if accepted:
            rec = store.load()
            if rec.deployment_id == pkg.target.command_id and rec.state in RESTING:
                result_path.unlink(missing_ok=True)
                return _result(pkg, rec, "agent")
        time.sleep(0.2)
    raise InstallTimeoutError(
        f"the running agent did not finish installing {pkg.ref} within {timeout_s:g}s "
        f"({'accepted' if accepted else 'not yet picked up'}); see `nanofleet device status`"
    )
