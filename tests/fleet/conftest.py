"""Fleet test fixtures: signed bundles, a running fleet service (SQLite or PostgreSQL, embedded broker
or a real mosquitto), an admin client and simulated devices."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from benchmarks.sample_bundle import BUNDLE, make_bundle
from fleet.client import FleetClient
from fleet.config import FleetConfig
from fleet.server import ServerThread
from manifests import SigningKey, TrustStore, load_public_key, write_keypair

from .simdevice import Behaviour, SimDevice

__all__ = ["BUNDLE", "make_bundle"]  # make_bundle: imported from here by most fleet tests


@pytest.fixture(scope="session")
def bundle_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Path]:
    d = tmp_path_factory.mktemp("bundle-key")
    key = SigningKey.generate()
    _, pub = write_keypair(d, key)
    return key, pub


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, bundle_key: tuple[SigningKey, Path]) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {v: make_bundle(root / f"v{v}", bundle_key[0], v) for v in (1, 2, 3)}


class _Enrol:
    """Enrols simulated devices against a running fleet, as a real agent would (over HTTP)."""

    url: str
    bundle_pub: Path
    devices: list[SimDevice]

    def admin(self) -> FleetClient:  # pragma: no cover - overridden
        raise NotImplementedError

    def enroll(
        self,
        n: int,
        *,
        behaviour: Behaviour | None = None,
        tags: dict[str, str] | None = None,
        groups: list[str] | None = None,
        prefix: str = "sim",
        **kw: Any,
    ) -> list[SimDevice]:
        with self.admin() as admin:
            token = admin.enrollment_token(uses=n, tags=tags or {}, groups=groups or [])["token"]
        out = []
        with FleetClient(self.url) as anon:
            for i in range(n):
                creds = anon.enroll(token, device_id=f"{prefix}-{len(self.devices) + i:02d}", hardware_class="sim")
                dev = SimDevice(
                    creds["device_id"],
                    creds["mqtt"]["url"],
                    username=creds["mqtt"]["username"],
                    password=creds["mqtt"]["password"],
                    bundle_trust=TrustStore.from_paths([self.bundle_pub]),
                    fleet_trust=TrustStore([load_public_key(creds["fleet_public_key"].encode())]),
                    behaviour=behaviour or Behaviour(),
                    **kw,
                )
                dev.token = creds["device_token"]  # type: ignore[attr-defined]
                out.append(dev.start())
        self.devices += out
        return out


class Fleet(_Enrol):
    """The service in a thread of the test process."""

    def __init__(self, config: FleetConfig, bundle_pub: Path) -> None:
        self.config = config
        self.bundle_pub = bundle_pub
        self.server: ServerThread | None = None
        self.devices = []

    def start(self) -> Fleet:
        self.server = ServerThread(self.config.model_copy(deep=True)).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def url(self) -> str:  # type: ignore[override]
        assert self.server is not None
        return self.server.url

    @property
    def svc(self) -> Any:
        assert self.server is not None
        return self.server.svc

    def admin(self) -> FleetClient:
        return FleetClient(self.url, self.svc.admin_token)

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        self.stop()


class ProcessFleet(_Enrol):
    """The service as a real `nanofleet fleet serve` process, so a test can SIGKILL it."""

    def __init__(self, config_path: Path, data_dir: Path, bundle_pub: Path) -> None:
        self.config_path, self.data_dir, self.bundle_pub = config_path, data_dir, bundle_pub
        self.proc: subprocess.Popen[bytes] | None = None
        self.devices = []
        self.url = ""
        self.log = data_dir.parent / "fleet-serve.log"

    def start(self) -> ProcessFleet:
        info = self.data_dir / "service.json"
        info.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nanofleet.cli",
                    "fleet",
                    "serve",
                    "-c",
                    str(self.config_path),
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=log,
            )
        proc = self.proc
        wait_for(lambda: info.is_file() or proc.poll() is not None, 90, what="fleet process up")
        assert proc.poll() is None, self.log.read_text()[-3000:]
        self.url = json.loads(info.read_text())["url"]
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def admin(self) -> FleetClient:
        return FleetClient(self.url, (self.data_dir / "admin.token").read_text().strip())

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def pg_schema(pg_url: str) -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL schema for one test, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    eng = create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield pg_url, schema
    with eng.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    eng.dispose()


@pytest.fixture
def make_fleet(tmp_path: Path, bundle_key: tuple[SigningKey, Path]) -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def factory(
        *,
        database_url: str | None = None,
        schema: str | None = None,
        broker_url: str | None = None,
        **overrides: Any,
    ) -> Fleet:
        cfg = FleetConfig(
            data_dir=tmp_path / f"fleet{len(fleets)}",
            database_url=database_url,
            database_schema=schema,
            port=0,
            trusted_keys=[bundle_key[1]],
            tick_s=0.1,
            **overrides,
        )
        if broker_url:
            cfg.broker.embedded = False
            cfg.broker.url = broker_url
        f = Fleet(cfg, bundle_key[1]).start()
        # Keep the chosen port across restarts.
        f.config.port = f.svc.config.port
        fleets.append(f)
        return f

    yield factory
    for f in fleets:
        f.close()


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "condition") -> Any:
    import time

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
