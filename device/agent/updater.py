"""The OTA update flow: drives the state machine of ``states.py`` over slots, fetcher, runtime and disk.

Security order (nothing unverified is used): fetch manifest + signature (small, capped) → manifest sha256
vs the desired reference → signature against the trusted keys → format/expiry → name/version match →
anti-rollback → per-file caps and free disk → download each file (capped at its declared size, resumable)
→ every file's path, size and sha256 → install → load + health check → drain-swap → commit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin

from manifests import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleManifest,
    TrustStore,
    atomic_write_bytes,
    verify_bundle,
    verify_manifest_bytes,
)
from manifests.bundle import check_not_expired
from manifests.errors import ManifestError, SchemaError, VerificationError
from manifests.mqtt import BundleRef, DesiredState, RollbackAuthorization, SlotInfo
from manifests.runtime_compat import RuntimeIncompatibleError, check_local_runtime

from .adapters import AdapterUpdater
from .datadir import DataDir
from .disk import Disk, RealDisk, is_disk_full
from .errors import (
    AgentError,
    AntiRollbackError,
    DiskFullError,
    InjectedError,
    ModelLoadError,
    RefusedError,
    UpdateError,
)
from .fetch import Fetcher
from .reuse import DownloadStats, fetch_file, held_files
from .runtime import ModelRuntime, ServingInfo, health_check
from .slots import Slots
from .states import IN_FLIGHT, RESTING, Event, Resume, State, next_state, resume_action
from .store import SlotName, StateStore, UpdateRecord, other_slot

log = logging.getLogger("nanofleet.agent")

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024
PAUSE_ENV = "NANOFLEET_AGENT_PAUSE_IN"
FAIL_ENV = "NANOFLEET_AGENT_FAIL_IN"

EmitFn = Callable[..., None]  # emit(kind, message, **fields)


class Hooks(Protocol):
    def on_enter(self, state: State) -> None: ...

    def on_progress(self, state: State, done: int, total: int) -> None: ...


class NoHooks:
    def on_enter(self, state: State) -> None:
        pass

    def on_progress(self, state: State, done: int, total: int) -> None:
        pass


class EnvHooks:
    """Test hooks for real agent processes (table-driven killed_in_/error_in_ tests).

    NANOFLEET_AGENT_PAUSE_IN=<state>: on entering <state> (for downloading: once half the bytes are on
    disk), write ``<data_dir>/paused-in-<state>`` and stop there until killed.
    NANOFLEET_AGENT_FAIL_IN=<state>: raise an InjectedError on entering <state>.
    Both fire once per process.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.pause_in = os.environ.get(PAUSE_ENV) or None
        self.fail_in = os.environ.get(FAIL_ENV) or None

    def _pause(self, state: State) -> None:
        self.pause_in = None
        atomic_write_bytes(DataDir(self.data_dir).paused_marker(state.value), b"")
        log.warning("test hook: paused in %s until killed", state.value)
        threading.Event().wait()

    def on_enter(self, state: State) -> None:
        if self.fail_in == state.value:
            self.fail_in = None
            raise InjectedError(f"injected failure in {state.value}")
        if self.pause_in == state.value and state is not State.DOWNLOADING:
            self._pause(state)

    def on_progress(self, state: State, done: int, total: int) -> None:
        if self.pause_in == state.value and total and done * 2 >= total:
            self._pause(state)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Updater:
    """Owns the update record. Call ``startup`` once, then ``resume``/``handle_desired`` from ONE thread."""

    def __init__(
        self,
        *,
        data_dir: Path,
        device_id: str,
        trust: TrustStore,
        fetcher: Fetcher,
        runtime: ModelRuntime,
        artifacts_base_url: str,
        disk: Disk | None = None,
        hooks: Hooks | None = None,
        emit: EmitFn | None = None,
        on_change: Callable[[UpdateRecord], None] | None = None,
        max_file_bytes: int = 16 * 1024**3,
        disk_margin_bytes: int = 256 * 1024**2,
        max_memory_bytes: int | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.data_dir = data_dir
        self.device_id = device_id
        self.trust = trust
        self.fetcher = fetcher
        self.runtime = runtime
        self.base_url = artifacts_base_url
        self.disk = disk or RealDisk()
        self.hooks = hooks or NoHooks()
        self._emit = emit or (lambda *a, **k: None)
        self._on_change = on_change or (lambda r: None)
        self.max_file_bytes = max_file_bytes
        self.disk_margin_bytes = disk_margin_bytes
        self.max_memory_bytes = max_memory_bytes
        self.clock = clock
        self.store = StateStore(DataDir(data_dir).state_file)
        self.slots = Slots(data_dir)
        self.record = self.store.load()
        self._lock = threading.Lock()
        self._manifest: BundleManifest | None = None  # the in-flight target's verified manifest
        # Why the committed slot does not serve (it no longer verifies or loads), until one serves again:
        # reported with the state (the record itself still says what is committed) and it keeps a
        # desired state for that same bundle from being taken as already in service.
        self.serving_error: UpdateError | None = None
        self.adapters = AdapterUpdater(self)  # adapter deployments (adapters.py): same record, same edges
        self.download_stats: DownloadStats | None = None  # bytes of this process's last bundle download

    # ---- the one place a state changes -------------------------------------------------------------
    def _fire(self, event: Event, **changes: Any) -> State:
        with self._lock:
            old = self.record.state
            new = next_state(old, event)
            rec = self.record.model_copy(deep=True)
            for k, v in changes.items():
                setattr(rec, k, v)
            rec.state = new
            self.store.save(rec)  # persisted before anyone acts on the new state
            self.record = rec
        log.info("update %s --%s--> %s", old.value, event.value, new.value)
        self._emit(
            "transition",
            f"{old.value} -> {new.value}",
            from_state=old.value,
            to_state=new.value,
            deployment_id=rec.deployment_id,
            bundle=self._target_ref(),
        )
        self._on_change(rec)
        return new

    def emit(self, kind: str, message: str, **fields: Any) -> None:
        """An event in the agent's stream (telemetry and the local log), as the update machine emits them."""
        self._emit(kind, message, **fields)

    def save_record(self, **changes: Any) -> None:
        """Persist changed fields of the update record (the adapter flow shares the record with the machine)."""
        with self._lock:
            rec = self.record.model_copy(deep=True)
            for k, v in changes.items():
                setattr(rec, k, v)
            self.store.save(rec)
            self.record = rec
        self._on_change(rec)

    def snapshot(self) -> UpdateRecord:
        with self._lock:
            return self.record.model_copy(deep=True)

    def _target_ref(self) -> str | None:
        t = self.record.target
        return f"{t.name}@{t.version}" if t else None

    # ---- start-up ----------------------------------------------------------------------------------
    def startup(self) -> None:
        """Serve the active slot (verified first). Call before ``resume``.

        A committed model that no longer loads is reported, not fatal: the agent stays up (and reachable
        by the fleet) so that a new deployment can fix the board."""
        try:
            self.ensure_serving()
        except UpdateError as exc:
            self.serving_error = exc
            log.error("the committed model does not load: %s", exc.message)
            self._emit(
                "error",
                f"the committed model does not load: {exc.message}",
                details={"reason": exc.reason, "slot": self.record.active_slot},
            )

    def bootstrap(self, bundle_dir: Path) -> str | None:
        """First start with an empty device: install a local bundle through the normal, verified path."""
        rec = self.record
        if rec.active_slot is not None or rec.state not in RESTING or "bootstrap" in rec.seen_deployments:
            return None
        from manifests import read_manifest_unverified

        m = read_manifest_unverified(bundle_dir)  # only for name/version: everything is verified after
        desired = DesiredState(
            device_id=self.device_id,
            deployment_id="bootstrap",
            bundle=BundleRef(name=m.name, version=m.version, base_url=bundle_dir.resolve().as_uri() + "/"),
            issued_at=self.clock(),
        )
        return self.handle_desired(desired)

    def pending_resume(self) -> bool:
        return self.record.state not in RESTING

    def resume(self) -> None:
        """Apply the resume map to the persisted state (after a crash or power cut)."""
        state = self.record.state
        action = resume_action(state)
        if action is Resume.NOTHING:
            return
        log.warning("resuming after restart in %s: %s", state.value, action.value)
        self._emit(
            "transition",
            f"restarted in {state.value}: {action.value}",
            from_state=state.value,
            to_state=state.value,
            deployment_id=self.record.deployment_id,
            bundle=self._target_ref(),
            details={"resume": action.value},
        )
        if action is Resume.REVERIFY:
            self._fire(Event.RESUME)
        elif action is Resume.ROLLBACK and state is not State.ROLLING_BACK:
            self._fire(
                Event.ERROR,
                error=f"agent restarted during {state.value}",
                error_reason="restarted",
                error_state=state.value,
                last_result="rolled_back",
            )
        self._run()

    def ensure_serving(self) -> ServingInfo | None:
        """Load and serve the active slot unless it is already serving; its files are verified first."""
        rec = self.record
        slot = rec.active_slot
        if slot is None or rec.slots.get(slot) is None:
            return None
        current = self.runtime.serving()
        info = rec.slots[slot]
        assert info is not None
        if current is not None and current.slot == slot and current.manifest_sha256 == info.manifest_sha256:
            return current
        path = self.slots.path(slot)
        try:
            manifest = verify_bundle(
                path, self.trust, check_files=True, max_file_size=self.max_file_bytes, now=self.clock()
            )
        except VerificationError as exc:
            if exc.reason != "expired":
                # E.g. its signing key was removed from trusted_keys (a revocation: docs/ota.md) or a file
                # changed on disk. It is not loaded, and nothing else is: serving the other slot instead
                # would be a rollback nobody signed.
                message = f"active slot {slot} ({info.name}@{info.version}) does not verify: {exc.message}"
                log.error("%s", message)
                self.serving_error = RefusedError(message, reason=exc.reason)
                self._emit("error", message, details={"reason": exc.reason, "slot": slot})
                return None
            # An installed model that expires keeps serving: expiry gates installs, not service.
            manifest = verify_bundle(
                path,
                self.trust,
                check_files=True,
                max_file_size=self.max_file_bytes,
                now=dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc),
            )
        try:
            model = self.runtime.load(path, manifest)
        except UpdateError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load {manifest.ref}: {type(exc).__name__}: {exc}") from exc
        sinfo = ServingInfo(manifest.name, manifest.version, slot, info.manifest_sha256 or "")
        self.runtime.serve(model, sinfo)
        self.serving_error = None
        return sinfo

    # ---- commands ----------------------------------------------------------------------------------
    def handle_desired(self, desired: DesiredState) -> str:
        """Act on a desired state; returns what happened ('duplicate', 'noop', 'in_service', or the state)."""
        rec = self.record
        if desired.device_id != self.device_id:
            return "not_for_me"
        if desired.deployment_id in rec.seen_deployments or desired.deployment_id == rec.deployment_id:
            self._report_replayed_rollback(desired)
            return "duplicate"  # QoS 1 redelivery or the retained message again
        if rec.state not in RESTING:
            raise AgentError(f"an update is in flight ({rec.state.value}); finish or resume it first")
        if desired.adapter is not None and desired.bundle is None:
            return self.adapters.handle(desired)
        ref = desired.bundle
        if ref is None:
            self.save_record(seen_deployments=[*rec.seen_deployments, desired.deployment_id][-64:])
            return "noop"
        seen = [*rec.seen_deployments, desired.deployment_id][-64:]
        active = rec.committed
        if (
            active
            and self.serving_error is None
            and active.name == ref.name
            and active.version == ref.version
            and (ref.manifest_sha256 is None or ref.manifest_sha256 == active.manifest_sha256)
        ):
            # Through the table (persisted like any transition): from Failed too, since the device runs
            # exactly what the fleet now wants; the failed attempt's error and target are cleared.
            self._fire(
                Event.IN_SERVICE,
                seen_deployments=seen,
                deployment_id=desired.deployment_id,
                last_result="committed",
                error=None,
                error_reason=None,
                error_state=None,
                target=ref,
                target_slot=rec.active_slot,
                rollback_authorized=False,
            )
            self._emit(
                "result",
                f"{ref.name}@{ref.version} already in service",
                deployment_id=desired.deployment_id,
                bundle=f"{ref.name}@{ref.version}",
            )
            return "in_service"
        authorized = False
        refusal: str | None = None
        if desired.rollback is not None:
            try:
                authorized = self._check_rollback_authorization(desired)
            except (RefusedError, ManifestError) as exc:
                refusal = f"rollback authorization refused: {getattr(exc, 'message', exc)}"
        target_slot = other_slot(rec.active_slot)
        slots = dict(rec.slots)
        slots[target_slot] = None
        self._manifest = None
        # Forget, then empty, the inactive slot before START is persisted: a resumed download must never
        # find another bundle's files there.
        self.save_record(slots=slots)
        self.slots.wipe(target_slot)
        self._fire(
            Event.START,
            deployment_id=desired.deployment_id,
            target=ref,
            target_slot=target_slot,
            rollback_authorized=authorized,
            seen_deployments=seen,
            error=None,
            error_reason=None,
            error_state=None,
            last_result=None,
        )
        if refusal:
            self._fail(RefusedError(refusal, reason="bad_rollback_authorization"))
        self._run()
        return self.record.state.value

    def _report_replayed_rollback(self, desired: DesiredState) -> None:
        """An old deployment delivered again (a replayed retained message) that asks for a version below
        the committed one: ignored like any duplicate, and reported, since it is what an attacker holding
        old fleet messages would send."""
        ref = desired.bundle
        highest = self.record.highest_committed.get(ref.name, 0) if ref else 0
        if ref is None or desired.deployment_id == self.record.deployment_id or ref.version >= highest:
            return
        self._emit(
            "refused",
            f"replayed deployment {desired.deployment_id} asks for {ref.name}@{ref.version}, below the "
            f"committed version {highest}: ignored",
            deployment_id=desired.deployment_id,
            bundle=f"{ref.name}@{ref.version}",
            details={"reason": "anti_rollback", "replayed": True},
        )

    def _check_rollback_authorization(self, desired: DesiredState) -> bool:
        assert desired.rollback is not None and desired.bundle is not None
        payload = desired.rollback.verify(self.trust)
        try:
            auth = RollbackAuthorization.model_validate(payload)
        except Exception as exc:
            raise RefusedError(f"not a rollback authorization: {exc}") from exc
        if auth.deployment_id != desired.deployment_id:
            raise RefusedError("it authorizes another deployment")
        if (auth.name, auth.version) != (desired.bundle.name, desired.bundle.version):
            raise RefusedError(f"it authorizes {auth.name}@{auth.version}, not this bundle")
        if auth.device_ids is not None and self.device_id not in auth.device_ids:
            raise RefusedError("it does not name this device")
        check_not_expired(auth.expires_at, "rollback authorization", now=self.clock())
        return True

    # ---- the state loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        while self.record.state in IN_FLIGHT:
            state = self.record.state
            try:
                self.hooks.on_enter(state)
                if state is State.DOWNLOADING:
                    self._download()
                    self._fire(Event.DOWNLOADED)
                elif state is State.VERIFYING:
                    self._verify()
                    self._fire(Event.VERIFIED)
                elif state is State.INSTALLING:
                    info = self._install()
                    slots = dict(self.record.slots)
                    slots[self.record.target_slot] = info  # type: ignore[index]
                    self._fire(Event.INSTALLED, slots=slots)
                elif state is State.ACTIVATING:
                    self._activate_and_commit()
            except UpdateError as exc:
                self._fail(exc)
            except VerificationError as exc:
                self._fail(RefusedError(exc.message, reason=exc.reason))
            except ManifestError as exc:
                self._fail(UpdateError(exc.message, reason=exc.reason))
            except OSError as exc:
                if is_disk_full(exc):
                    self._fail(DiskFullError(f"disk full: {exc}"))
                else:
                    self._fail(UpdateError(f"I/O error: {exc}", reason="io"))
            except AgentError as exc:
                self._fail(UpdateError(exc.message, reason=exc.reason))
            except Exception as exc:  # a bug must not leave a half update in service: roll back
                log.exception("unexpected error in %s", state.value)
                self._fail(UpdateError(f"{type(exc).__name__}: {exc}", reason="internal"))
        if self.record.state is State.ROLLING_BACK:
            self._rollback()

    def _fail(self, exc: UpdateError) -> None:
        state = self.record.state
        log.error("update failed in %s: %s", state.value, exc.message)
        self._emit(
            "refused" if isinstance(exc, RefusedError) else "error",
            exc.message,
            deployment_id=self.record.deployment_id,
            bundle=self._target_ref(),
            details={"reason": exc.reason, "state": state.value},
        )
        target = self.record.target_slot
        if isinstance(exc, DiskFullError) and target is not None and target != self.record.active_slot:
            self.slots.wipe(target)  # free the space first: recording the failure needs a few bytes too
        if state in IN_FLIGHT:
            self._fire(
                Event.ERROR,
                error=exc.message,
                error_reason=exc.reason,
                error_state=state.value,
                last_result="refused"
                if isinstance(exc, RefusedError)
                else ("rolled_back" if state is State.ACTIVATING else "failed"),
            )

    # ---- states --------------------------------------------------------------------------------------
    def _target(self) -> tuple[BundleRef, SlotName]:
        rec = self.record
        if rec.target is None or rec.target_slot is None:
            raise UpdateError("no target recorded for the in-flight update", reason="internal")
        return rec.target, rec.target_slot

    def bundle_url(self, ref: BundleRef) -> str:
        base = urljoin(self.base_url, ref.base_url)
        return base if base.endswith("/") else base + "/"

    def _load_manifest(self) -> BundleManifest:
        """Manifest + signature of the target: reused from the slot on resume, else fetched. Verified here."""
        ref, slot = self._target()
        root = self.slots.path(slot)
        mpath, spath = root / MANIFEST_NAME, root / SIGNATURE_NAME
        if mpath.is_file() and spath.is_file():
            body, sig = mpath.read_bytes(), spath.read_bytes()
        else:
            base = self.bundle_url(ref)
            body = self.fetcher.get_bytes(base + MANIFEST_NAME, MAX_MANIFEST_BYTES)
            sig = self.fetcher.get_bytes(base + SIGNATURE_NAME, MAX_SIGNATURE_BYTES)
        if ref.manifest_sha256 and _sha256(body) != ref.manifest_sha256:
            raise RefusedError("the manifest's sha256 differs from the deployment's", reason="manifest_mismatch")
        try:
            manifest = verify_manifest_bytes(body, sig, self.trust, now=self.clock())
        except VerificationError as exc:
            raise RefusedError(f"{ref.name}@{ref.version}: {exc.message}", reason=exc.reason) from exc
        except SchemaError as exc:
            raise RefusedError(exc.message, reason="schema") from exc
        if (manifest.name, manifest.version) != (ref.name, ref.version):
            raise RefusedError(
                f"the deployment asks for {ref.name}@{ref.version} but the signed manifest is {manifest.ref}",
                reason="manifest_mismatch",
            )
        highest = self.record.highest_committed.get(manifest.name, 0)
        if manifest.version < highest and not self.record.rollback_authorized:
            raise AntiRollbackError(
                f"{manifest.ref} is below the highest committed version {highest}; "
                "a signed rollback authorization is required"
            )
        # Refuse before a byte of the model is fetched when this board's onnxruntime cannot run the graph
        # (too old, or missing a kernel the bundle uses): installing it would only fail at activation.
        try:
            check_local_runtime(manifest)
        except RuntimeIncompatibleError as exc:
            raise RefusedError(exc.message, reason="runtime_incompatible") from exc
        if not mpath.is_file():
            atomic_write_bytes(mpath, body)
            atomic_write_bytes(spath, sig)
        self._manifest = manifest
        return manifest

    def _download(self) -> None:
        ref, slot = self._target()
        manifest = self._load_manifest()
        for f in manifest.files:
            if f.size > self.max_file_bytes:
                raise RefusedError(
                    f"{f.path} declares {f.size} bytes, over the cap of {self.max_file_bytes}",
                    reason="file_too_large",
                )
        if self.max_memory_bytes is not None and manifest.total_size > self.max_memory_bytes:
            raise RefusedError(
                f"{manifest.ref} needs {manifest.total_size} bytes, over this board's limit of {self.max_memory_bytes}",
                reason="too_large_for_device",
            )
        dests = {f.path: self.slots.safe_dest(slot, f.path) for f in manifest.files}
        missing = 0
        for f in manifest.files:
            d = dests[f.path]
            part = d.with_name(d.name + ".part")
            have = d.stat().st_size if d.is_file() else (part.stat().st_size if part.is_file() else 0)
            missing += max(0, f.size - have)
        free = self.disk.free_bytes(self.slots.path(slot))
        if free < missing + self.disk_margin_bytes:
            raise DiskFullError(
                f"{manifest.ref} needs {missing} more bytes + {self.disk_margin_bytes} margin; {free} bytes free"
            )
        total = manifest.total_size
        done_before = 0
        base = self.bundle_url(ref)
        local = held_files(self)  # reuse.py: what the board holds already is copied, not fetched
        stats = self.download_stats = DownloadStats()
        for f in manifest.files:
            dest = dests[f.path]
            if dest.is_file() and dest.stat().st_size == f.size:
                done_before += f.size
                continue
            if local.copy_to(f.sha256, f.size, dest):
                stats.copied += f.size
                stats.files_copied += 1
                done_before += f.size
                continue
            part = dest.with_name(dest.name + ".part")
            offset = done_before

            def progress(n: int, offset: int = offset) -> None:
                self.hooks.on_progress(State.DOWNLOADING, offset + n, total)

            fetch_file(self.fetcher, base + f.path, part, f, local, stats, progress)
            os.replace(part, dest)
            done_before += f.size

    def _verify(self) -> None:
        ref, slot = self._target()
        manifest = self._manifest or self._load_manifest()
        self.slots.remove_strays(slot, manifest)
        try:
            verify_bundle(self.slots.path(slot), self.trust, now=self.clock(), max_file_size=self.max_file_bytes)
        except VerificationError as exc:
            raise RefusedError(f"{manifest.ref}: {exc.message}", reason=exc.reason) from exc

    def _install(self) -> SlotInfo:
        ref, slot = self._target()
        manifest = self._manifest or self._load_manifest()
        self.slots.fsync_tree(slot)
        body = (self.slots.path(slot) / MANIFEST_NAME).read_bytes()
        return SlotInfo(name=manifest.name, version=manifest.version, manifest_sha256=_sha256(body))

    def _activate_and_commit(self) -> None:
        ref, slot = self._target()
        path = self.slots.path(slot)
        manifest = self._manifest or self._load_manifest()
        # Cheap re-check of sizes (a full hash was done in Verifying; the slot is ours since then).
        for f in manifest.files:
            if (path / f.path).stat().st_size != f.size:
                raise RefusedError(f"{f.path} changed size after verification", reason="tampered_file")
        try:
            model = self.runtime.load(path, manifest)
        except UpdateError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load {manifest.ref}: {type(exc).__name__}: {exc}") from exc
        try:
            result = health_check(model, manifest)
        except BaseException:
            model.close()
            raise
        info = self.record.slots.get(slot)
        assert info is not None
        self.runtime.serve(model, ServingInfo(manifest.name, manifest.version, slot, info.manifest_sha256 or ""))
        self.serving_error = None
        highest = dict(self.record.highest_committed)
        highest[manifest.name] = max(highest.get(manifest.name, 0), manifest.version)
        self._fire(
            Event.HEALTHY,
            active_slot=slot,
            highest_committed=highest,
            last_result="committed",
            rollback_authorized=False,
        )
        self.hooks.on_enter(State.COMMITTED)  # (test hook: killed_in_committed)
        self._emit(
            "result",
            f"{manifest.ref} committed in slot {slot}",
            deployment_id=self.record.deployment_id,
            bundle=manifest.ref,
            details={"health": result, **({"bytes": self.download_stats.as_dict()} if self.download_stats else {})},
        )

    def _rollback(self) -> None:
        for attempt in range(3):
            try:
                self.hooks.on_enter(State.ROLLING_BACK)
                rec = self.record
                # The previous (active) slot serves; reload it if the failed update had swapped it out.
                try:
                    self.ensure_serving()
                except UpdateError as exc:  # it did not load before this update either: nothing to restore
                    self._emit(
                        "error",
                        f"the previous model does not load: {exc.message}",
                        details={"reason": exc.reason, "slot": rec.active_slot},
                    )
                target = rec.target_slot
                if target is not None and target != rec.active_slot:
                    self.slots.wipe(target)
                    slots = dict(rec.slots)
                    slots[target] = None
                else:
                    slots = dict(rec.slots)
                self._manifest = None
                self._fire(Event.ROLLED_BACK, slots=slots)
                self._emit(
                    "result",
                    f"update failed and rolled back: {rec.error}",
                    deployment_id=rec.deployment_id,
                    bundle=self._target_ref(),
                    details={"reason": rec.error_reason, "state": rec.error_state},
                )
                return
            except Exception as exc:  # keep trying: the old model must come back
                log.exception("rollback attempt %d failed", attempt + 1)
                self._emit("error", f"rollback attempt {attempt + 1} failed: {exc}")
                time.sleep(0.5)
        raise AgentError("rollback failed three times; the agent exits and systemd restarts it")
