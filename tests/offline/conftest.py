"""Offline-media fixtures: a real fleet service process (SQLite, embedded broker), real `nanofleet` CLI
processes, and device configs for agents that never see a broker (a folder stands in for the stick).

The device side uses the agent tests' fake runtime plug-in (tests/device_agent/fake_runtime.py): the
update state machine, slots, health check and rollback are the real ones; only the model is tiny.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet.client import FleetClient
from manifests import SigningKey, write_keypair
from tests.conftest import REPO, free_port
from tests.device_agent.helpers import make_bundle

BUNDLE = "tiny"
DEPLOY_TIMEOUT = 60.0


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `nanofleet ...` as its own process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nanofleet.cli", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_json(*args: str, expect_rc: int = 0, **kw: Any) -> Any:
    r = cli(*args, "--json", **kw)
    assert r.returncode == expect_rc, f"rc={r.returncode}\nstdout:{r.stdout}\nstderr:{r.stderr}"
    return json.loads(r.stdout)


def popen_cli(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "nanofleet.cli", *args], cwd=REPO, env=full_env, stdout=out, stderr=out
    )


def wait_for(pred: Any, timeout: float = 30.0, what: str = "condition", interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            kill(proc)


class FleetProc:
    """`nanofleet fleet serve` as a real process, plus an admin client."""

    def __init__(self, root: Path, bundle_pub: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.config = root / "fleet.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "data_dir": str(self.data),
                    "host": "127.0.0.1",
                    "port": free_port(),
                    "trusted_keys": [str(bundle_pub)],
                    "tick_s": 0.2,
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> FleetProc:
        info = self.data / "service.json"
        info.unlink(missing_ok=True)
        self.proc = popen_cli(
            "fleet",
            "serve",
            "--config",
            str(self.config),
            "--log-level",
            "warning",
            log=self.root / "fleet.log",
            env=env,
        )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"fleet exited: {(self.root / 'fleet.log').read_text()[-3000:]}")
            if not info.is_file():
                return False
            try:
                with self.admin() as c:
                    c.status()
                return True
            except Exception:  # noqa: BLE001
                return False

        wait_for(up, 60, "the fleet service")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            kill(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    @property
    def url(self) -> str:
        return json.loads((self.data / "service.json").read_text())["url"]

    @property
    def fleet_pub(self) -> Path:
        return self.data / "keys" / "nanofleet.pub"

    def admin(self) -> FleetClient:
        return FleetClient(self.url, (self.data / "admin.token").read_text().strip())

    def fleet(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return cli("fleet", "--config", str(self.config), *args, **kw)

    def fleet_json(self, *args: str, expect_rc: int = 0, **kw: Any) -> Any:
        return cli_json("fleet", "--config", str(self.config), *args, expect_rc=expect_rc, **kw)

    def enroll(self, device_id: str, hardware_class: str = "pi5", data_dir: Path | None = None) -> str:
        """Enrol a board; with ``data_dir``, as the board's enrolment does it: its own key is made there
        (device.agent.ensure_device_key) and the public half registered with the fleet."""
        with self.admin() as c:
            token = c.enrollment_token(uses=1)["token"]
        extra = {}
        if data_dir is not None:
            from device.agent.identity import ensure_device_key

            extra["device_public_key"] = ensure_device_key(data_dir)
        with FleetClient(self.url) as anon:
            return anon.enroll(token, device_id=device_id, hardware_class=hardware_class, **extra)["device_token"]

    def deploy(self, name: str, version: int, device_ids: list[str], **spec: Any) -> dict[str, Any]:
        """Apply, and return once the rollout engine has ticked it (apply only records the plan)."""
        with self.admin() as c:
            res = c.apply(
                {
                    "apiVersion": "nanofleet/v1",
                    "kind": "Deployment",
                    "metadata": {"name": name},
                    "spec": {
                        "bundle": {"name": BUNDLE, "version": version},
                        "selector": {"device_ids": device_ids},
                        **spec,
                    },
                }
            )
            wait_for(
                lambda: (d := c.deployment(name))["updated_at"] != d["created_at"] or d["status"] != "in_progress",
                30,
                what=f"first rollout tick of {name}",
            )
            return res

    def deployment(self, name: str) -> dict[str, Any]:
        with self.admin() as c:
            return c.deployment(name)


@pytest.fixture(scope="session")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Path]:
    d = tmp_path_factory.mktemp("release-key")
    key = SigningKey.generate()
    _, pub = write_keypair(d, key)
    return key, pub


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, release_key: tuple[SigningKey, Path]) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        v: make_bundle(root / f"v{v}", release_key[0], name=BUNDLE, version=v, pad_bytes=256 * 1024) for v in (1, 2, 3)
    }


@pytest.fixture(scope="session")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, release_key: tuple[SigningKey, Path], bundles: dict[int, Path]
) -> Iterator[FleetProc]:
    f = FleetProc(tmp_path_factory.mktemp("fleet"), release_key[1]).start()
    with f.admin() as c:
        for b in bundles.values():
            c.upload_bundle(b)
    yield f
    f.stop()


class Board:
    """A device's config and data dir; the agent runs as `nanofleet device run` or not at all."""

    def __init__(
        self,
        root: Path,
        device_id: str,
        token: str,
        trusted: list[Path],
        *,
        watch: list[Path] | None = None,
        bootstrap: Path | None = None,
        hardware_class: str = "pi5",
    ) -> None:
        self.root = root
        self.device_id = device_id
        self.data = root / "data"
        self.config = root / "agent.yaml"
        doc: dict[str, Any] = {
            "device_id": device_id,
            "hardware_class": hardware_class,
            # Nothing listens there: this board never reaches a broker.
            "mqtt": {
                "url": f"mqtt://127.0.0.1:{free_port()}",
                "username": device_id,
                "password": token,
                "reconnect_max_s": 2,
            },
            "artifacts": {"base_url": f"http://127.0.0.1:{free_port()}/"},
            "trusted_keys": [str(p) for p in trusted],
            "data_dir": str(self.data),
            "api": {"port": free_port()},
            "telemetry": {"interval_s": 0.3},
            "limits": {"disk_margin_bytes": 0},
            "runtime": "tests.device_agent.fake_runtime:factory",
            "offline": {"watch_dirs": [str(p) for p in (watch or [])], "poll_interval_s": 0.2},
        }
        if bootstrap is not None:
            doc["bootstrap_bundle"] = str(bootstrap)
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(doc))
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.proc = popen_cli("device", "run", "--config", str(self.config), env=env, log=self.root / "agent.log")
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def state(self) -> dict[str, Any]:
        p = self.data / "state.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def device(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return cli("device", *args, "--config", str(self.config), **kw)

    def device_json(self, *args: str, expect_rc: int = 0, **kw: Any) -> Any:
        return cli_json("device", *args, "--config", str(self.config), expect_rc=expect_rc, **kw)

    def outbox_len(self) -> int:
        import sqlite3

        db = sqlite3.connect(str(self.data / "outbox.sqlite"))
        try:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            db.close()

    def slot_files(self, slot: str) -> list[str]:
        root = self.data / "slots" / slot
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
