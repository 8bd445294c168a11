"""The fleet at scale: simulated devices (benchmarks/fleet_swarm.py, each its own MQTT session with its own
credentials) against real fleet servers, a real Mosquitto with dynamic security and PostgreSQL.

The harness here is shared by the benchmark below and by tests/scale/ (small and fast):

- ``Broker``: a private Mosquitto on a free port: dynamic security for device logins (the fleet creates
  and deletes them), the pattern ACL file that confines each device to its own topics, persistence, and
  queue limits sized for the fleet's sessions.
- ``FleetServer``: one ``nanofleet fleet serve`` process (SIGTERM, SIGKILL and restart it).
- ``enrol``: devices enrolled over the REST API, as boards do.
- ``stored_seqs``: what the database holds, to check against what the broker acknowledged.

The benchmark (``python benchmarks/fleet_scale.py --help``) runs in two steps, since enrolling 10,000
devices takes minutes (Mosquitto 2.0's dynamic security rewrites its whole JSON file on every change):
``setup`` enrols the devices and keeps the database, the broker's state and the credentials in a work
directory; ``run`` starts two fleet servers sharing PostgreSQL, connects every device, and measures:
telemetry at a fixed rate (loss, commit lag, fleet RSS), two rollouts (all at once, waves: apply latency,
convergence seen by the fleet after the last device committed), the devices list and dashboard overview
latencies, and a SIGKILL of the lease holder mid-rollout (takeover time, completion, no acknowledged
message missing). Results: JSON (``--out``) and the table in docs/benchmarks.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.fleet_swarm import Login, Swarm  # noqa: E402
from fleet.accounts import acl_file_text  # noqa: E402

FLEET_USER = "nanofleet-fleet"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Broker:
    """A private Mosquitto with dynamic security (see the module docstring)."""

    def __init__(self, workdir: Path, *, port: int | None = None, fleet_password: str | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.fleet_password = fleet_password or secrets.token_urlsafe(18)
        self.dynsec = workdir / "dynamic-security.json"
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if not self.dynsec.exists():
            # The fleet's user is the plugin's admin: it creates device clients and its own role.
            subprocess.run(
                ["mosquitto_ctrl", "dynsec", "init", str(self.dynsec), FLEET_USER, self.fleet_password],
                check=True,
                capture_output=True,
                timeout=30,
            )
            (workdir / "fleet.password").write_text(self.fleet_password)
        else:
            self.fleet_password = (workdir / "fleet.password").read_text()
        (workdir / "acl").write_text(acl_file_text(FLEET_USER))
        self.conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous false",
                    "per_listener_settings false",
                    "user root",  # the harness runs as root in a private directory; production uses its own user
                    "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                    f"plugin_opt_config_file {self.dynsec}",
                    f"acl_file {workdir / 'acl'}",
                    "persistence true",
                    f"persistence_location {workdir}/",
                    "autosave_interval 60",
                    # The fleet's sessions must hold a backlog (a restart, a takeover) without dropping it.
                    "max_queued_messages 2000000",
                    "max_queued_bytes 0",
                    "max_inflight_messages 1000",
                    "set_tcp_nodelay true",
                    "",
                ]
            )
        )

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        log = open(self.log, "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log, preexec_fn=_raise_fd_limit
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def fleet_config(
    workdir: Path,
    *,
    node_id: str,
    database_url: str,
    schema: str | None,
    broker: Broker,
    trusted_key: Path,
    admin_token: str,
    signing_key: Path,
    blobs: Path,
    shared: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A fleet server's config file (several servers: one per node id, everything else shared)."""
    cfg: dict[str, Any] = {
        "data_dir": str(workdir / node_id),
        "database_url": database_url,
        "database_schema": schema,
        "port": 0,
        "admin_token": admin_token,
        "signing_key": str(signing_key),
        "trusted_keys": [str(trusted_key)],
        "blobs": {"path": str(blobs)},
        "broker": {
            "embedded": False,
            "url": broker.url,
            "username": FLEET_USER,
            "password": broker.fleet_password,
            "accounts": "dynsec",
        },
        "cluster": {"shared": shared, "node_id": node_id, "lease_poll_s": 0.5},
        "tick_s": 0.5,
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = workdir / f"{node_id}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class FleetServer:
    """One ``nanofleet fleet serve`` process."""

    def __init__(self, config: Path, *, log_level: str = "warning") -> None:
        self.config = config
        self.data_dir = Path(yaml.safe_load(config.read_text())["data_dir"])
        self.log = config.with_suffix(".log")
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 90.0) -> FleetServer:
        info = self.data_dir / "service.json"
        info.unlink(missing_ok=True)
        log = open(self.log, "ab")  # noqa: SIM115 - the process keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanofleet.cli", "fleet", "serve", "-c", str(self.config), "--log-level",
             self.log_level],
            stdout=log,
            stderr=log,
            cwd=REPO,
            preexec_fn=_raise_fd_limit,
        )
        deadline = time.monotonic() + timeout
        while not info.is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fleet server {self.config.stem} did not start:\n{self.tail()}")
            time.sleep(0.1)
        self.url = json.loads(info.read_text())["url"]
        return self

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def healthz(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/healthz", timeout=5).json()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(60)

    def stop(self) -> None:
        self.signal(signal.SIGTERM)


def enrol(url: str, admin_token: str, n: int, *, prefix: str, workers: int = 4, start: int = 0) -> list[Login]:
    """Enrol ``n`` devices over the REST API (``prefix-00000``...), a few at a time."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    token = httpx.post(
        f"{url}/api/v1/enrollment-tokens", json={"uses": n, "ttl_s": 7 * 86400}, headers=headers, timeout=60
    ).raise_for_status().json()["token"]

    def one(i: int, http: httpx.Client) -> Login:
        device_id = f"{prefix}-{start + i:05d}"
        for attempt in range(5):
            r = http.post(f"{url}/api/v1/enroll", json={"token": token, "device_id": device_id}, timeout=120)
            if r.status_code == 503 and attempt < 4:
                time.sleep(1 + attempt)
                continue
            body = r.raise_for_status().json()
            return Login(body["device_id"], body["mqtt"]["username"], body["mqtt"]["password"])
        raise RuntimeError("unreachable")

    out: list[Login] = [None] * n  # type: ignore[list-item]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        clients = [httpx.Client() for _ in range(workers)]
        futures = {pool.submit(one, i, clients[i % workers]): i for i in range(n)}
        for f in concurrent.futures.as_completed(futures):
            out[futures[f]] = f.result()
        for cl in clients:
            cl.close()
    return out


def stored_seqs(database_url: str, schema: str | None, prefix: str) -> dict[str, set[int]]:
    """(device -> telemetry seqs) the database holds for devices whose id starts with ``prefix``."""
    from sqlalchemy import select

    from fleet.db import TelemetrySample, make_engine

    engine = make_engine(database_url, schema)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(TelemetrySample.device_id, TelemetrySample.seq).where(
                    TelemetrySample.device_id.like(f"{prefix}%")
                )
            )
            out: dict[str, set[int]] = {}
            for device_id, seq in rows:
                out.setdefault(device_id, set()).add(seq)
            return out
    finally:
        engine.dispose()


def missing_acked(acked: dict[str, list[int]], stored: dict[str, set[int]]) -> int:
    """Acknowledged telemetry messages the database does not hold."""
    return sum(len(set(seqs) - stored.get(device, set())) for device, seqs in acked.items())


@contextlib.contextmanager
def swarm(logins: Sequence[Login], urls: Sequence[str], **kw: Any) -> Iterator[Swarm]:
    s = Swarm(logins, urls, **kw).start()
    try:
        yield s
    finally:
        s.stop()


