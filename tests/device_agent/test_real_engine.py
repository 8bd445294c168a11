"""The agent with the real engine and local API (device.engine + device.api) on the real default bundle:
bootstrap, an OTA update over MQTT while a stream is in flight (it must finish), and a bundle whose
golden tokens are wrong (health check fails, the previous model keeps serving)."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from manifests import GoldenCheck, SigningKey, read_manifest_unverified, write_signed_manifest
from manifests.mqtt import DesiredState

from ..conftest import Mosquitto
from .helpers import ArtifactServer, ref_for
from .procs import AgentProcess, Observer, wait_for, write_config

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]
DEVICE = "real-dev"


def resign(src: Path, dest: Path, key: SigningKey, version: int, *, break_golden: bool = False) -> Path:
    """The same model files (hard links), a new manifest version, signed again."""
    dest.mkdir(parents=True)
    m = read_manifest_unverified(src)
    for f in m.files:
        (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
        os.link(src / f.path, dest / f.path)
    update: dict[str, object] = {"version": version}
    if break_golden:
        assert m.golden is not None
        wrong = [(t + 1) % m.arch.vocab_size for t in m.golden.expected_token_ids]
        update["golden"] = GoldenCheck(
            prompt_token_ids=m.golden.prompt_token_ids,
            expected_token_ids=wrong,
            latency_budget_ms=m.golden.latency_budget_ms,
        )
    write_signed_manifest(dest, m.model_copy(update=update), key)
    return dest


def test_real_engine_update_and_golden_rollback(
    tmp_path: Path, default_bundle: tuple[Path, Path], mosquitto: Mosquitto, artifacts: ArtifactServer
) -> None:
    bundle, pub = default_bundle
    key = SigningKey.load(pub.parent / "nanofleet.key")

    base = read_manifest_unverified(bundle)
    assert base.golden is not None, "the default bundle must carry golden tokens for the health check"
    v1 = resign(bundle, tmp_path / "v1", key, base.version)  # a private copy to bootstrap from
    v2 = resign(bundle, artifacts.root / "v2", key, base.version + 1)
    bad = resign(bundle, artifacts.root / "bad", key, base.version + 2, break_golden=True)

    cfg = tmp_path / "agent.yaml"
    port = write_config(
        cfg,
        device_id=DEVICE,
        broker_url=mosquitto.url,
        artifacts_url=artifacts.url,
        pub_key=pub,
        data_dir=tmp_path / "data",
        interval_s=1.0,
        bootstrap_bundle=str(v1),
        runtime="engine",
    )
    doc = yaml.safe_load(cfg.read_text())
    doc["limits"]["threads"] = 1
    cfg.write_text(yaml.safe_dump(doc))
    agent = AgentProcess(cfg, port, tmp_path / "data", tmp_path / "agent.log")
    api = f"http://127.0.0.1:{port}"
    observer = Observer(mosquitto.port, DEVICE)

    def ready_version() -> int | None:
        try:
            r = httpx.get(f"{api}/readyz", timeout=30)
        except httpx.HTTPError:
            return None
        return r.json().get("version") if r.status_code == 200 else None

    try:
        agent.start()
        wait_for(lambda: ready_version() == base.version, 180, f"bootstrap ({agent.log})")
        rep = wait_for(lambda: (r := observer.reported()) and r["state"] == "committed" and r, 30, "reported")
        assert rep["committed"]["version"] == base.version

        # OTA to v2 while a streamed answer is in flight: the stream must finish on the old engine
        stream_result: dict[str, object] = {}

        def stream() -> None:
            body = {
                "model": base.name,
                "stream": True,
                "max_tokens": 48,
                "messages": [{"role": "user", "content": "Count from one to twenty."}],
            }
            chunks, done = 0, False
            with httpx.stream("POST", f"{api}/v1/chat/completions", json=body, timeout=120) as r:
                stream_result["status"] = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunks += 1
            stream_result.update(chunks=chunks, done=done)

        t = threading.Thread(target=stream)
        t.start()
        observer.publish_desired(
            DesiredState(
                device_id=DEVICE,
                deployment_id="real-v2",
                bundle=ref_for(v2, "v2/"),
                issued_at=dt.datetime.now(dt.timezone.utc),
            )
        )
        t.join(180)
        assert stream_result.get("status") == 200 and stream_result.get("done") is True, stream_result
        rep = wait_for(
            lambda: (
                (r := observer.reported())
                and r["deployment_id"] == "real-v2"
                and r["state"] == "committed"
                and r
            ),
            240,
            "v2 committed",
        )
        assert rep["committed"]["version"] == base.version + 1
        assert ready_version() == base.version + 1
        results = [
            e for e in observer.of("events") if e["kind"] == "result" and e["deployment_id"] == "real-v2"
        ]
        assert results and results[-1]["details"]["health"]["golden"] is True

        # a bundle whose golden output does not match: refused at activation, v2 keeps serving
        observer.publish_desired(
            DesiredState(
                device_id=DEVICE,
                deployment_id="real-bad",
                bundle=ref_for(bad, "bad/"),
                issued_at=dt.datetime.now(dt.timezone.utc),
            )
        )
        rep = wait_for(
            lambda: (
                (r := observer.reported())
                and r["deployment_id"] == "real-bad"
                and r["state"] == "failed"
                and r
            ),
            240,
            "bad bundle rolled back",
        )
        assert rep["last_result"] == "rolled_back" and "golden" in rep["error"]
        assert ready_version() == base.version + 1
        r = httpx.post(
            f"{api}/v1/chat/completions",
            timeout=120,
            json={"model": base.name, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        tele = observer.of("telemetry")[-1]
        assert tele["model"]["version"] == base.version + 1 and tele["requests"] >= 1
        assert json.loads((tmp_path / "data" / "state.json").read_text())["highest_committed"] == {
            base.name: base.version + 1
        }
        assert agent.stop() == 0
    finally:
        agent.stop()
        observer.close()
