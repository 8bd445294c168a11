"""Real agent processes (`python -m nanofleet.cli device run`) and an MQTT observer for the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from manifests import mqtt as contract

from ..conftest import REPO, free_port

# Waits end as soon as the condition holds; the scale only matters on a loaded machine.
TIMEOUT_SCALE = float(os.environ.get("NANOFLEET_TEST_TIMEOUT_SCALE", "3"))


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_config(
    path: Path,
    *,
    device_id: str,
    broker_url: str,
    artifacts_url: str,
    pub_key: Path,
    data_dir: Path,
    interval_s: float = 0.5,
    **extra: Any,
) -> int:
    port = free_port()
    doc = {
        "device_id": device_id,
        "mqtt": {"url": broker_url, "keepalive_s": 5, "reconnect_max_s": 1},
        "artifacts": {"base_url": artifacts_url, "retries": 3, "timeout_s": 5},
        "trusted_keys": [str(pub_key)],
        "data_dir": str(data_dir),
        "api": {"bind": "127.0.0.1", "port": port},
        "telemetry": {"interval_s": interval_s, "queue_max_entries": 1000},
        "limits": {"disk_margin_bytes": 0},
        "runtime": "tests.device_agent.fake_runtime:factory",
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return port


class AgentProcess:
    def __init__(self, config: Path, api_port: int, data_dir: Path, log: Path) -> None:
        self.config, self.api_port, self.data_dir, self.log = config, api_port, data_dir, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> AgentProcess:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        for k in ("NANOFLEET_AGENT_PAUSE_IN", "NANOFLEET_AGENT_FAIL_IN"):
            if k not in env:
                full_env.pop(k, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanofleet.cli", "device", "run", "--config", str(self.config)],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),  # noqa: SIM115
        )
        return self

    def serving(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.api_port}/model", timeout=1)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def wait_paused(self, state: str, timeout: float = 30) -> None:
        wait_for(
            lambda: (self.data_dir / f"paused-in-{state}").exists() or self._dead(),
            timeout,
            f"agent to pause in {state}",
        )
        assert not self._dead(), f"agent exited: {self.log.read_text()[-3000:]}"

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for p in self.data_dir.glob("paused-in-*"):
            p.unlink()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def state(self) -> dict[str, Any]:
        return json.loads((self.data_dir / "state.json").read_text())


class Observer:
    """The fleet's side: a persistent-session subscriber that records every message in arrival order."""

    def __init__(self, port: int, device_id: str, client_id: str = "observer") -> None:
        self.device_id = device_id
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        c.on_message = self._on_message
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.connected.clear()
        c.reconnect_delay_set(0.2, 1)
        self.client = c
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        c.connect("127.0.0.1", port, keepalive=5, clean_start=False, properties=props)
        c.loop_start()
        wait_for(self.connected.is_set, 10, "observer connection")

    def _on_connect(self, client, userdata, flags, rc, props) -> None:  # noqa: ANN001
        client.subscribe(f"{contract.PREFIX}/devices/{self.device_id}/#", qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def of(self, leaf: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith("/" + leaf) and p]

    def reported(self) -> dict[str, Any] | None:
        r = self.of("reported")
        return r[-1] if r else None

    def publish_desired(self, desired: contract.DesiredState) -> None:
        info = self.client.publish(
            contract.desired_topic(self.device_id), desired.to_bytes(), qos=1, retain=True
        )
        info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
