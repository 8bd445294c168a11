"""`nanofleet device enroll` against a real fleet: one command, a validated agent.yaml and key files with the
right modes, an agent that connects with them; and every way it can be refused, with nothing written."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from device.agent.config import load_config
from device.agent.enroll import EnrollError, Enrollment, Systemd, board_mqtt_url, detect_hardware_class, parse_settings
from manifests import load_public_key
from manifests.signing import key_id_of
from tests.conftest import free_port

from .conftest import REPO, RunningFleet, nanofleet


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root: mode and content hash (to prove a refused run changed nothing)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def enroll(fleet_url: str, token: str, data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str] | object:
    return nanofleet("device", "enroll", "--fleet", fleet_url, "--token", token, "--data-dir", str(data_dir), *extra)


def test_enroll_writes_a_working_enrolment(running_fleet: RunningFleet, tmp_path: Path) -> None:
    board = tmp_path / "board"
    token = running_fleet.token(tags={"site": "lab"}, groups=["field"])
    r = enroll(running_fleet.url, token, board, "--device-id", "pi-one", "--set", "limits.threads=1", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["ok"] and summary["device_id"] == "pi-one"
    assert summary["next"] == f"nanofleet device run --config {board / 'agent.yaml'}"

    cfg = load_config(board / "agent.yaml")
    assert cfg.device_id == "pi-one" and cfg.mqtt.username == "pi-one"
    assert cfg.mqtt.url == running_fleet.server.svc.mqtt_url and cfg.mqtt.protocol == "3.1.1"
    assert cfg.artifacts.base_url == running_fleet.url + "/bundles/"
    assert cfg.limits.threads == 1 and cfg.data_dir == board
    # The keys: the fleet's bundle-signing key and its rollback key, both trusted.
    trusted = {key_id_of(load_public_key(p)) for p in cfg.trusted_keys}
    assert trusted == {running_fleet.bundle_key.key_id, running_fleet.server.svc.signing_key.key_id}
    for name in ("mqtt.password", "api.token"):
        assert (board / name).stat().st_mode & 0o777 == 0o600, name
    assert (board / "agent.yaml").stat().st_mode & 0o777 == 0o640
    assert not list(board.glob(".enroll-*"))
    # The password is this board's fleet credential (and nobody else's).
    password = cfg.mqtt.resolved_password()
    assert password and password.startswith("nfd_")
    ok = httpx.get(
        f"{running_fleet.url}/api/v1/devices/pi-one/desired", headers={"Authorization": f"Bearer {password}"}
    )
    assert ok.status_code not in (401, 403), ok.text
    with running_fleet.admin() as admin:
        dev = admin.device("pi-one")
    assert dev["tags"] == {"site": "lab"} and dev["groups"] == ["field"]
    # The board's own key, made here (0600, in its data folder), its public half registered with the fleet.
    key_file = board / "device.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    from device.agent import load_device_key
    from fleet.db import Device

    with running_fleet.server.svc.sessions() as s:
        registered = s.get(Device, "pi-one").public_key
    assert registered == load_device_key(board).public_pem().decode("ascii")


@pytest.mark.slow
def test_enrolled_agent_connects_to_the_fleet(running_fleet: RunningFleet, tmp_path: Path) -> None:
    """The next command the enrolment prints works: the agent starts from the written config and the fleet
    sees the board online."""
    board = tmp_path / "board"
    r = enroll(running_fleet.url, running_fleet.token(), board, "--device-id", "pi-two", "--api-port", str(free_port()))
    assert r.returncode == 0, r.stderr
    next_cmd = [line for line in r.stdout.splitlines() if line.startswith("next: ")][0].removeprefix("next: ")
    assert next_cmd.startswith("nanofleet device run --config ")
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen(
        [sys.executable, "-m", "nanofleet.cli", *next_cmd.split()[1:]], stdout=log, stderr=subprocess.STDOUT, cwd=REPO
    )
    try:
        deadline = time.monotonic() + 60
        online = False
        with running_fleet.admin() as admin:
            while time.monotonic() < deadline and not online:
                online = bool(admin.device("pi-two").get("online"))
                time.sleep(0.5)
        assert online, (tmp_path / "agent.log").read_text()[-3000:]
    finally:
        agent.terminate()
        agent.wait(30)
        log.close()


def test_rerun_on_an_enrolled_board_changes_nothing(running_fleet: RunningFleet, tmp_path: Path) -> None:
    board = tmp_path / "board"
    assert enroll(running_fleet.url, running_fleet.token(), board, "--device-id", "b1").returncode == 0
    before = snapshot(board)
    fresh = running_fleet.token()
    r = enroll(running_fleet.url, fresh, board, "--device-id", "b1-again")
    assert r.returncode == 1 and len(r.lines) == 1, r.lines
    assert "already" in r.lines[0] and "Traceback" not in r.stderr
    assert snapshot(board) == before
    # Refused before the fleet was asked: the fresh token is still unspent.
    other = tmp_path / "other"
    assert enroll(running_fleet.url, fresh, other, "--device-id", "b2").returncode == 0


def test_used_token_unreachable_fleet_and_non_fleet_fail_in_one_line(
    running_fleet: RunningFleet, tmp_path: Path
) -> None:
    token = running_fleet.token()
    expired = running_fleet.token(ttl_s=0.5)
    assert enroll(running_fleet.url, token, tmp_path / "first", "--device-id", "u1").returncode == 0
    time.sleep(0.6)  # past the expired token's half-second life
    cases = {
        "used": (running_fleet.url, token, "refused the enrolment token"),
        "expired": (running_fleet.url, expired, "refused the enrolment token"),
        "closed port": (f"http://127.0.0.1:{free_port()}", "nfe_x", "cannot reach the fleet"),
    }
    with _NotAFleet() as url:
        cases["not a fleet"] = (url, "nfe_x", "is not a nanofleet fleet")
        for what, (url_, tok, expect) in cases.items():
            target = tmp_path / "new" / what.replace(" ", "-")
            r = enroll(url_, tok, target, "--device-id", "u2")
            assert r.returncode == 1, (what, r.stdout, r.stderr)
            assert len(r.lines) == 1 and expect in r.lines[0], (what, r.lines)
            assert not (tmp_path / "new").exists(), what  # not even an empty folder


def test_taken_device_id_and_bad_settings_spend_nothing(running_fleet: RunningFleet, tmp_path: Path) -> None:
    token = running_fleet.token(uses=2)
    assert enroll(running_fleet.url, token, tmp_path / "a", "--device-id", "same").returncode == 0
    r = enroll(running_fleet.url, token, tmp_path / "b", "--device-id", "same")
    assert r.returncode == 1 and "already has a device 'same'" in r.lines[0], r.lines
    assert not (tmp_path / "b").exists()
    # A setting the agent's config model refuses: refused before the token is spent.
    r = enroll(running_fleet.url, token, tmp_path / "c", "--device-id", "c1", "--set", "limits.threads=0")
    assert r.returncode == 1 and len(r.lines) == 1 and "threads" in r.lines[0], r.lines
    r = enroll(running_fleet.url, token, tmp_path / "c", "--device-id", "c1", "--set", "nonsense")
    assert r.returncode == 1 and "key.path=value" in r.lines[0], r.lines
    assert not (tmp_path / "c").exists()
    assert enroll(running_fleet.url, token, tmp_path / "c", "--device-id", "c1").returncode == 0


def test_json_errors(running_fleet: RunningFleet, tmp_path: Path) -> None:
    r = enroll(running_fleet.url, "nfe_wrong", tmp_path / "x", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["reason"] == "enroll" and "token" in doc["error"]


# --- units --------------------------------------------------------------------------------------------


def test_board_mqtt_url_replaces_unroutable_hosts() -> None:
    assert board_mqtt_url("mqtt://0.0.0.0:1883", "http://fleet.lan:8600")[0] == "mqtt://fleet.lan:1883"
    assert board_mqtt_url("mqtt://127.0.0.1:1883", "http://10.0.0.5:8600")[0] == "mqtt://10.0.0.5:1883"
    # The fleet on this same machine: loopback is right.
    assert board_mqtt_url("mqtt://127.0.0.1:1883", "http://127.0.0.1:8600") == ("mqtt://127.0.0.1:1883", None)
    assert board_mqtt_url("mqtts://broker.lan:8883", "http://fleet.lan") == ("mqtts://broker.lan:8883", None)


def test_parse_settings_and_hardware_detection(tmp_path: Path) -> None:
    assert parse_settings(["limits.threads=2", "api.bind=0.0.0.0", "limits.weights_cache=false"]) == {
        "limits.threads": 2,
        "api.bind": "0.0.0.0",
        "limits.weights_cache": False,
    }
    with pytest.raises(EnrollError):
        parse_settings(["Limits.Threads=2"])
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert detect_hardware_class(model) == "pi5"
    assert detect_hardware_class(tmp_path / "none") is None


def test_systemd_unit_is_rendered_installed_and_verified(tmp_path: Path) -> None:
    ran: list[list[str]] = []
    unit = Systemd(unit_dir=tmp_path / "units", user="root", run=ran.append)
    (tmp_path / "units").mkdir()
    cfg_dir = tmp_path / "etc"
    cfg_dir.mkdir()
    for name in ("agent.yaml", "mqtt.password", "api.token"):
        (cfg_dir / name).write_text("x")
    e = Enrollment("b", cfg_dir / "agent.yaml", tmp_path / "data", "http://f", "mqtt://f", [], "http://a", [])
    if __import__("os").geteuid() != 0:
        pytest.skip("chown to the service user needs root")  # the test machine runs as root
    path = unit.install(e)
    text = path.read_text()
    assert f"--config {cfg_dir / 'agent.yaml'}" in text and f"ReadWritePaths={tmp_path / 'data'}" in text
    assert "Type=notify" in text and "User=root" in text
    assert ran == [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "nanofleet-agent.service"]]
    assert (cfg_dir / "mqtt.password").stat().st_mode & 0o777 == 0o640
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian package systemd) is needed to check the unit"
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "nanofleet" not in proc.stderr, proc.stderr


class _NotAFleet:
    """Any web server that is not a fleet: it answers 404 to everything."""

    def __enter__(self) -> str:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
        self.httpd.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()


@pytest.fixture(autouse=True)
def _no_stray(tmp_path: Path) -> Iterator[None]:
    yield
