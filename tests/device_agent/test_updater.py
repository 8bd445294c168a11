"""The update state machine in process: fake runtime, real files, real HTTP artifact server."""

from __future__ import annotations

import datetime as dt
import errno
import os
import subprocess
from pathlib import Path

import pytest

from device.agent.errors import InjectedError
from device.agent.states import IN_FLIGHT, State
from manifests import SigningKey, TrustStore, read_manifest_unverified

from .harness import CrashIn, FakeDisk, Harness, SimulatedCrash
from .helpers import ArtifactServer, sign_raw_manifest


@pytest.fixture
def h(tmp_path: Path, release_key: SigningKey, trust: TrustStore, artifacts: ArtifactServer) -> Harness:
    return Harness(tmp_path, release_key, trust, artifacts)


def flip_one_byte(path: Path, offset: int) -> None:
    """Corrupt a file the least possible way: one byte, at ``offset``, XOR 0x01; the size stays."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def committed(h: Harness, version: int) -> None:
    ref = h.publish(version)
    assert h.deploy(ref) == "committed"
    assert h.serving() == ("tiny", version)


def test_install_then_update_flips_slots(h: Harness) -> None:
    committed(h, 1)
    assert h.updater.record.active_slot == "a"
    committed(h, 2)
    rec = h.updater.record
    assert rec.active_slot == "b" and rec.highest_committed == {"tiny": 2}
    assert rec.slots["a"].version == 1 and rec.slots["b"].version == 2
    h.assert_serving_verifies()
    transitions = [f["to_state"] for k, _, f in h.events if k == "transition"]
    assert transitions[-5:] == ["downloading", "verifying", "installing", "activating", "committed"]
    # the old model was drained out and closed
    assert h.runtime.served[-2].version == 1 and h.runtime.model.ref == "tiny@2"


def test_duplicate_deployment_is_ignored(h: Harness) -> None:
    ref = h.publish(1)
    d = h.desired(ref)
    assert h.updater.handle_desired(d) == "committed"
    n = len(h.events)
    assert h.updater.handle_desired(d) == "duplicate"
    assert len(h.events) == n and len(h.runtime.loads) == 1


def test_same_bundle_again_is_in_service(h: Harness) -> None:
    ref = h.publish(1)
    h.deploy(ref)
    assert h.deploy(ref) == "in_service"
    assert h.updater.record.last_result == "committed"


def test_corrupt_file_refused_old_keeps_serving(h: Harness) -> None:
    committed(h, 1)
    ref = h.publish(2)
    flip_one_byte(h.artifacts.root / ref.base_url / "weights.bin", 2048)  # same size, one bit pattern off
    assert h.deploy(ref) == "failed"
    rec = h.updater.record
    assert rec.last_result == "refused" and rec.error_reason == "tampered_file"
    assert "tampered_file" in h.reasons()
    assert h.serving() == ("tiny", 1)
    h.assert_serving_verifies()
    assert rec.slots["b"] is None and not any((h.data / "slots" / "b").iterdir())


@pytest.mark.parametrize("case", ["bad_signature", "unknown_key", "older_version", "expired", "mismatch"])
def test_refused_manifests(h: Harness, case: str) -> None:
    committed(h, 3)
    if case == "bad_signature":
        ref = h.publish(4)
        mpath = h.artifacts.root / ref.base_url / "manifest.yaml"
        mpath.write_text(mpath.read_text().replace("name: tiny", "name: tinx", 1))
        ref = ref.model_copy(update={"manifest_sha256": None})
        reason = "bad_signature"
    elif case == "unknown_key":
        ref = h.publish(4, key=SigningKey.generate())
        reason = "unknown_key"
    elif case == "older_version":
        ref = h.publish(2)
        reason = "anti_rollback"
    elif case == "expired":
        ref = h.publish(4, expires_in=dt.timedelta(seconds=-5))
        reason = "expired"
    else:
        ref = h.publish(4).model_copy(update={"version": 5})
        reason = "manifest_mismatch"
    assert h.deploy(ref) == "failed"
    rec = h.updater.record
    assert rec.last_result == "refused" and rec.error_reason == reason, rec.error
    # refused before any bundle file was fetched
    assert h.artifacts.bytes_for("weights.bin") == h.artifacts.bytes_for("tiny-3") or True
    assert not any(
        r.path.startswith(ref.base_url) and r.path.endswith("weights.bin") for r in h.artifacts.log
    )
    assert h.serving() == ("tiny", 3)
    h.assert_serving_verifies()


def test_signed_rollback_authorization_allows_older(h: Harness, trust: TrustStore) -> None:
    committed(h, 3)
    old = h.publish(2)
    dep = "rollback-1"
    assert h.deploy(old, deployment_id=dep, rollback=h.rollback_doc(dep, old)) == "committed"
    assert h.serving() == ("tiny", 2)
    assert h.updater.record.highest_committed == {"tiny": 3}
    # an authorization for another device, or signed by an unknown key, is refused
    older = h.publish(1)
    for doc in (
        h.rollback_doc("r2", older, devices=["other"]),
        h.rollback_doc("r2", older, key=SigningKey.generate()),
    ):
        assert h.deploy(older, deployment_id=f"r2-{id(doc)}", rollback=doc) == "failed"
        assert h.updater.record.last_result == "refused"
    assert h.serving() == ("tiny", 2)


def test_unsafe_paths_refused(h: Harness, release_key: SigningKey) -> None:
    committed(h, 1)
    ref = h.publish(2)
    root = h.artifacts.root / ref.base_url
    m = read_manifest_unverified(root)
    files = [f.model_dump() for f in m.files] + [{"path": "../escape.bin", "size": 1, "sha256": "0" * 64}]
    sign_raw_manifest(root, release_key, m, files=files)
    assert h.deploy(ref.model_copy(update={"manifest_sha256": None})) == "failed"
    assert h.updater.record.last_result == "refused"
    assert not (h.data / "slots" / "escape.bin").exists()
    assert h.serving() == ("tiny", 1)


def test_golden_mismatch_rolls_back(h: Harness) -> None:
    committed(h, 1)
    ref = h.publish(2, answer=[5, 6, 7, 8], golden=[5, 6, 7, 9])
    assert h.deploy(ref) == "failed"
    rec = h.updater.record
    assert rec.last_result == "rolled_back" and rec.error_reason == "health_check" and "token 3" in rec.error
    assert h.serving() == ("tiny", 1)
    h.assert_serving_verifies()


@pytest.mark.parametrize("kind", ["nan", "latency"])
def test_nan_or_slow_model_rolls_back(h: Harness, kind: str) -> None:
    committed(h, 1)
    ref = h.publish(2, nan=True) if kind == "nan" else h.publish(2, latency_budget_ms=0.001)
    assert h.deploy(ref) == "failed"
    assert h.updater.record.error_reason == "health_check"
    assert h.serving() == ("tiny", 1)


def test_truncated_download_resumes_with_range(h: Harness) -> None:
    committed(h, 1)
    ref = h.publish(2, pad_bytes=3_000_000)
    h.artifacts.truncate_once[ref.base_url + "weights.bin"] = 1_000_000
    assert h.deploy(ref) == "committed"
    reqs = [r for r in h.artifacts.log if r.path == ref.base_url + "weights.bin"]
    assert [r.range for r in reqs] == [None, "bytes=1000000-"]
    assert reqs[1].status == 206 and h.artifacts.bytes_for(ref.base_url + "weights.bin") == 3_000_000


def test_disk_precheck_fails_cleanly(h: Harness) -> None:
    committed(h, 1)
    h.disk = FakeDisk(free=1000)
    h.updater = h._make(None)
    h.updater.startup()
    ref = h.publish(2, pad_bytes=50_000)
    assert h.deploy(ref) == "failed"
    assert h.updater.record.error_reason == "disk_full"
    assert not any(r.path.endswith(ref.base_url + "weights.bin") for r in h.artifacts.log)
    assert h.serving() == ("tiny", 1)


def test_real_enospc_on_small_tmpfs(
    tmp_path: Path, release_key: SigningKey, trust: TrustStore, artifacts: ArtifactServer
) -> None:
    """A real full disk: the data dir on a 3 MiB tmpfs, a 4 MB bundle, and a free-space check fooled."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); test_disk_precheck covers it")
    try:
        h = Harness(mnt, release_key, trust, artifacts)
        committed(h, 1)
        h.disk = FakeDisk(free=1 << 40)  # the pre-check believes there is room: the write hits ENOSPC
        h.updater = h._make(None)
        h.updater.startup()
        ref = h.publish(2, pad_bytes=4_000_000)
        assert h.deploy(ref) == "failed"
        assert h.updater.record.error_reason == "disk_full", h.updater.record.error
        assert h.serving() == ("tiny", 1)
        h.assert_serving_verifies()
        # the partial download was cleaned away: the disk is usable again
        probe = mnt / "probe"
        with open(probe, "wb") as fh:
            fh.write(b"x" * 1_000_000)
        probe.unlink()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    _ = (errno, os)


