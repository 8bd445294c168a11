"""Real agent processes, a real Mosquitto, a real HTTP artifact server: SIGKILL in every state, errors in
every state, a broker outage with store and forward, and `nanofleet device status`."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device.agent.fetch import HttpFetcher
from device.agent.updater import Updater
from manifests import SigningKey, TrustStore, verify_bundle
from manifests.mqtt import DesiredState

from ..conftest import REPO, Mosquitto
from .fake_runtime import FakeRuntime
from .helpers import ArtifactServer, make_bundle, ref_for
from .procs import AgentProcess, Observer, wait_for, write_config

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
DEVICE = "proc-dev"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Path]:
    key = SigningKey.generate()
    pub = tmp_path_factory.mktemp("keys") / "release.pub"
    pub.write_bytes(key.public_pem())
    return key, pub


@pytest.fixture(scope="module")
def v1_installed(tmp_path_factory: pytest.TempPathFactory, keys: tuple[SigningKey, Path]) -> Path:
    """A data dir with tiny@1 committed in slot a (made once, copied per test)."""
    key, _ = keys
    base = tmp_path_factory.mktemp("template")
    bundle = make_bundle(base / "tiny-1", key, version=1)
    up = Updater(
        data_dir=base / "data",
        device_id=DEVICE,
        trust=TrustStore([key.public_key]),
        fetcher=HttpFetcher(),
        runtime=FakeRuntime(),
        artifacts_base_url="http://unused.invalid/",
    )
    assert up.bootstrap(bundle) == "committed"
    return base / "data"


def setup_agent(
    tmp_path: Path,
    keys: tuple[SigningKey, Path],
    v1_installed: Path,
    mosquitto: Mosquitto,
    artifacts: ArtifactServer,
    interval_s: float = 0.5,
) -> AgentProcess:
    data = tmp_path / "data"
    shutil.copytree(v1_installed, data)
    cfg = tmp_path / "agent.yaml"
    port = write_config(
        cfg,
        device_id=DEVICE,
        broker_url=mosquitto.url,
        artifacts_url=artifacts.url,
        pub_key=keys[1],
        data_dir=data,
        interval_s=interval_s,
    )
    return AgentProcess(cfg, port, data, tmp_path / "agent.log")


def desired_for(ref, dep: str) -> DesiredState:  # noqa: ANN001
    return DesiredState(
        device_id=DEVICE, deployment_id=dep, bundle=ref, issued_at=dt.datetime.now(dt.timezone.utc)
    )


def assert_serves(agent: AgentProcess, trust: TrustStore, version: int) -> None:
    info = wait_for(
        lambda: (s := agent.serving()) and s["version"] == version and s,
        20,
        f"tiny@{version} to serve ({agent.log})",
    )
    m = verify_bundle(agent.data_dir / "slots" / info["slot"], trust)
    assert (m.name, m.version) == ("tiny", version)
    assert agent.state()["active_slot"] == info["slot"]


# state -> (env for the killed process, version serving at the end, final reported state, last_result)
KILL_CASES = {
    "downloading": ({"NANOFLEET_AGENT_PAUSE_IN": "downloading"}, 2, "committed", "committed"),
    "verifying": ({"NANOFLEET_AGENT_PAUSE_IN": "verifying"}, 2, "committed", "committed"),
    "installing": ({"NANOFLEET_AGENT_PAUSE_IN": "installing"}, 2, "committed", "committed"),
    "activating": ({"NANOFLEET_AGENT_PAUSE_IN": "activating"}, 1, "failed", "rolled_back"),
    "committed": ({"NANOFLEET_AGENT_PAUSE_IN": "committed"}, 2, "committed", "committed"),
    "rolling_back": (
        {"NANOFLEET_AGENT_FAIL_IN": "activating", "NANOFLEET_AGENT_PAUSE_IN": "rolling_back"},
        1,
        "failed",
        "rolled_back",
    ),
}


@pytest.mark.parametrize("state", list(KILL_CASES), ids=lambda s: f"killed_in_{s}")
def test_killed_in_state(
    state: str,
    tmp_path: Path,
    keys: tuple[SigningKey, Path],
    v1_installed: Path,
    mosquitto: Mosquitto,
    artifacts: ArtifactServer,
) -> None:
    key, _ = keys
    trust = TrustStore([key.public_key])
    env, want_version, want_state, want_result = KILL_CASES[state]
    agent = setup_agent(tmp_path, keys, v1_installed, mosquitto, artifacts)
    ref = ref_for(make_bundle(artifacts.root / "tiny-2", key, version=2, pad_bytes=3_000_000), "tiny-2/")
    observer = Observer(mosquitto.port, DEVICE)
    try:
        agent.start(**env)
        assert_serves(agent, trust, 1)
        observer.publish_desired(desired_for(ref, f"dep-{state}"))
        agent.wait_paused(state)
        assert agent.state()["state"] == state
        agent.kill()
        # the broker publishes our last will: offline
        wait_for(lambda: any(not s["online"] for s in observer.of("status")), 10, "last will")
        agent.start()
        assert_serves(agent, trust, want_version)
        rep = wait_for(
            lambda: (
                (r := observer.reported())
                and r["state"] == want_state
                and r["deployment_id"] == f"dep-{state}"
                and r
            ),
            20,
            f"reported {want_state}",
        )
        assert rep["last_result"] == want_result
        assert rep["committed"]["version"] == want_version
        if state == "downloading":  # resumed with Range where the killed process stopped
            reqs = [r for r in artifacts.log if r.path == "tiny-2/weights.bin"]
            assert len(reqs) == 2 and reqs[0].range is None and reqs[1].status == 206
            offset = int(reqs[1].range.split("=")[1].rstrip("-"))
            assert 1_000_000 <= offset < 3_000_000
        assert agent.stop() == 0
        assert observer.of("status")[-1]["online"] is False  # graceful stop says offline too
    finally:
        agent.stop()
        observer.close()


# The in-process table (test_updater.py) covers every state; real processes cover both ends.
@pytest.mark.parametrize("state", ["downloading", "activating"], ids=lambda s: f"error_in_{s}")
def test_error_in_state(
    state: str,
    tmp_path: Path,
    keys: tuple[SigningKey, Path],
    v1_installed: Path,
    mosquitto: Mosquitto,
    artifacts: ArtifactServer,
) -> None:
    key, _ = keys
    trust = TrustStore([key.public_key])
    agent = setup_agent(tmp_path, keys, v1_installed, mosquitto, artifacts)
    ref = ref_for(make_bundle(artifacts.root / "tiny-2", key, version=2), "tiny-2/")
    observer = Observer(mosquitto.port, DEVICE)
    try:
        agent.start(NANOFLEET_AGENT_FAIL_IN=state)
        assert_serves(agent, trust, 1)
        observer.publish_desired(desired_for(ref, f"err-{state}"))
        rep = wait_for(lambda: (r := observer.reported()) and r["state"] == "failed" and r, 20, "failed")
        assert "injected" in rep["error"]
        errors = [e for e in observer.of("events") if e["kind"] == "error"]
        wait_for(lambda: [e for e in observer.of("events") if e["kind"] == "error"], 10, "error event")
        errors = [e for e in observer.of("events") if e["kind"] == "error"]
        assert errors[0]["details"]["state"] == state and errors[0]["deployment_id"] == f"err-{state}"
        assert_serves(agent, trust, 1)
        # a new deployment of the same bundle goes through: the failure left nothing behind
        observer.publish_desired(desired_for(ref, f"err-{state}-retry"))
        assert_serves(agent, trust, 2)
    finally:
        agent.stop()
        observer.close()


def test_broker_outage_store_and_forward(
    tmp_path: Path,
    keys: tuple[SigningKey, Path],
    v1_installed: Path,
    mosquitto: Mosquitto,
    artifacts: ArtifactServer,
) -> None:
    """Broker down for many telemetry intervals: the local API keeps serving; afterwards every telemetry
    entry and event arrives exactly once, in order (seq is contiguous)."""
    key, _ = keys
    trust = TrustStore([key.public_key])
    agent = setup_agent(tmp_path, keys, v1_installed, mosquitto, artifacts, interval_s=0.2)
    observer = Observer(mosquitto.port, DEVICE)  # persistent session: the broker queues for it
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(10)
    try:
        # as systemd runs it: Type=notify with WatchdogSec=2
        agent.start(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="2000000")
        assert notify.recv(64) == b"READY=1"
        assert notify.recv(64) == b"WATCHDOG=1"
        assert_serves(agent, trust, 1)
        wait_for(lambda: len(observer.of("telemetry")) >= 3, 15, "telemetry")
        observer.close()
        mosquitto.stop()
        time.sleep(2.5)  # about 12 intervals without a broker
        assert_serves(agent, trust, 1)  # the local API does not care
        st = subprocess.run(
            [
                sys.executable,
                "-m",
                "nanofleet.cli",
                "device",
                "status",
                "--config",
                str(agent.config),
                "--json",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        doc = json.loads(st.stdout)
        assert doc["broker"]["connected"] is False and doc["outbox"]["pending"] >= 5
        assert doc["committed"]["version"] == 1 and doc["slots"]["a"]["name"] == "tiny"
        mosquitto.start()
        observer = Observer(mosquitto.port, DEVICE)
        time.sleep(0.2)

        def caught_up() -> bool:
            status = json.loads((agent.data_dir / "agent-status.json").read_text())
            # telemetry keeps coming every 0.2 s: one fresh entry may be waiting
            return status["broker_connected"] and status["outbox_pending"] <= 1

        wait_for(caught_up, 20, "outbox drained")
        time.sleep(0.5)
        seqs = [m["seq"] for m in observer.of("telemetry") + observer.of("events")]
        order = [
            json.loads(p)["seq"] for t, p, _ in observer.messages if t.endswith(("/telemetry", "/events"))
        ]
        assert len(seqs) == len(set(seqs)), "a message arrived twice"
        assert order == sorted(order), "out of order"
        assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), "a message was lost"
        assert len(seqs) >= 15
        tele = observer.of("telemetry")[-1]
        assert tele["model"] == {"name": "tiny", "version": 1, "slot": "a"} and tele["rss_bytes"] > 0
        assert tele["decode_tok_s"] == 42.0 and tele["dropped"] == 0 and tele["agent_version"]
        assert agent.stop() == 0
    finally:
        agent.stop()
        observer.close()
        notify.close()
