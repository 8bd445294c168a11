"""Hypothesis stateful test of the update state machine.

Rules: the desired version changes (good, broken, corrupt or foreign-signed bundles; with or without a
signed rollback), messages are duplicated or dropped (the retained desired is redelivered on reconnect),
the agent restarts or crashes in any state. Invariants: what serves always verifies and is what the
model says; the version never goes down without a signed rollback; at rest, reported converges to the
latest desired whenever that desired is acceptable.
"""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from device.agent.fetch import HttpFetcher
from device.agent.states import RESTING, State
from device.agent.updater import Updater
from manifests import SignedDocument, SigningKey, TrustStore, verify_bundle
from manifests.mqtt import BundleRef, DesiredState, RollbackAuthorization

from .fake_runtime import FakeRuntime
from .harness import CrashIn, SimulatedCrash
from .helpers import make_bundle, ref_for

DEVICE = "hyp-dev"
VERSIONS = (1, 2, 3, 4)
KINDS = ("good", "bad_golden", "corrupt", "foreign_key")
CRASH_STATES = (
    State.DOWNLOADING,
    State.VERIFYING,
    State.INSTALLING,
    State.ACTIVATING,
    State.COMMITTED,
    State.ROLLING_BACK,
)


class _Repo:
    """Bundles made once: every (version, kind), as file:// artifacts."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nanofleet-hyp-"))
        self.key = SigningKey.generate()
        foreign = SigningKey.generate()
        self.trust = TrustStore([self.key.public_key])
        self.refs: dict[tuple[int, str], BundleRef] = {}
        for v in VERSIONS:
            for kind in KINDS:
                folder = self.root / f"tiny-{v}-{kind}"
                if kind == "bad_golden":
                    make_bundle(folder, self.key, version=v, answer=[v, 0], golden=[v, 1])
                elif kind == "foreign_key":
                    make_bundle(folder, foreign, version=v)
                else:
                    make_bundle(folder, self.key, version=v)
                    if kind == "corrupt":
                        # one byte flipped, size unchanged: the sha256 must catch the smallest change
                        data = bytearray((folder / "weights.bin").read_bytes())
                        data[len(data) // 3] ^= 0x80
                        (folder / "weights.bin").write_bytes(bytes(data))
                self.refs[(v, kind)] = ref_for(folder, folder.as_uri() + "/")


_REPO: _Repo | None = None


def repo() -> _Repo:
    global _REPO
    if _REPO is None:
        _REPO = _Repo()
    return _REPO


_ids = itertools.count(1)


class UpdateMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.repo = repo()
        self.data = Path(tempfile.mkdtemp(prefix="nanofleet-hyp-data-"))
        self.runtime = FakeRuntime()
        self.updater = self._make(None)
        self.updater.startup()
        # the model of what must be true
        self.serving: int | None = None
        self.highest = 0
        self.retained: tuple[DesiredState, int, str, bool] | None = None
        self.delivered: set[str] = set()
        self.converge_to: int | None = None  # version the last delivered desired must end up committed

    def teardown(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)

    def _make(self, hooks) -> Updater:  # noqa: ANN001
        return Updater(
            data_dir=self.data,
            device_id=DEVICE,
            trust=self.repo.trust,
            fetcher=HttpFetcher(),
            runtime=self.runtime,
            artifacts_base_url="http://unused.invalid/",
            hooks=hooks,
            disk_margin_bytes=0,
        )

    def _restart(self) -> None:
        self.runtime = FakeRuntime()
        self.updater = self._make(None)
        self.updater.startup()
        self.updater.resume()

    def _expected_after(self, version: int, kind: str, rollback: bool) -> int | None:
        if kind != "good":
            return self.serving
        if version == self.serving:
            return self.serving
        if version < self.highest and not rollback:
            return self.serving
        return version

    def _deliver(self, crash: State | None = None) -> None:
        assert self.retained is not None
        desired, version, kind, rollback = self.retained
        if desired.deployment_id in self.delivered:
            before = (self.runtime.serving(), self.updater.record.state)
            assert self.updater.handle_desired(desired) == "duplicate"
            assert (self.runtime.serving(), self.updater.record.state) == before
            return
        self.delivered.add(desired.deployment_id)
        expected = self._expected_after(version, kind, rollback)
        hook = CrashIn(crash, mid_download=crash is State.DOWNLOADING) if crash else None
        self.updater.hooks = hook or self.updater.hooks
        was = self.runtime.serving()
        try:
            self.updater.handle_desired(desired)
        except SimulatedCrash:
            assert hook is not None and hook.fired
            self._restart()
        if hook is not None and hook.fired and crash is State.ACTIVATING:
            expected = self.serving  # the resume map rolls back an activation cut short
        self.updater.hooks = self._make(None).hooks
        now = self.runtime.serving()
        # the system itself (not the model): a lower version serves only under a signed rollback
        if was is not None and now is not None and now.version < was.version:
            assert rollback, f"went down from {was.version} to {now.version} without a signed rollback"
        self.converge_to = expected if (kind == "good" and expected == version) else None
        if expected is not None:
            self.highest = max(self.highest, expected)
        self.serving = expected

    @rule(
        version=st.sampled_from(VERSIONS),
        kind=st.sampled_from(KINDS),
        rollback=st.booleans(),
        delivered=st.booleans(),
        crash=st.none() | st.sampled_from(CRASH_STATES),
    )
    def desired_changes(
        self, version: int, kind: str, rollback: bool, delivered: bool, crash: State | None
    ) -> None:
        dep = f"dep-{next(_ids)}"
        ref = self.repo.refs[(version, kind)]
        doc = None
        if rollback:
            auth = RollbackAuthorization(
                deployment_id=dep,
                name="tiny",
                version=version,
                device_ids=[DEVICE],
                expires_at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
            )
            doc = SignedDocument.sign(auth, self.repo.key)
        desired = DesiredState(
            device_id=DEVICE,
            deployment_id=dep,
            bundle=ref,
            rollback=doc,
            issued_at=dt.datetime.now(dt.timezone.utc),
        )
        self.retained = (desired, version, kind, rollback)
        if delivered:  # else: dropped on the way; the retained copy comes on the next reconnect
            self._deliver(crash)

    @rule()
    def duplicate_or_reconnect(self) -> None:
        """QoS 1 redelivery / the retained desired on a reconnect."""
        if self.retained is not None:
            self._deliver()

    @rule()
    def restart(self) -> None:
        self._restart()

    @invariant()
    def served_model_verifies(self) -> None:
        if not hasattr(self, "updater"):
            return
        rec = self.updater.record
        assert rec.state in RESTING
        info = self.runtime.serving()
        if self.serving is None:
            assert info is None
            return
        assert info is not None and info.version == self.serving
        assert info.slot == rec.active_slot
        m = verify_bundle(self.data / "slots" / info.slot, self.repo.trust)
        assert (m.name, m.version) == ("tiny", info.version)
        assert not self.runtime.model.closed

    @invariant()
    def highest_committed_never_decreases(self) -> None:
        if not hasattr(self, "updater"):
            return
        assert self.updater.record.highest_committed.get("tiny", 0) == self.highest

    @invariant()
    def reported_converges(self) -> None:
        """At rest, the device reports the latest delivered desired when it was acceptable."""
        if not hasattr(self, "updater") or self.retained is None:
            return
        desired = self.retained[0]
        if desired.deployment_id not in self.delivered:
            return
        rec = self.updater.record
        assert rec.deployment_id == desired.deployment_id
        if self.converge_to is not None:
            assert rec.committed is not None and rec.committed.version == self.converge_to
            assert rec.last_result == "committed" and rec.state in (State.COMMITTED, State.IDLE)
        elif rec.committed is None or rec.committed.version != self.retained[1]:
            assert rec.last_result in ("failed", "refused", "rolled_back")


# Explicit, whatever profile is loaded: a failure is reported at once with its seed and steps (no shrinking
# or explaining: shrinking a 10-step run of real file I/O took 5 minutes of the CI budget), and no example
# database (a stale .hypothesis/ file must not replay into a run). Reproduce with --hypothesis-seed=<seed>.
UpdateMachine.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=10,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestUpdateMachine = UpdateMachine.TestCase
