"""What a new user sees when something is wrong at start: one line that says where everything is, each
broker connection failure with its reason and the next retry, `device status` showing the reason, and the
example documents failing in one line without creating anything."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from manifests import write_keypair
from tests.conftest import free_port

from .conftest import REPO, nanofleet


def _agent_config(tmp_path: Path, mqtt_port: int) -> Path:
    _priv, pub = write_keypair(tmp_path / "keys")
    (tmp_path / "mqtt.password").write_text("secret\n")
    doc = {
        "device_id": "lonely-board",
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{mqtt_port}",
            "username": "lonely-board",
            "password_file": "mqtt.password",
            "reconnect_max_s": 4,
        },
        "artifacts": {"base_url": "http://127.0.0.1:9/bundles/"},
        "trusted_keys": [str(pub)],
        "data_dir": "data",
        "api": {"bind": "127.0.0.1", "port": free_port()},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _read_until(proc: subprocess.Popen[bytes], needles: list[str], timeout: float) -> str:
    """The process's output until every needle appeared (or the timeout)."""
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and not all(n in text for n in needles):
        if sel.select(0.5):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            text += chunk.decode(errors="replace")
    return text


def test_agent_says_where_it_is_and_why_it_cannot_connect(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    config = _agent_config(tmp_path, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanofleet.cli", "device", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        out = _read_until(proc, ["next try in 1 s", "next try in 2 s"], timeout=60)
        assert "nanofleet agent " in out and f"(lonely-board): data {tmp_path / 'data'}" in out, out
        assert f"broker mqtt://127.0.0.1:{port}" in out and "local API http://127.0.0.1:" in out, out
        # Each failure: why, and when the next attempt comes (paho's back-off, doubling).
        assert f"cannot connect to the broker 127.0.0.1:{port}: connection refused" in out, out
        assert "next try in 1 s" in out and "next try in 2 s" in out, out
        # `device status` shows the reason too.
        deadline = time.monotonic() + 20
        doc: dict = {}
        while time.monotonic() < deadline:
            r = nanofleet("device", "status", "--config", str(config), "--json")
            doc = json.loads(r.stdout) if r.returncode == 0 else {}
            if doc.get("broker", {}).get("last_error"):
                break
            time.sleep(0.5)
        assert "connection refused" in doc["broker"]["last_error"], doc
        assert "error_reason" in doc and doc["agent_running"] is True
        r = nanofleet("device", "status", "--config", str(config))
        assert f"mqtt://127.0.0.1:{port}: disconnected (connection refused" in r.stdout, r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_agent_with_a_missing_key_fails_in_one_line_before_creating_its_data(tmp_path: Path) -> None:
    config = _agent_config(tmp_path, free_port())
    doc = yaml.safe_load(config.read_text())
    doc["trusted_keys"] = [str(tmp_path / "nope.pub")]
    config.write_text(yaml.safe_dump(doc))
    r = nanofleet("device", "run", "--config", str(config))
    assert r.returncode == 1 and len(r.lines) == 1 and "nope.pub" in r.lines[0], r.lines
    assert not (tmp_path / "data").exists()


def test_fleet_says_where_it_is_and_why_its_broker_is_unreachable(tmp_path: Path) -> None:
    mqtt_port = free_port()  # nothing listens here
    config = tmp_path / "fleet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": "data",
                "port": free_port(),
                "broker": {"embedded": False, "url": f"mqtt://127.0.0.1:{mqtt_port}"},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanofleet.cli", "fleet", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        out = _read_until(proc, ["dashboard http://", "next try in 2 s"], timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert f"(admin token: {tmp_path / 'data' / 'admin.token'})" in out, out
    assert f"broker mqtt://127.0.0.1:{mqtt_port}" in out and f"data {tmp_path / 'data'}" in out, out
    assert f"cannot connect to 127.0.0.1:{mqtt_port}: connection refused; next try in 1 s" in out, out
    assert "next try in 2 s" in out, out
    # Library chatter (migrations, the HTTP server) only with --verbose.
    assert "alembic" not in out and "Uvicorn running" not in out and "Started server process" not in out, out