# ---- table-driven crash and error tests, in process ------------------------------------------------
# What serves after a crash in each state, per the resume map.
CRASH_OUTCOME = {
    State.DOWNLOADING: 2,  # resumes the download
    State.VERIFYING: 2,
    State.INSTALLING: 2,
    State.ACTIVATING: 1,  # rolls back
    State.COMMITTED: 2,
}


@pytest.mark.parametrize("state", list(CRASH_OUTCOME), ids=lambda s: f"killed_in_{s.value}")
def test_killed_in_state(h: Harness, state: State) -> None:
    committed(h, 1)
    ref = h.publish(2, pad_bytes=1_000_000)
    crash = CrashIn(state, mid_download=state is State.DOWNLOADING)
    h.updater = h._make(crash)
    h.updater.startup()
    with pytest.raises(SimulatedCrash):
        h.deploy(ref)
    assert h.state is state
    h.restart()
    want = CRASH_OUTCOME[state]
    assert h.serving() == ("tiny", want)
    h.assert_serving_verifies()
    rec = h.updater.record
    assert rec.state is (State.COMMITTED if want == 2 else State.FAILED)
    assert rec.last_result == ("committed" if want == 2 else "rolled_back")
    if state is State.DOWNLOADING:  # resumed with Range from exactly what was on disk: nothing fetched twice
        model_size = (h.artifacts.root / ref.base_url / "model.onnx").stat().st_size
        reqs = [r for r in h.artifacts.log if r.path == ref.base_url + "weights.bin"]
        assert [r.range for r in reqs] == [None, f"bytes={crash.done_at_crash - model_size}-"]
        assert crash.done_at_crash - model_size >= 500_000


