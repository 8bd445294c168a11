"""LoRA adapters over the air: a desired state naming an adapter makes it resident over the serving base.

An adapter deployment leaves the model alone (``DesiredState.bundle`` is None, ``adapter`` names it). In order,
nothing unverified used and nothing fetched before it is known to fit:

1. base check, before any download: the board serves a committed base and its manifest sha256 is the one the
   adapter names (refused ``adapter_base_absent`` / ``adapter_base_mismatch`` otherwise);
2. anti-rollback: a version below the highest committed one for that name needs a signed rollback
   authorization (``bad_rollback_authorization`` / ``anti_rollback``);
3. the version already on disk (the previous one, kept for rollback) is verified and used again; otherwise
   manifest + signature are fetched (capped), checked against the desired sha256, the signature and the base
   again (now from the signed manifest), then each file is copied from the board when it holds its sha256
   (reuse.py) or fetched, into a staging folder verified whole before it is renamed into place;
4. activation: the runtime loads it over the serving engine and checks it (finite perplexity on the base's
   golden text, at most ``MAX_PPL_RATIO`` times the base's: an adapter that breaks the model is refused) and
   only then puts it in service, replacing the same name (streams on the old version finish on it);
5. the record (``adapters/adapters.json``) keeps the current and the previous version of each name; older
   version folders are removed.

A rollback with nothing to go back to: when the board held no earlier version of the adapter, the fleet's
rollback names version ``UNLOADED`` (0: "no version"), signed like any rollback. The agent then unloads the
adapter (streams already running on it finish with it), forgets its versions on disk, and the board serves
the base alone: the reported state no longer lists it and the local API no longer offers
``<base id>:<name>``. Its highest committed version is kept (a later deployment below it still needs a signed
rollback). An unsigned or mismatched one is refused like any rollback below the highest committed version.

The result goes into the update record like a model's (``deployment_id``, ``last_result``, ``error``), so the
fleet's rollout engine reads it the same way; the state stays where it was (the model did not move). The
reported state lists the adapters (``ReportedState.adapters``), and the local API serves each resident one as
``<base id>:<adapter name>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError

from manifests import MANIFEST_NAME, SIGNATURE_NAME, atomic_write_bytes, check_relative_path, read_manifest_unverified
from manifests.adapter import (
    UNLOADED_VERSION,
    AdapterInfo,
    AdapterManifest,
    AdapterRef,
    check_adapter_base,
    verify_adapter,
    verify_adapter_manifest_bytes,
)
from manifests.bundle import check_not_expired
from manifests.errors import ManifestError, VerificationError
from manifests.mqtt import DesiredState, RollbackAuthorization

from .datadir import DataDir
from .errors import AgentError, AntiRollbackError, RefusedError, UpdateError
from .reuse import DownloadStats, fetch_file, held_files

if TYPE_CHECKING:
    from .updater import Updater

log = logging.getLogger("nanofleet.agent")

ADAPTERS_DIR = "adapters"
RECORD_FILE = "adapters.json"
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024
# An adapter may make the base's golden text this much less likely, no more: a fine-tune moves the model
# toward its own text, a broken one (wrong scale, garbage matrices) multiplies perplexity by orders of magnitude.
MAX_PPL_RATIO = 4.0
UNLOADED = UNLOADED_VERSION  # a rollback to no version: the adapter is unloaded (manifests/adapter.py)


class AdapterUnsupportedError(UpdateError):
    reason = "adapters_unsupported"


class AdapterBaseAbsentError(RefusedError):
    reason = "adapter_base_absent"


class AdapterBaseMismatchError(RefusedError):
    reason = "adapter_base_mismatch"


class AdapterQualityError(UpdateError):
    """The adapter loaded but breaks the model (its activation check failed)."""

    reason = "adapter_quality"


class AdapterEntry(BaseModel):
    version: int
    manifest_sha256: str
    base_manifest_sha256: str
    previous_version: int | None = None
    previous_manifest_sha256: str | None = None


class AdapterRecord(BaseModel):
    """What ``adapters/adapters.json`` holds: the current adapter of each name and the version before it."""

    adapters: dict[str, AdapterEntry] = Field(default_factory=dict)
    highest_committed: dict[str, int] = Field(default_factory=dict)


class AdapterStore:
    """``<data_dir>/adapters/``: ``adapters.json`` and one folder per name and version (``<name>/<version>/``)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = DataDir(data_dir).root / ADAPTERS_DIR
        self.record_file = self.root / RECORD_FILE

    def load(self) -> AdapterRecord:
        if not self.record_file.is_file():
            return AdapterRecord()
        try:
            return AdapterRecord.model_validate_json(self.record_file.read_bytes())
        except (ValidationError, OSError, ValueError) as exc:
            raise AgentError(f"cannot read {self.record_file}: {exc}", reason="state_file") from exc

    def save(self, record: AdapterRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.record_file, json.dumps(record.model_dump(mode="json"), indent=1).encode())

    def folder(self, name: str, version: int) -> Path:
        check_relative_path(name)
        return self.root / name / str(version)

    def staging(self, name: str, version: int) -> Path:
        return self.root / f".staging-{name}-{version}"

    def resident_dirs(self, base_manifest_sha256: str | None) -> list[Path]:
        """The current adapter folder of every name whose base is this one (what the runtime loads)."""
        if base_manifest_sha256 is None:
            return []
        rec = self.load()
        return [
            self.folder(n, e.version)
            for n, e in sorted(rec.adapters.items())
            if e.base_manifest_sha256 == base_manifest_sha256 and self.folder(n, e.version).is_dir()
        ]

    def report(self, base_manifest_sha256: str | None) -> list[AdapterInfo]:
        try:
            rec = self.load()
        except AgentError:
            return []
        return [
            AdapterInfo(
                name=n,
                version=e.version,
                manifest_sha256=e.manifest_sha256,
                base_manifest_sha256=e.base_manifest_sha256,
                resident=base_manifest_sha256 is not None and e.base_manifest_sha256 == base_manifest_sha256,
                previous_version=e.previous_version,
            )
            for n, e in sorted(rec.adapters.items())
        ]

    def prune(self, name: str, keep: set[int]) -> None:
        """Remove the version folders of ``name`` other than ``keep`` (the current one and the previous)."""
        folder = self.root / name
        if not folder.is_dir():
            return
        for child in folder.iterdir():
            if child.name.isdigit() and int(child.name) not in keep:
                shutil.rmtree(child, ignore_errors=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AdapterUpdater:
    """The adapter half of an ``Updater`` (it shares its record, fetcher, trust, runtime and clock)."""

    def __init__(self, updater: Updater) -> None:
        self.u = updater
        self.store = AdapterStore(updater.data_dir)

    # ---- entry -------------------------------------------------------------------------------------
    def handle(self, desired: DesiredState) -> str:
        """Act on an adapter desired state; returns 'committed', 'in_service' or 'refused'/'failed'."""
        ref = desired.adapter
        assert ref is not None
        seen = [*self.u.record.seen_deployments, desired.deployment_id][-64:]
        # Nothing is recorded until the outcome is known: the fleet reads a reported deployment id with no
        # failed result as done, and a crash half-way leaves the command unseen, so the retained desired state,
        # delivered again after the restart, runs it again (every step can be repeated).
        stats = DownloadStats()
        try:
            outcome, health = self._apply(desired, ref, stats)
        except (UpdateError, ManifestError, OSError) as exc:
            return self._failed(desired, ref, exc, seen)
        self.u.save_record(
            deployment_id=desired.deployment_id,
            seen_deployments=seen,
            last_result="committed",
            error=None,
            error_reason=None,
            error_state=None,
        )
        if ref.version == UNLOADED:
            message = f"adapter {ref.name} unloaded (a rollback to no version): the base serves alone"
        else:
            done = "already in service" if outcome == "in_service" else "resident"
            message = f"adapter {ref.name}@{ref.version} {done}"
        self.u.emit(
            "result",
            message,
            deployment_id=desired.deployment_id,
            bundle=f"{ref.name}@{ref.version}",
            details={"kind": "adapter", "bytes": stats.as_dict(), "health": health,
                     "unloaded": ref.version == UNLOADED},
        )  # fmt: skip
        return outcome

    def _failed(self, desired: DesiredState, ref: AdapterRef, exc: Exception, seen: list[str]) -> str:
        if isinstance(exc, UpdateError):
            err = exc
        elif isinstance(exc, VerificationError):
            err = RefusedError(exc.message, reason=exc.reason)
        elif isinstance(exc, ManifestError):
            err = UpdateError(exc.message, reason=exc.reason)
        else:
            err = UpdateError(f"I/O error: {exc}", reason="io")
        refused = isinstance(err, RefusedError)
        log.error("adapter %s@%s: %s", ref.name, ref.version, err.message)
        self.u.emit(
            "refused" if refused else "error",
            err.message,
            deployment_id=desired.deployment_id,
            bundle=f"{ref.name}@{ref.version}",
            details={"kind": "adapter", "reason": err.reason},
        )
        result = "refused" if refused else "failed"
        self.u.save_record(
            deployment_id=desired.deployment_id,
            seen_deployments=seen,
            last_result=result,
            error=err.message,
            error_reason=err.reason,
            error_state=None,
        )
        shutil.rmtree(self.store.staging(ref.name, ref.version), ignore_errors=True)
        self._drop_unrecorded(ref.name, ref.version)
        return result

    def _drop_unrecorded(self, name: str, version: int) -> None:
        """A version that failed after it was downloaded is not kept (only the current and previous are)."""
        try:
            entry = self.store.load().adapters.get(name)
        except AgentError:
            return
        if entry is None or version not in (entry.version, entry.previous_version):
            shutil.rmtree(self.store.folder(name, version), ignore_errors=True)

    # ---- the steps ---------------------------------------------------------------------------------
    def _apply(self, desired: DesiredState, ref: AdapterRef, stats: DownloadStats) -> tuple[str, dict[str, Any]]:
        if ref.version == UNLOADED:
            return self._unload(desired, ref)
        base_sha = self._check_base(ref.base_manifest_sha256, ref.base_name, ref.base_version, ref.name)
        activate = getattr(self.u.runtime, "activate_adapter", None)
        if activate is None:
            raise AdapterUnsupportedError("this board's model runtime cannot take adapters")
        record = self.store.load()
        current = record.adapters.get(ref.name)
        highest = record.highest_committed.get(ref.name, 0)
        if ref.version < highest and not self._rollback_authorized(desired, ref):
            raise AntiRollbackError(f"adapter {ref.name}@{ref.version} is below the highest committed version "
                                    f"{highest}; a signed rollback authorization is required")  # fmt: skip
        serving = {a.name: a for a in self.store.report(base_sha)}.get(ref.name)
        if (
            current is not None
            and current.version == ref.version
            and serving is not None
            and serving.resident
            and (ref.manifest_sha256 is None or ref.manifest_sha256 == current.manifest_sha256)
            and self._resident_in_runtime(ref.name, ref.version)
        ):
            return "in_service", {}
        folder, manifest, msha = self._obtain(ref, base_sha, stats)
        health = activate(folder, manifest, self._probe_ids())
        self._commit(record, manifest, msha, current)
        return "committed", health

    def _unload(self, desired: DesiredState, ref: AdapterRef) -> tuple[str, dict[str, Any]]:
        """A rollback to no version: the adapter leaves the runtime and the record; the base serves alone.
        Whatever base serves (or none): nothing is loaded, so there is nothing to check it against."""
        if not self._rollback_authorized(desired, ref):
            raise AntiRollbackError(f"unloading adapter {ref.name} is a rollback to no version; a signed rollback "
                                    "authorization is required")  # fmt: skip
        deactivate = getattr(self.u.runtime, "deactivate_adapter", None)
        if deactivate is not None:
            deactivate(ref.name)
        record = self.store.load()
        held = record.adapters.pop(ref.name, None)
        self.store.save(record)
        self.store.prune(ref.name, set())
        shutil.rmtree(self.store.root / ref.name, ignore_errors=True)
        log.info("adapter %s unloaded (was %s): the base serves alone", ref.name,
                 f"v{held.version}" if held else "not held")  # fmt: skip
        return "committed", {}

    def _check_base(self, want: str, name: str | None, version: int | None, adapter: str) -> str:
        """The serving base's manifest sha256, when it is the one the adapter needs; refused otherwise."""
        rec = self.u.record
        committed = rec.committed
        needs = f"{name}@{version}" if name else f"manifest sha256 {want[:12]}…"
        if committed is None or committed.manifest_sha256 is None or self.u.serving_error is not None:
            raise AdapterBaseAbsentError(f"adapter {adapter} needs base {needs}; this board serves no base model")
        if committed.manifest_sha256 != want:
            raise AdapterBaseMismatchError(
                f"adapter {adapter} needs base {needs} (manifest sha256 {want[:12]}…); this board runs "
                f"{committed.name}@{committed.version} (manifest sha256 {committed.manifest_sha256[:12]}…)"
            )
        return committed.manifest_sha256

    def _rollback_authorized(self, desired: DesiredState, ref: AdapterRef) -> bool:
        if desired.rollback is None:
            return False
        try:
            auth = RollbackAuthorization.model_validate(desired.rollback.verify(self.u.trust))
        except (ManifestError, ValidationError) as exc:
            raise RefusedError(f"rollback authorization refused: {exc}", reason="bad_rollback_authorization") from exc
        problems = []
        if auth.deployment_id != desired.deployment_id:
            problems.append("it authorizes another deployment")
        if (auth.name, auth.version) != (ref.name, ref.version):
            problems.append(f"it authorizes {auth.name}@{auth.version}, not this adapter")
        if auth.device_ids is not None and self.u.device_id not in auth.device_ids:
            problems.append("it does not name this device")
        if problems:
            raise RefusedError(f"rollback authorization refused: {'; '.join(problems)}",
                               reason="bad_rollback_authorization")  # fmt: skip
        check_not_expired(auth.expires_at, "rollback authorization", now=self.u.clock())
        return True

    def _resident_in_runtime(self, name: str, version: int) -> bool:
        check = getattr(self.u.runtime, "adapter_version", None)
        return check is not None and check(name) == version

    def _obtain(self, ref: AdapterRef, base_sha: str, stats: DownloadStats) -> tuple[Path, AdapterManifest, str]:
        """The adapter's folder, verified: the one on disk when it holds this version, else downloaded."""
        folder = self.store.folder(ref.name, ref.version)
        now = self.u.clock()
        if (folder / MANIFEST_NAME).is_file():
            body = (folder / MANIFEST_NAME).read_bytes()
            if ref.manifest_sha256 is None or _sha256(body) == ref.manifest_sha256:
                try:
                    m = verify_adapter(folder, self.u.trust, now=now, max_file_size=self.u.max_file_bytes)
                    check_adapter_base(m, ref.base_name or "", base_sha)
                    return folder, m, _sha256(body)
                except ManifestError as exc:
                    log.warning("adapter folder %s no longer verifies (%s): downloading it again", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
        staging = self.store.staging(ref.name, ref.version)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        url = self.u.bundle_url(ref)  # type: ignore[arg-type]  # same shape: base_url
        body = self.u.fetcher.get_bytes(url + MANIFEST_NAME, MAX_MANIFEST_BYTES)
        sig = self.u.fetcher.get_bytes(url + SIGNATURE_NAME, MAX_SIGNATURE_BYTES)
        if ref.manifest_sha256 and _sha256(body) != ref.manifest_sha256:
            raise RefusedError("the adapter manifest's sha256 differs from the deployment's",
                               reason="manifest_mismatch")  # fmt: skip
        try:
            m = verify_adapter_manifest_bytes(body, sig, self.u.trust, now=now)
        except VerificationError as exc:
            raise RefusedError(f"adapter {ref.name}@{ref.version}: {exc.message}", reason=exc.reason) from exc
        if (m.name, m.version) != (ref.name, ref.version):
            raise RefusedError(f"the deployment asks for adapter {ref.name}@{ref.version} but the signed manifest is "
                               f"{m.ref}", reason="manifest_mismatch")  # fmt: skip
        self._check_base(m.base.manifest_sha256, m.base.name, m.base.version, m.ref)  # the signed claim, too
        for f in m.files:
            if f.size > self.u.max_file_bytes:
                raise RefusedError(f"{f.path} declares {f.size} bytes, over the cap", reason="file_too_large")
        atomic_write_bytes(staging / MANIFEST_NAME, body)
        atomic_write_bytes(staging / SIGNATURE_NAME, sig)
        local = held_files(self.u)
        for f in m.files:
            check_relative_path(f.path)
            dest = staging / f.path
            if local.copy_to(f.sha256, f.size, dest):
                stats.copied += f.size
                stats.files_copied += 1
                continue
            part = dest.with_name(dest.name + ".part")
            dest.parent.mkdir(parents=True, exist_ok=True)
            fetch_file(self.u.fetcher, url + f.path, part, f, local, stats)
            part.replace(dest)
        try:
            verify_adapter(staging, self.u.trust, now=now, max_file_size=self.u.max_file_bytes)
        except VerificationError as exc:
            raise RefusedError(f"adapter {m.ref}: {exc.message}", reason=exc.reason) from exc
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging.replace(folder)
        return folder, m, _sha256(body)

    def _probe_ids(self) -> list[int]:
        """The token ids the activation check scores: the serving base's golden prompt and answer."""
        rec = self.u.record
        if rec.active_slot is None:
            return []
        try:
            m = read_manifest_unverified(self.u.slots.path(rec.active_slot))
        except ManifestError:
            return []
        if m.golden is None:
            return [m.arch.bos_token_id or 1, 2, 3, 4]
        return [*m.golden.prompt_token_ids, *m.golden.expected_token_ids]

    def _commit(self, record: AdapterRecord, m: AdapterManifest, msha: str, current: AdapterEntry | None) -> None:
        prev = current if current is not None and current.version != m.version else None
        if prev is None and current is not None:  # the same version again: keep what it replaced before
            prev_v, prev_sha = current.previous_version, current.previous_manifest_sha256
        else:
            prev_v = prev.version if prev else None
            prev_sha = prev.manifest_sha256 if prev else None
        record.adapters[m.name] = AdapterEntry(
            version=m.version, manifest_sha256=msha, base_manifest_sha256=m.base.manifest_sha256,
            previous_version=prev_v, previous_manifest_sha256=prev_sha,
        )  # fmt: skip
        record.highest_committed[m.name] = max(record.highest_committed.get(m.name, 0), m.version)
        self.store.save(record)
        self.store.prune(m.name, {m.version} | ({prev_v} if prev_v is not None else set()))


def activate_on_engine(engine: Any, folder: Path, probe_ids: list[int]) -> dict[str, Any]:
    """Load a verified adapter over ``engine`` (a device.engine.Engine), check it, then make it resident.

    The check scores the base's golden text with and without the adapter: a non-finite perplexity, or one over
    ``MAX_PPL_RATIO`` times the base's, is an ``AdapterQualityError`` and nothing changes in service."""
    import math

    from device.engine.adapters import AdapterError, load_adapter

    try:
        adapter = load_adapter(folder, None, engine.name, engine.manifest_sha256, engine.lora_slots)
    except AdapterError as exc:
        reason = "adapter_base_mismatch" if exc.reason == "adapter_base_mismatch" else "adapter_load"
        raise UpdateError(exc.message, reason=reason) from exc
    health: dict[str, Any] = {}
    if len(probe_ids) >= 2:
        base_ppl = engine.perplexity(probe_ids)
        ppl = engine.perplexity(probe_ids, adapter)
        health = {"perplexity": ppl, "base_perplexity": base_ppl, "max_ratio": MAX_PPL_RATIO}
        if not math.isfinite(ppl) or ppl > MAX_PPL_RATIO * base_ppl:
            raise AdapterQualityError(
                f"adapter {adapter.ref} breaks the model: perplexity {ppl:.4g} on the base's golden text, the base "
                f"alone {base_ppl:.4g} (at most {MAX_PPL_RATIO:g}x allowed)"
            )
    engine.adapters.add(adapter, replace=True)  # the old version's streams finish on it
    return health


def deactivate_on_engine(engine: Any, name: str) -> bool:
    """Stop offering adapter ``name`` over ``engine`` (its running streams finish with it); False: not resident."""
    from device.engine.adapters import UnknownAdapterError

    try:
        engine.unload_adapter(name)
    except UnknownAdapterError:
        return False
    return True


def attach_resident(engine: Any, data_dir: Path) -> list[str]:
    """Load every adapter on disk whose base is ``engine``'s onto it (before it goes into service)."""
    loaded = []
    for folder in AdapterStore(data_dir).resident_dirs(getattr(engine, "manifest_sha256", None)):
        try:
            loaded.append(engine.load_adapter(folder, None).ref)
        except Exception as exc:  # noqa: BLE001 - one bad adapter folder must not keep the base out of service
            log.error("adapter %s not loaded: %s", folder, exc)
    return loaded
