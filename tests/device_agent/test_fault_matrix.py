"""Fault-matrix rows that need a real agent process (restarts, SIGKILL), a real Mosquitto and a real HTTP
artifact server: a signing key removed from the trusted set, and an older deployment replayed after a
newer commit and a restart. (The partition of one board from the broker, with a real fleet service, is
in test_partition.py.)"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from device.agent.fetch import HttpFetcher
from device.agent.updater import Updater
from manifests import SigningKey, TrustStore
from manifests.mqtt import BundleRef, DesiredState

from ..conftest import Mosquitto
from .fake_runtime import FakeRuntime
from .helpers import ArtifactServer, make_bundle, ref_for
from .procs import AgentProcess, Observer, wait_for, write_config

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
DEVICE = "matrix-dev"


def pub_file(root: Path, key: SigningKey, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.pub"
    path.write_bytes(key.public_pem())
    return path


def installed(data: Path, bundle: Path, trust: TrustStore) -> None:
    """A data dir with ``bundle`` committed in slot a, as the agent's own bootstrap does it."""
    up = Updater(
        data_dir=data,
        device_id=DEVICE,
        trust=trust,
        fetcher=HttpFetcher(),
        runtime=FakeRuntime(),
        artifacts_base_url="http://unused.invalid/",
    )
    assert up.bootstrap(bundle) == "committed"


def desired(ref: BundleRef, dep: str) -> DesiredState:
    return DesiredState(device_id=DEVICE, deployment_id=dep, bundle=ref, issued_at=dt.datetime.now(dt.timezone.utc))


def serves(agent: AgentProcess, version: int) -> dict[str, Any]:
    return wait_for(lambda: (s := agent.serving()) and s["version"] == version and s, 30, f"tiny@{version} to serve")


def api_status(agent: AgentProcess) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{agent.api_port}/model", timeout=1).status_code
    except httpx.HTTPError:
        return None


def events(observer: Observer, kind: str) -> list[dict[str, Any]]:
    return [e for e in observer.of("events") if e["kind"] == kind]


def set_trusted(config: Path, keys: list[Path]) -> None:
    doc = yaml.safe_load(config.read_text())
    doc["trusted_keys"] = [str(k) for k in keys]
    config.write_text(yaml.safe_dump(doc))


def test_removed_signing_key_revokes_the_committed_bundle_at_next_start(
    tmp_path: Path, mosquitto: Mosquitto, artifacts: ArtifactServer
) -> None:
    """Removing a key from trusted_keys revokes what it signed: the running agent keeps serving (keys are
    read at start), the next start does not load the bundle, reports why, does not fall back to the
    other slot, refuses the same bundle again, and takes a bundle signed by a key it still trusts."""
    old_key, new_key = SigningKey.generate(), SigningKey.generate()
    old_pub, new_pub = pub_file(tmp_path / "keys", old_key, "old"), pub_file(tmp_path / "keys", new_key, "new")
    v1 = make_bundle(artifacts.root / "tiny-1", old_key, version=1)
    data = tmp_path / "data"
    installed(data, v1, TrustStore([old_key.public_key, new_key.public_key]))
    cfg = tmp_path / "agent.yaml"
    port = write_config(
        cfg,
        device_id=DEVICE,
        broker_url=mosquitto.url,
        artifacts_url=artifacts.url,
        pub_key=old_pub,
        data_dir=data,
    )
    set_trusted(cfg, [old_pub, new_pub])
    agent = AgentProcess(cfg, port, data, tmp_path / "agent.log")
    observer = Observer(mosquitto.port, DEVICE)
    try:
        agent.start()
        serves(agent, 1)
        set_trusted(cfg, [new_pub])  # the old key is revoked in the config...
        time.sleep(1.5)
        assert serves(agent, 1)  # ...which the running agent reads at its next start only
        assert agent.stop() == 0
        agent.start()
        err = wait_for(
            lambda: next((e for e in events(observer, "error") if e["details"].get("reason") == "unknown_key"), None),
            30,
            "the unknown_key error event",
        )
        assert "active slot a (tiny@1) does not verify" in err["message"]
        rep = wait_for(
            lambda: (r := observer.reported()) and r["error"] and "unknown_key" in r["error"] and r,
            20,
            "the reported state to name the problem",
        )
        assert rep["state"] == "committed" and rep["committed"]["version"] == 1  # the record is unchanged
        wait_for(lambda: api_status(agent) == 503, 20, "the local API to answer 503 (no model)")
        assert agent.state()["active_slot"] == "a" and agent.state()["highest_committed"] == {"tiny": 1}

        # The same bundle again (a new deployment id) is fetched and refused: its key is not trusted.
        observer.publish_desired(desired(ref_for(v1, "tiny-1/"), "again-v1"))
        rep = wait_for(
            lambda: (r := observer.reported()) and r["deployment_id"] == "again-v1" and r["state"] == "failed" and r,
            30,
            "the same bundle refused",
        )
        assert rep["last_result"] == "refused"
        assert api_status(agent) == 503

        # A bundle signed by a trusted key installs, serves, and the error is gone.
        v2 = make_bundle(artifacts.root / "tiny-2", new_key, version=2)
        observer.publish_desired(desired(ref_for(v2, "tiny-2/"), "new-key-v2"))
        serves(agent, 2)
        rep = wait_for(
            lambda: (
                (r := observer.reported()) and r["state"] == "committed" and r["deployment_id"] == "new-key-v2" and r
            ),
            30,
            "v2 committed",
        )
        assert rep["error"] is None and rep["committed"]["version"] == 2
        assert agent.stop() == 0
    finally:
        agent.stop()
        observer.close()