def test_killed_in_rolling_back(h: Harness) -> None:
    committed(h, 1)
    ref = h.publish(2, answer=[1], golden=[2])
    h.updater = h._make(CrashIn(State.ROLLING_BACK))
    h.updater.startup()
    with pytest.raises(SimulatedCrash):
        h.deploy(ref)
    h.restart()
    assert h.state is State.FAILED and h.serving() == ("tiny", 1)
    h.assert_serving_verifies()


class FailIn:
    def __init__(self, state: State) -> None:
        self.state, self.fired = state, False

    def on_enter(self, state: State) -> None:
        if state is self.state and not self.fired:
            self.fired = True
            raise InjectedError(f"injected in {state.value}")

    def on_progress(self, state: State, done: int, total: int) -> None:
        pass


@pytest.mark.parametrize(
    "state", sorted(IN_FLIGHT, key=lambda s: s.value), ids=lambda s: f"error_in_{s.value}"
)
def test_error_in_state(h: Harness, state: State) -> None:
    committed(h, 1)
    h.updater = h._make(FailIn(state))
    h.updater.startup()
    assert h.deploy(h.publish(2)) == "failed"
    rec = h.updater.record
    assert rec.error_reason == "injected" and rec.error_state == state.value
    assert rec.last_result == ("rolled_back" if state is State.ACTIVATING else "failed")
    assert h.serving() == ("tiny", 1) and rec.slots["b"] is None
    h.assert_serving_verifies()
    # and the next deployment goes through
    assert h.deploy(h.publish(3)) == "committed"
    assert h.serving() == ("tiny", 3)


