"""An in-process agent core (Updater + fake runtime + real HTTP fetcher) for fast, deterministic tests."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any

from device.agent.disk import Disk
from device.agent.fetch import HttpFetcher
from device.agent.states import State
from device.agent.updater import Hooks, Updater
from manifests import SignedDocument, SigningKey, TrustStore, verify_bundle
from manifests.mqtt import BundleRef, DesiredState, RollbackAuthorization

from .fake_runtime import FakeRuntime
from .helpers import ArtifactServer, make_bundle, ref_for

DEVICE = "dev-1"
_ids = itertools.count(1)


class SimulatedCrash(BaseException):
    """A power cut: escapes every ``except Exception`` like SIGKILL would end the process."""


class CrashIn:
    def __init__(self, state: State, *, mid_download: bool = False) -> None:
        self.state, self.mid_download, self.fired = state, mid_download, False
        self.done_at_crash = 0

    def on_enter(self, state: State) -> None:
        if state is self.state and not self.mid_download and not self.fired:
            self.fired = True
            raise SimulatedCrash(state.value)

    def on_progress(self, state: State, done: int, total: int) -> None:
        if state is self.state and self.mid_download and not self.fired and done * 2 >= total:
            self.fired, self.done_at_crash = True, done
            raise SimulatedCrash(state.value)


class FakeDisk:
    def __init__(self, free: int) -> None:
        self.free = free

    def free_bytes(self, path: Path) -> int:
        return self.free


class Harness:
    def __init__(self, tmp_path: Path, key: SigningKey, trust: TrustStore, artifacts: ArtifactServer) -> None:
        self.data = tmp_path / "data"
        self.key, self.trust, self.artifacts = key, trust, artifacts
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.runtime = FakeRuntime()
        self.fetcher = HttpFetcher(retries=3, backoff_s=0.01, timeout_s=5)
        self.disk: Disk | None = None
        self.updater = self._make(None)

    def _make(self, hooks: Hooks | None) -> Updater:
        return Updater(
            data_dir=self.data,
            device_id=DEVICE,
            trust=self.trust,
            fetcher=self.fetcher,
            runtime=self.runtime,
            artifacts_base_url=self.artifacts.url,
            disk=self.disk,
            hooks=hooks,
            emit=lambda kind, msg, **f: self.events.append((kind, msg, f)),
            disk_margin_bytes=0,
        )

    def publish(
        self, version: int, name: str = "tiny", key: SigningKey | None = None, **kw: Any
    ) -> BundleRef:
        folder = f"{name}-{version}-{next(_ids)}"
        bundle = make_bundle(self.artifacts.root / folder, key or self.key, name=name, version=version, **kw)
        return ref_for(bundle, folder + "/")

    def desired(
        self, ref: BundleRef | None, rollback: SignedDocument | None = None, deployment_id: str | None = None
    ) -> DesiredState:
        return DesiredState(
            device_id=DEVICE,
            deployment_id=deployment_id or f"dep-{next(_ids)}",
            bundle=ref,
            rollback=rollback,
            issued_at=dt.datetime.now(dt.timezone.utc),
        )

    def rollback_doc(
        self,
        deployment_id: str,
        ref: BundleRef,
        key: SigningKey | None = None,
        devices: list[str] | None = None,
    ) -> SignedDocument:
        auth = RollbackAuthorization(
            deployment_id=deployment_id,
            name=ref.name,
            version=ref.version,
            device_ids=devices or [DEVICE],
            expires_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
        )
        return SignedDocument.sign(auth, key or self.key)

    def deploy(self, ref: BundleRef, **kw: Any) -> str:
        return self.updater.handle_desired(self.desired(ref, **kw))

    def restart(self, hooks: Hooks | None = None) -> None:
        """A new process: nothing in memory survives, nothing serves until start-up loads the slot."""
        self.runtime = FakeRuntime()
        self.updater = self._make(hooks)
        self.updater.startup()
        self.updater.resume()

    @property
    def state(self) -> State:
        return self.updater.record.state

    def serving(self) -> tuple[str, int] | None:
        info = self.runtime.serving()
        return (info.name, info.version) if info else None

    def assert_serving_verifies(self) -> None:
        info = self.runtime.serving()
        assert info is not None, "nothing is serving"
        m = verify_bundle(self.data / "slots" / info.slot, self.trust)
        assert (m.name, m.version) == (info.name, info.version)
        assert info.slot == self.updater.record.active_slot
        assert self.runtime.model is not None and not self.runtime.model.closed

    def reasons(self) -> list[str]:
        return [f.get("details", {}).get("reason") for k, _, f in self.events if k in ("error", "refused")]
