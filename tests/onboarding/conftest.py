"""A real fleet (in a thread of the test process: SQLite, embedded broker, HTTP) for the onboarding tests,
and a runner for `nanofleet ...` as a real process, the way a new user types it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.client import FleetClient
from fleet.config import FleetConfig
from fleet.server import ServerThread
from manifests import SigningKey, write_keypair

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [x for x in (self.stdout + self.stderr).splitlines() if x.strip()]


def nanofleet(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Proc:
    r = subprocess.run(
        [sys.executable, "-m", "nanofleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    return Proc(r.returncode, r.stdout, r.stderr)


@dataclass
class RunningFleet:
    server: ServerThread
    bundle_key: SigningKey
    bundle_pub: Path

    @property
    def url(self) -> str:
        return self.server.url

    def admin(self) -> FleetClient:
        return FleetClient(self.url, self.server.svc.admin_token)

    def token(self, uses: int = 1, **kw: object) -> str:
        with self.admin() as a:
            return a.enrollment_token(uses=uses, **kw)["token"]


@pytest.fixture
def running_fleet(tmp_path: Path) -> Iterator[RunningFleet]:
    key = SigningKey.generate()
    _priv, pub = write_keypair(tmp_path / "bundle-keys", key)
    cfg = FleetConfig(data_dir=tmp_path / "fleet", port=0, trusted_keys=[pub], tick_s=0.25)
    cfg.broker.keepalive_s = 10
    server = ServerThread(cfg).start()
    try:
        yield RunningFleet(server, key, pub)
    finally:
        server.stop()
