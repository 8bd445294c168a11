"""Fixtures of the scale part: a fresh PostgreSQL schema, a private Mosquitto with dynamic security, fleet
server processes sharing them, and the simulated-device swarm of benchmarks/fleet_swarm.py (the load
generator the benchmark uses, at a few dozen devices here)."""

from __future__ import annotations

import re
import secrets
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from benchmarks.fleet_scale import Broker, FleetServer, enrol, fleet_config, missing_acked, stored_seqs
from benchmarks.fleet_swarm import Login, Swarm
from manifests import SigningKey, write_keypair
from tests.fleet.conftest import make_bundle


def wait_for(
    pred: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "condition",
    interval: float = 0.1,
    details: Callable[[], str] | None = None,
) -> Any:
    """``pred()`` once it is true; on timeout an AssertionError naming ``what`` (and ``details()``: the state
    that says why, read only then)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    more = f"\n{details()}" if details is not None else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r}){more}")


@pytest.fixture(scope="session")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Path]:
    key = SigningKey.generate()
    _, pub = write_keypair(tmp_path_factory.mktemp("scale-release-key"), key)
    return key, pub


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, release_key: tuple[SigningKey, Path]) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("scale-bundles")
    return {v: make_bundle(root / f"v{v}", release_key[0], v) for v in (1, 2)}


@pytest.fixture
def pg(pg_url: str) -> Iterator[tuple[str, str]]:
    schema = f"s_{uuid.uuid4().hex[:12]}"
    eng = create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield pg_url, schema
    with eng.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    eng.dispose()


@dataclass
class Cluster:
    """Fleet servers, one broker, one database: what a test of several servers needs."""

    work: Path
    broker: Broker
    database_url: str
    schema: str | None
    release_pub: Path
    admin_token: str = field(default_factory=lambda: "nfa_" + secrets.token_urlsafe(24))
    servers: dict[str, FleetServer] = field(default_factory=dict)
    swarms: list[Swarm] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.signing_key, self.fleet_pub = write_keypair(self.work / "fleet-key", SigningKey.generate())
        self.blobs = self.work / "shared-blobs"

    def server(self, node_id: str, *, shared: bool = True, **extra: Any) -> FleetServer:
        cfg = fleet_config(
            self.work,
            node_id=node_id,
            database_url=self.database_url,
            schema=self.schema,
            broker=self.broker,
            trusted_key=self.release_pub,
            admin_token=self.admin_token,
            signing_key=self.signing_key,
            blobs=self.blobs,
            shared=shared,
            overrides=extra,
        )
        srv = FleetServer(cfg, log_level="info")
        self.servers[node_id] = srv
        return srv.start()

    def admin(self, srv: FleetServer | None = None) -> httpx.Client:
        srv = srv or next(s for s in self.servers.values() if s.alive())
        return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=60)

    def upload(self, bundle: Path) -> None:
        from fleet.client import FleetClient

        srv = next(s for s in self.servers.values() if s.alive())
        with FleetClient(srv.url, self.admin_token) as c:
            c.upload_bundle(bundle)

    def enrol(self, n: int, prefix: str = "sw") -> list[Login]:
        srv = next(s for s in self.servers.values() if s.alive())
        return enrol(srv.url, self.admin_token, n, prefix=prefix)

    def swarm(self, logins: list[Login], **kw: Any) -> Swarm:
        s = Swarm(logins, [self.broker.url], **kw).start()
        self.swarms.append(s)
        return s

    def leader(self) -> FleetServer | None:
        for s in self.servers.values():
            try:
                if s.alive() and s.healthz()["leader"]:
                    return s
            except httpx.HTTPError:
                continue
        return None

    def stored(self, prefix: str = "sw") -> dict[str, set[int]]:
        return stored_seqs(self.database_url, self.schema, prefix)

    def missing(self, swarm: Swarm, prefix: str = "sw") -> int:
        return missing_acked(swarm.acked(), self.stored(prefix))

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{s.tail()}" for n, s in self.servers.items())

    def close(self) -> None:
        for s in self.swarms:
            s.stop()
        for srv in self.servers.values():
            if srv.alive():
                try:
                    srv.stop()
                except Exception:  # noqa: BLE001 - teardown goes on
                    srv.signal(signal.SIGKILL)
        self.broker.stop()


@pytest.fixture
def cluster(tmp_path: Path, pg: tuple[str, str], release_key: tuple[SigningKey, Path]) -> Iterator[Cluster]:
    work = tmp_path / "cluster"
    work.mkdir()
    broker = Broker(work / "broker").start()
    c = Cluster(work, broker, pg[0], pg[1], release_key[1])
    try:
        yield c
    finally:
        c.close()


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus counter/gauge from a server's /metrics (0 when absent)."""
    body = httpx.get(f"{url}/metrics", timeout=10).text
    for line in body.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def manifest(name: str, version: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nanofleet/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"bundle": {"name": "tiny-model", "version": version}, **spec},
    }