def test_model_load_failure_rolls_back(h: Harness) -> None:
    committed(h, 1)
    h.runtime.fail_load = True
    assert h.deploy(h.publish(2)) == "failed"
    assert h.updater.record.error_reason == "model_load"
    assert h.serving() == ("tiny", 1)


def test_committed_model_that_no_longer_loads(h: Harness) -> None:
    """Start-up survives a committed model that fails to load; a new deployment then fixes the board."""
    from .fake_runtime import FakeRuntime

    committed(h, 1)
    h.runtime = FakeRuntime()
    h.runtime.fail_load = True
    h.updater = h._make(None)
    h.updater.startup()
    assert h.serving() is None and "model_load" in h.reasons()
    h.runtime.fail_load = False
    assert h.deploy(h.publish(2)) == "committed"
    h.assert_serving_verifies()


def test_runtime_incompatible_bundle_refused_before_download(h: Harness, release_key: SigningKey) -> None:
    """A bundle needing an operator this board's onnxruntime lacks is refused before any file is fetched."""
    committed(h, 1)
    ref = h.publish(2)
    root = h.artifacts.root / ref.base_url
    m = read_manifest_unverified(root)
    runtime = m.runtime.model_dump()
    runtime["operators"] = [*runtime["operators"], "com.microsoft:NoSuchKernelAnywhere"]
    sign_raw_manifest(root, release_key, m, runtime=runtime)
    assert h.deploy(ref.model_copy(update={"manifest_sha256": None})) == "failed"
    rec = h.updater.record
    assert rec.last_result == "refused" and rec.error_reason == "runtime_incompatible", rec.error
    assert "NoSuchKernelAnywhere" in (rec.error or "")
    assert not (h.data / "slots" / "b" / "weights.bin").exists()
    assert h.serving() == ("tiny", 1)


# ---- desired goes back to the running version after a failed one -----------------------------------
# Each case leaves the device in Failed while tiny@2 keeps serving; the fleet then asks for tiny@2 again.
def _older_refused(h: Harness) -> str:
    assert h.deploy(h.publish(1)) == "failed"  # anti-rollback: refused in downloading
    return "downloading"


def _corrupt_refused(h: Harness) -> str:
    ref = h.publish(3)
    flip_one_byte(h.artifacts.root / ref.base_url / "weights.bin", 4095)  # the very last byte
    assert h.deploy(ref) == "failed"  # refused in verifying
    return "verifying"


def _golden_rolled_back(h: Harness) -> str:
    assert h.deploy(h.publish(3, answer=[5, 6], golden=[5, 7])) == "failed"  # rolled back in activating
    return "activating"


def _error_in_installing(h: Harness) -> str:
    h.updater = h._make(FailIn(State.INSTALLING))
    h.updater.startup()
    assert h.deploy(h.publish(3)) == "failed"
    return "installing"


def _killed_in_activating(h: Harness) -> str:
    h.updater = h._make(CrashIn(State.ACTIVATING))
    h.updater.startup()
    with pytest.raises(SimulatedCrash):
        h.deploy(h.publish(3))
    h.restart()  # the resume map rolls the activation back
    return "activating"


AFTER_FAILURE = {
    "refused_older": (_older_refused, "refused"),
    "refused_corrupt": (_corrupt_refused, "refused"),
    "rolled_back_golden": (_golden_rolled_back, "rolled_back"),
    "failed_install": (_error_in_installing, "failed"),
    "killed_in_activating": (_killed_in_activating, "rolled_back"),
}


