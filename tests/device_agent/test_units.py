"""Unit tests: config validation, the transition table and resume map, the outbox, sd_notify, telemetry."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from device.agent import sdnotify
from device.agent.config import load_config, parse_size
from device.agent.errors import ConfigError, InvalidTransitionError
from device.agent.outbox import Outbox
from device.agent.states import IN_FLIGHT, RESUME_MAP, TRANSITIONS, Event, Resume, State, next_state
from device.agent.telemetry import cpu_temp_c

from ..conftest import REPO

EXAMPLE = REPO / "manifests" / "examples" / "agent.yaml"


def test_example_config_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.device_id == "pi5-lab-001" and cfg.mqtt.port == 8883 and cfg.mqtt.use_tls
    assert len(cfg.trusted_keys) == 2 and cfg.limits.max_file_bytes == 4 * 1024**3


def _write(tmp_path: Path, **changes: object) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    for dotted, value in changes.items():
        node = doc
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"mqtt__url": "http://broker"}, "mqtt.url"),
        ({"device_id": "bad/id"}, "device_id"),
        ({"trusted_keys": []}, "trusted_keys"),
        ({"api__port": 70000}, "api.port"),
        ({"limits__max_file_bytes": "lots"}, "limits.max_file_bytes"),
        ({"telemetry__interval_s": 0}, "telemetry.interval_s"),
        ({"mqtt__tls__key": None}, "tls.cert and tls.key"),
        ({"surprise": 1}, "surprise"),
        ({"data_dir": None}, "data_dir"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, changes: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, **changes))
    assert needle in exc.value.message


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_relative_paths_resolve_against_the_config(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, data_dir="data", trusted_keys=["keys/a.pub"]))
    assert cfg.data_dir == tmp_path / "data" and cfg.trusted_keys == [tmp_path / "keys" / "a.pub"]
    with pytest.raises(ConfigError, match="trusted_keys"):
        cfg.trust_store()


def test_sizes() -> None:
    assert parse_size("64MiB") == 64 * 1024**2 and parse_size("2GB") == 2 * 10**9 and parse_size(5) == 5
    with pytest.raises(ValueError):
        parse_size("2 bananas")


def test_transition_table_is_complete_and_closed() -> None:
    for s in IN_FLIGHT:  # failure anywhere rolls back
        assert TRANSITIONS[(s, Event.ERROR)] is State.ROLLING_BACK
    assert set(RESUME_MAP) == set(State)  # every state's restart is spelled out
    assert RESUME_MAP[State.ACTIVATING][0] is Resume.ROLLBACK
    assert RESUME_MAP[State.DOWNLOADING][0] is Resume.CONTINUE
    happy = [Event.START, Event.DOWNLOADED, Event.VERIFIED, Event.INSTALLED, Event.HEALTHY]
    s = State.IDLE
    for e in happy:
        s = next_state(s, e)
    assert s is State.COMMITTED
    with pytest.raises(InvalidTransitionError):
        next_state(State.IDLE, Event.HEALTHY)
    with pytest.raises(InvalidTransitionError):
        next_state(State.DOWNLOADING, Event.START)  # no second update while one is in flight
    # desired == the committed, serving bundle: every resting state converges to Committed (never Failed)
    for s in (State.IDLE, State.COMMITTED, State.FAILED):
        assert next_state(s, Event.IN_SERVICE) is State.COMMITTED
    for s in (*IN_FLIGHT, State.ROLLING_BACK):
        with pytest.raises(InvalidTransitionError):
            next_state(s, Event.IN_SERVICE)


def test_outbox_order_bound_and_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_entries=10)
    for i in range(25):
        box.put("t", lambda seq, i=i: f"{seq}:{i}".encode())
    assert len(box) == 10 and box.dropped == 15
    got = []
    while (e := box.peek()) is not None:
        got.append(e.payload.decode())
        box.ack(e.id)
    assert got == [f"{i + 1}:{i}" for i in range(15, 25)]
    box.close()
    box = Outbox(tmp_path / "o.sqlite", max_entries=10)  # seq and the drop count survive a restart
    assert box.put("t", lambda seq: b"") == 26 and box.dropped == 15


def test_sd_notify_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1")
        assert sock.recv(100) == b"READY=1"
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval_s() == 10.0
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")


def test_systemd_unit_template() -> None:
    import jinja2

    text = (REPO / "device" / "systemd" / "nanofleet-agent.service.j2").read_text()
    unit = jinja2.Template(text).render(nanofleet_memory_max="3G")
    assert "Type=notify" in unit and "Restart=on-failure" in unit and "WatchdogSec=60" in unit
    assert "nanofleet device run --config /etc/nanofleet/agent.yaml" in unit and "MemoryMax=3G" in unit


def test_cpu_temp(tmp_path: Path) -> None:
    assert cpu_temp_c(str(tmp_path / "none*")) is None
    for i, milli in enumerate(["41000", "52500", "junk"]):
        (tmp_path / f"zone{i}").write_text(milli)
    assert cpu_temp_c(str(tmp_path / "zone*")) == 52.5


def test_cli_status_and_errors(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from nanofleet.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["device", "status", "--config", str(tmp_path / "missing.yaml"), "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["reason"] == "config"
    r = runner.invoke(
        app, ["device", "run", "--config", str(_write(tmp_path, mqtt__url="ftp://x")), "--json"]
    )
    assert r.exit_code == 1 and "mqtt.url" in json.loads(r.stdout)["error"]
    cfg = _write(tmp_path, data_dir=str(tmp_path / "data"))
    r = runner.invoke(app, ["device", "status", "--config", str(cfg), "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["state"] == "idle" and doc["slots"] == {"a": None, "b": None}
    assert doc["agent_running"] is False and doc["broker"]["connected"] is False
    r = runner.invoke(app, ["device", "status", "--config", str(cfg)])
    assert r.exit_code == 0 and "update state: idle" in r.stdout and "agent not running" in r.stdout