def test_replayed_older_deployment_after_a_newer_commit_and_a_restart_is_refused(
    tmp_path: Path, mosquitto: Mosquitto, artifacts: ArtifactServer
) -> None:
    key = SigningKey.generate()
    pub = pub_file(tmp_path / "keys", key, "release")
    data = tmp_path / "data"
    installed(data, make_bundle(tmp_path / "boot-1", key, version=1), TrustStore([key.public_key]))
    refs = {v: ref_for(make_bundle(artifacts.root / f"tiny-{v}", key, version=v), f"tiny-{v}/") for v in (2, 3)}
    cfg = tmp_path / "agent.yaml"
    port = write_config(
        cfg, device_id=DEVICE, broker_url=mosquitto.url, artifacts_url=artifacts.url, pub_key=pub, data_dir=data
    )
    agent = AgentProcess(cfg, port, data, tmp_path / "agent.log")
    observer = Observer(mosquitto.port, DEVICE)
    old = desired(refs[2], "dep-v2")
    try:
        agent.start()
        serves(agent, 1)
        observer.publish_desired(old)
        serves(agent, 2)
        observer.publish_desired(desired(refs[3], "dep-v3"))
        serves(agent, 3)
        wait_for(
            lambda: (r := observer.reported()) and r["state"] == "committed" and r["deployment_id"] == "dep-v3", 20
        )
        agent.kill()  # SIGKILL: only what is on disk survives
        agent.start()
        serves(agent, 3)

        # 1. The very same v2 message replayed, retained (as a broker or a man in the middle can).
        observer.publish_desired(old)
        refusal = wait_for(
            lambda: next((e for e in events(observer, "refused") if e["details"].get("replayed")), None),
            30,
            "the replay to be reported",
        )
        assert refusal["details"]["reason"] == "anti_rollback" and refusal["deployment_id"] == "dep-v2"
        assert "below the committed version 3" in refusal["message"]
        assert serves(agent, 3)["version"] == 3 and agent.state()["state"] == "committed"

        # 2. v2 again under a new deployment id (re-sent): refused by anti-rollback, reported as such.
        observer.publish_desired(desired(refs[2], "dep-v2-resent"))
        rep = wait_for(
            lambda: (
                (r := observer.reported()) and r["deployment_id"] == "dep-v2-resent" and r["state"] == "failed" and r
            ),
            30,
            "the re-sent v2 refused",
        )
        assert rep["last_result"] == "refused" and "highest committed version 3" in rep["error"]
        assert rep["committed"]["version"] == 3
        wait_for(
            lambda: any(
                e["details"].get("reason") == "anti_rollback" and e["deployment_id"] == "dep-v2-resent"
                for e in events(observer, "refused")
            ),
            20,
            "the anti_rollback refusal event",
        )
        # refused on the signed manifest, before a byte of the model: weights.bin was fetched once, for dep-v2
        assert [r.path for r in artifacts.log].count("tiny-2/weights.bin") == 1
        assert serves(agent, 3)["version"] == 3
        assert agent.state()["highest_committed"] == {"tiny": 3}
        assert agent.stop() == 0
    finally:
        agent.stop()
        observer.close()