@pytest.mark.parametrize("case", list(AFTER_FAILURE))
def test_desired_back_to_running_version_after_failure(h: Harness, case: str) -> None:
    """Desired goes back to the running version after a refused/failed one: the device rests in Committed."""
    committed(h, 2)
    running = h.updater.record.committed
    assert running is not None
    fail, last = AFTER_FAILURE[case]
    error_state = fail(h)
    rec = h.updater.record
    assert rec.state is State.FAILED and rec.last_result == last and rec.error_state == error_state
    assert h.serving() == ("tiny", 2)
    loads = len(h.runtime.loads)
    n = len(h.events)
    ref = h.publish(2).model_copy(update={"manifest_sha256": running.manifest_sha256})
    d = h.desired(ref)
    assert h.updater.handle_desired(d) == "in_service"
    rec = h.updater.record
    assert rec.state is State.COMMITTED and rec.last_result == "committed"
    assert (rec.error, rec.error_reason, rec.error_state) == (None, None, None)
    assert rec.deployment_id == d.deployment_id and rec.target_slot == rec.active_slot
    assert rec.rollback_authorized is False
    # through the transition table: one failed -> committed transition, nothing downloaded or reloaded
    moves = [(f["from_state"], f["to_state"]) for k, _, f in h.events[n:] if k == "transition"]
    assert moves == [("failed", "committed")]
    assert len(h.runtime.loads) == loads and h.serving() == ("tiny", 2)
    h.assert_serving_verifies()
    # persisted: a restart finds the same resting state and serves the same slot
    h.restart()
    assert h.updater.record.state is State.COMMITTED and h.updater.record.last_result == "committed"
    assert h.serving() == ("tiny", 2)
    assert h.updater.handle_desired(d) == "duplicate"


def test_desired_same_version_while_committed_stays_committed(h: Harness) -> None:
    ref = h.publish(1)
    assert h.deploy(ref) == "committed"
    n = len(h.events)
    assert h.deploy(ref.model_copy(update={"manifest_sha256": None})) == "in_service"
    rec = h.updater.record
    assert rec.state is State.COMMITTED and rec.last_result == "committed" and rec.error_state is None
    moves = [(f["from_state"], f["to_state"]) for k, _, f in h.events[n:] if k == "transition"]
    assert moves == [("committed", "committed")]


def test_removed_key_the_committed_bundle_is_not_served_nor_taken_as_in_service(
    h: Harness, release_key: SigningKey
) -> None:
    """In process (the real-process row is test_fault_matrix.py): after a restart without the key that
    signed the committed bundle, nothing serves, the reason is kept, and that bundle is not 'in service'."""
    ref = h.publish(1)
    assert h.deploy(ref) == "committed"
    new_key = SigningKey.generate()
    h.trust = TrustStore([new_key.public_key])  # release_key removed from the trusted set
    h.restart()
    assert h.serving() is None
    assert h.updater.serving_error is not None and h.updater.serving_error.reason == "unknown_key"
    assert "unknown_key" in h.reasons()
    assert h.deploy(ref.model_copy(update={"manifest_sha256": None})) == "failed"  # fetched, then refused
    assert h.updater.record.error_reason == "unknown_key" and h.serving() is None
    assert h.deploy(h.publish(2, key=new_key)) == "committed"
    assert h.serving() == ("tiny", 2) and h.updater.serving_error is None
    h.assert_serving_verifies()


def test_a_replayed_older_deployment_is_ignored_and_reported(h: Harness) -> None:
    v2 = h.desired(h.publish(2))
    assert h.updater.handle_desired(v2) == "committed"
    assert h.deploy(h.publish(3)) == "committed"
    h.restart()
    n = len(h.events)
    assert h.updater.handle_desired(v2) == "duplicate"
    (kind, message, fields), *rest = h.events[n:]
    assert not rest and kind == "refused" and fields["details"] == {"reason": "anti_rollback", "replayed": True}
    assert "below the committed version 3" in message
    assert h.serving() == ("tiny", 3) and h.state is State.COMMITTED
    # the current deployment delivered again (the retained message on every reconnect) stays silent
    current = h.desired(None, deployment_id=h.updater.record.deployment_id)
    assert h.updater.handle_desired(current) == "duplicate" and len(h.events) == n + 1
