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
                    # Sessions are named by login: no device can take over another's, or the fleet's.
                    "use_username_as_clientid true",
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
                    # Over every payload cap the fleet has (fleet/validation.py), as the ansible role sets it.
                    "max_packet_size 262144",
                    "connection_messages true",
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
    broker: Broker | str,
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
        # Our Mosquitto: the fleet's login and dynamic security; a bare URL: a broker without logins.
        "broker": {
            "embedded": False,
            "url": broker.url,
            "username": FLEET_USER,
            "password": broker.fleet_password,
            "accounts": "dynsec",
        }
        if isinstance(broker, Broker)
        else {"embedded": False, "url": broker},
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
            [
                sys.executable,
                "-m",
                "nanofleet.cli",
                "fleet",
                "serve",
                "-c",
                str(self.config),
                "--log-level",
                self.log_level,
            ],
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
    token = (
        httpx.post(f"{url}/api/v1/enrollment-tokens", json={"uses": n, "ttl_s": 7 * 86400}, headers=headers, timeout=60)
        .raise_for_status()
        .json()["token"]
    )

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


# --- the benchmark ------------------------------------------------------------------------------------
# Everything below drives the harness above; docs/benchmarks.md ("Fleet at scale") has the results.

BENCH_SCHEMA = "bench_fleet"
DEFAULT_WORK = Path("/tmp/nanofleet-fleet-scale")


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _rss_mb(pid: int) -> float:
    """Resident memory of one process (VmRSS), in MiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _proc_ticks(pid: int, children: bool = False) -> int:
    """CPU clock ticks (user + system, every thread) a process used so far; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    f = stat[stat.rindex(")") + 2 :].split()
    return int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if children else 0)


def _postgres_pids() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "comm").read_text().startswith("postgres"):
                    out.append(int(p.name))
    return out


def _machine_ticks() -> tuple[int, int]:
    """(busy, stolen) clock ticks of the whole machine so far. /proc/stat's first line: user nice system idle
    iowait irq softirq steal guest guest_nice; guest time is already in user, steal is time the hypervisor
    gave this VM's CPUs to someone else (a VM slowed from outside shows it there, not in any process)."""
    v = list(map(int, Path("/proc/stat").read_text().splitlines()[0].split()[1:]))
    return sum(v[:3]) + v[5] + v[6], v[7]


class CpuShare:
    """Where the machine's CPU goes over a window, in cores: the swarm (this process, the probe it starts
    included), each fleet server, Mosquitto, PostgreSQL (every backend), and everything else."""

    def __init__(self, servers: dict[str, int], broker: int | None) -> None:
        import os

        self.me = os.getpid()
        self.pids = {"swarm": self.me, **{f"server {n}": pid for n, pid in servers.items()}}
        if broker is not None:
            self.pids["mosquitto"] = broker
        self.t0, self.start = time.monotonic(), self._snap()
        self.tasks: dict[str, list[int]] = {}  # group -> [threads running or runnable, in disk sleep], summed
        self.task_samples = 0

    def sample_tasks(self) -> None:
        """Count, once, the threads that the load average counts (state R: running or waiting for a CPU; D:
        uninterruptible, e.g. waiting for an fsync), by group. The load is their average over time."""
        import threading

        groups = {pid: k for k, pid in self.pids.items()}
        mine = str(threading.get_native_id())  # this sampling thread: not part of the load it measures
        seen: dict[str, list[int]] = {}
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            pid = int(p.name)
            try:
                group = groups.get(pid) or (
                    "postgresql" if (p / "comm").read_text().startswith("postgres") else "other"
                )
                tasks = list((p / "task").iterdir())
            except OSError:
                continue
            c = seen.setdefault(group, [0, 0])
            for t in tasks:
                if t.name == mine:
                    continue
                with contextlib.suppress(OSError, IndexError):
                    st = (t / "stat").read_text()
                    state = st[st.rindex(")") + 2]
                    c[0] += state == "R"
                    c[1] += state == "D"
        for group, (r, d) in seen.items():
            x = self.tasks.setdefault(group, [0, 0])
            x[0] += r
            x[1] += d
        self.task_samples += 1

    def load_shares(self) -> dict[str, dict[str, float]]:
        """Per group, the average number of R and D threads over the samples taken (they sum to the load)."""
        n = max(1, self.task_samples)
        return {k: {"R": round(r / n, 2), "D": round(d / n, 2)} for k, (r, d) in sorted(self.tasks.items())}

    def _snap(self) -> dict[str, Any]:
        return {
            "procs": {k: _proc_ticks(pid) for k, pid in self.pids.items()},
            # The probe, and a server this process SIGKILLed and reaped: counted in its children's time.
            "reaped": _proc_ticks(self.me, children=True) - _proc_ticks(self.me),
            "postgres": {pid: _proc_ticks(pid) for pid in _postgres_pids()},
            "machine": _machine_ticks(),
        }

    def cores(self) -> dict[str, float]:
        import os

        end, s = self._snap(), max(1e-6, time.monotonic() - self.t0) * os.sysconf("SC_CLK_TCK")
        a = self.start
        # A server killed and reaped in the window: its whole life's ticks moved to the children's count, so
        # what it used before the window is taken off again and its share in the window is counted there.
        gone = {k for k, t in a["procs"].items() if t and end["procs"].get(k, 0) == 0}
        out = {k: 0.0 if k in gone else (end["procs"][k] - a["procs"].get(k, 0)) / s for k in end["procs"]}
        gone_before = sum(a["procs"][k] for k in gone)
        out["reaped children (probe, killed server)"] = (end["reaped"] - a["reaped"] - gone_before) / s
        out["postgresql"] = sum(t - a["postgres"].get(pid, 0) for pid, t in end["postgres"].items()) / s
        machine = (end["machine"][0] - a["machine"][0]) / s
        out["other"] = machine - sum(out.values())
        out["machine"] = machine
        out["stolen by the hypervisor"] = (end["machine"][1] - a["machine"][1]) / s
        return {k: round(max(0.0, v), 2) for k, v in out.items()}


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {' '.join(map(str, _load()))}] {msg}", file=sys.stderr, flush=True)


def _reset_schema(database_url: str, schema: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(database_url)
    with eng.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    eng.dispose()


def _sql(database_url: str, statement: str, schema: str = BENCH_SCHEMA) -> Any:
    from sqlalchemy import create_engine, text

    eng = create_engine(database_url)
    try:
        with eng.begin() as conn:
            conn.execute(text(f'SET search_path TO "{schema}"'))
            r = conn.execute(text(statement))
            return r.scalar() if r.returns_rows else None
    finally:
        eng.dispose()


def _configs(work: Path, state: dict[str, Any], broker: Broker, nodes: Sequence[str]) -> list[Path]:
    return [
        fleet_config(
            work,
            node_id=n,
            database_url=state["database_url"],
            schema=state.get("schema", BENCH_SCHEMA),
            broker=broker,
            trusted_key=Path(state["release_pub"]),
            admin_token=state["admin_token"],
            signing_key=Path(state["fleet_key"]),
            blobs=work / "blobs",
        )
        for n in nodes
    ]


def bench_setup(
    work: Path, devices: int, database_url: str, workers: int, schema: str = BENCH_SCHEMA
) -> dict[str, Any]:
    """Enrol ``devices`` devices (logins in dynamic security, rows in PostgreSQL) and upload three bundles."""
    from benchmarks.sample_bundle import make_bundle
    from fleet.client import FleetClient
    from manifests import SigningKey, write_keypair

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    release_key = SigningKey.generate()
    _, release_pub = write_keypair(work / "release-key", release_key)
    fleet_key, _ = write_keypair(work / "fleet-key", SigningKey.generate())
    state = {
        "database_url": database_url,
        "schema": schema,
        "admin_token": "nfa_" + secrets.token_urlsafe(24),
        "release_pub": str(release_pub),
        "fleet_key": str(fleet_key),
        "devices": devices,
    }
    _reset_schema(database_url, schema)
    broker = Broker(work / "broker").start()
    (cfg,) = _configs(work, state, broker, ["setup"])
    srv = FleetServer(cfg).start()
    try:
        with FleetClient(srv.url, state["admin_token"]) as c:
            for v in (1, 2, 3):
                c.upload_bundle(make_bundle(work / "bundles" / f"v{v}", release_key, v))
        t0 = time.monotonic()
        logins = enrol(srv.url, state["admin_token"], devices, prefix="dev", workers=workers)
        state["enrol_s"] = round(time.monotonic() - t0, 1)
    finally:
        srv.stop()
        broker.stop()
    (work / "logins.json").write_text(json.dumps([[x.device_id, x.username, x.password] for x in logins]))
    (work / "state.json").write_text(json.dumps(state, indent=2))
    return {"devices": devices, "enrol_s": state["enrol_s"], "enrol_per_s": round(devices / state["enrol_s"], 1)}


def _metrics(url: str) -> dict[str, float]:
    """Every un-labelled-or-labelled sample of a server's /metrics, by its full name."""
    out: dict[str, float] = {}
    with contextlib.suppress(httpx.HTTPError):
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
    return out


def _lag(before: Sequence[dict[str, float]], after: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Commit lag (device send to fleet commit) over a phase, from the servers' histogram buckets."""
    prefix = "nanofleet_ingest_commit_lag_seconds_bucket{le="
    les = sorted({k for a in after for k in a if k.startswith(prefix)}, key=lambda k: float(k[len(prefix) + 1 : -2]))
    counts = [sum(a.get(k, 0) for a in after) - sum(b.get(k, 0) for b in before) for k in les]
    total = counts[-1] if counts else 0
    bounds = [float(k[len(prefix) + 1 : -2]) for k in les]
    p99 = next((b for b, n in zip(bounds, counts, strict=True) if total and n >= 0.99 * total), float("inf"))
    under_2 = next((n for b, n in zip(bounds, counts, strict=True) if b == 2.0), 0)
    return {"samples": int(total), "p99_bucket_s": p99, "share_under_2s": round(under_2 / total, 5) if total else None}


class Run:
    """One benchmark run: the broker, the fleet servers, the swarm, and what was measured."""

    def __init__(self, work: Path, nodes: int, connect_rate: float) -> None:
        self.work = work
        self.state = json.loads((work / "state.json").read_text())
        self.logins = [Login(*x) for x in json.loads((work / "logins.json").read_text())]
        self.db = self.state["database_url"]
        self.schema = self.state.get("schema", BENCH_SCHEMA)
        self.token = self.state["admin_token"]
        self.broker = Broker(work / "broker")
        self.names = ["a", "b", "c", "d"][:nodes]
        self.servers: dict[str, FleetServer] = {}
        self.connect_rate = connect_rate
        self.swarm: Swarm | None = None
        self.samples: list[dict[str, Any]] = []
        self.run_id = time.strftime("%H%M%S")

    # lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        _sql(self.db, "TRUNCATE telemetry, device_events", self.schema)  # every seq counted below is this run's
        self.broker.start()
        for name, cfg in zip(self.names, _configs(self.work, self.state, self.broker, self.names), strict=True):
            self.servers[name] = FleetServer(cfg).start()
        self.ensure_bundles(self.next_version() + 2)

    def ensure_bundles(self, up_to: int) -> None:
        """Signed bundles 1..``up_to`` in the registry (each rollout of a run needs a version above the last)."""
        from benchmarks.sample_bundle import make_bundle
        from fleet.client import FleetClient
        from manifests import SigningKey

        key = SigningKey.load(self.work / "release-key" / "nanofleet.key")
        srv = next(iter(self.servers.values()))
        with FleetClient(srv.url, self.token) as c:
            have = {m["version"] for m in c.request("GET", "/api/v1/models")}
            for v in range(1, up_to + 1):
                if v not in have:
                    c.upload_bundle(make_bundle(self.work / "bundles" / f"v{v}", key, v))

    def stop(self) -> None:
        if self.swarm is not None:
            self.swarm.stop()
        for s in self.servers.values():
            with contextlib.suppress(Exception):
                s.stop()
        self.broker.stop()

    def api(self) -> httpx.Client:
        srv = next(s for s in self.servers.values() if s.alive())
        return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120)

    def leader(self) -> str | None:
        for name, s in self.servers.items():
            with contextlib.suppress(httpx.HTTPError, OSError):
                if s.alive() and s.healthz()["leader"]:
                    return name
        return None

    def sample(self, phase: str) -> dict[str, Any]:
        assert self.swarm is not None
        x = {
            "phase": phase,
            "t": round(time.time(), 1),
            "load": _load(),
            "rss_mb": {n: round(_rss_mb(s.pid), 1) for n, s in self.servers.items() if s.alive()},
            "broker_rss_mb": round(_rss_mb(self.broker.proc.pid), 1) if self.broker.proc else 0,
            **self.swarm.totals(),
        }
        self.samples.append(x)
        return x

    def cpu(self) -> CpuShare:
        """Start counting where the CPU goes (``.cores()`` at the end of a phase)."""
        return CpuShare(
            {n: s.pid for n, s in self.servers.items() if s.alive()},
            self.broker.proc.pid if self.broker.proc else None,
        )

    def next_version(self) -> int:
        """The first bundle version above every one a device may hold (one per deployment so far)."""
        done = _sql(self.db, "SELECT count(*) FROM deployments WHERE name NOT LIKE 'setup%'", self.schema) or 0
        return int(done) + 1

    def table_size(self) -> dict[str, Any]:
        rows = _sql(self.db, "SELECT count(*) FROM telemetry", self.schema)
        size = _sql(self.db, "SELECT pg_total_relation_size('telemetry')", self.schema)
        return {"rows": rows, "bytes": size, "bytes_per_row": round(size / rows, 1) if rows else None}

    # phases ------------------------------------------------------------------------------------------------
    def connect(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.swarm = Swarm(self.logins, [self.broker.url], connect_rate=self.connect_rate, install_s=0.5).start()
        self.swarm.wait_connected(timeout=max(120.0, 3 * len(self.logins) / self.connect_rate))
        connected_s = time.monotonic() - t0
        with self.api() as api:
            deadline = time.monotonic() + 300
            while (online := api.get("/api/v1/status").json()["online"]) < len(self.logins):
                if time.monotonic() > deadline:
                    break
                time.sleep(1)
        return {
            "devices": len(self.logins),
            "connected_s": round(connected_s, 1),
            "fleet_sees_online": online,
            "online_s": round(time.monotonic() - t0, 1),
            "load": _load(),
        }

    def telemetry(self, rate: float, duration: float) -> dict[str, Any]:
        assert self.swarm is not None
        before = [_metrics(s.url) for s in self.servers.values()]
        start = self.swarm.totals()
        self.swarm.set_rate(rate)
        t0 = time.monotonic()
        time.sleep(min(10.0, duration / 4))  # the CPU shares of the steady state, not of the ramp
        cpu, minute = self.cpu(), self.cpu()
        per_minute: list[dict[str, Any]] = []  # whether the CPU per message drifts over a long run
        next_sample, next_minute = time.monotonic() + 5.0, time.monotonic() + 60.0
        while time.monotonic() - t0 < duration:
            time.sleep(max(0.0, min(1.0, duration - (time.monotonic() - t0))))
            cpu.sample_tasks()  # once a second: what makes up the load
            if time.monotonic() >= next_sample:
                next_sample += 5.0
                x = self.sample("telemetry")
                _say(f"telemetry {x['acked'] - start['acked']} acked, rss {x['rss_mb']}")
            if time.monotonic() >= next_minute:
                next_minute += 60.0
                per_minute.append({"cpu_cores": minute.cores(), "load": _load()})
                _say(f"telemetry, last minute: {per_minute[-1]}")
                minute = self.cpu()
        cpu_cores = cpu.cores()
        self.sample("telemetry")  # at least one, however short the phase
        self.swarm.set_rate(0)
        elapsed = time.monotonic() - t0
        end = self._settle()
        after = [_metrics(s.url) for s in self.servers.values()]
        phase = [x for x in self.samples if x["phase"] == "telemetry"]
        acked = end["acked"] - start["acked"]
        return {
            "target_rate": rate,
            "duration_s": round(elapsed, 1),
            "sent": end["sent"] - start["sent"],
            "acked": acked,
            "acked_per_s": round(acked / elapsed, 1),
            "stored_everything_after_s": end["stored_after_s"],
            "missing_acked": end["missing"],
            "commit_lag": _lag(before, after),
            "rss_max_mb": {n: max(x["rss_mb"].get(n, 0) for x in phase) for n in self.servers},
            "broker_rss_max_mb": max(x["broker_rss_mb"] for x in phase),
            "cpu_cores": cpu_cores,
            "load_threads": cpu.load_shares(),
            "per_minute": per_minute,
            "load_1m_median": _pct([x["load"][0] for x in phase], 0.5),
            "load_1m_max": max(x["load"][0] for x in phase),
        }

    def _settle(self, timeout: float = 300.0) -> dict[str, Any]:
        """Wait for every publish to be acknowledged, then for the database to hold every acknowledged one."""
        assert self.swarm is not None
        t0 = time.monotonic()
        while (t := self.swarm.totals())["acked"] < t["sent"] and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        t1 = time.monotonic()
        while (
            _sql(self.db, "SELECT count(*) FROM telemetry", self.schema) < t["acked"]
            and time.monotonic() - t1 < timeout
        ):
            time.sleep(1)
        stored_after = time.monotonic() - t1
        missing = missing_acked(self.swarm.acked(), stored_seqs(self.db, self.schema, "dev"))
        return {**t, "stored_after_s": round(stored_after, 1), "missing": missing}

    def read_side(self, background_rate: float) -> dict[str, Any]:
        """Latencies measured by a child process (this one runs the swarm and would hold the GIL)."""
        assert self.swarm is not None
        self.swarm.set_rate(background_rate)
        time.sleep(5)
        srv = next(s for s in self.servers.values() if s.alive())
        cpu = self.cpu()
        out = subprocess.run(
            [sys.executable, __file__, "probe", "--url", srv.url, "--token", self.token],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        cores = cpu.cores()
        self.swarm.set_rate(0)
        return {**json.loads(out.stdout), "background_rate": background_rate, "load": _load(), "cpu_cores": cores}

    def rollout(
        self, name: str, version: int, strategy: dict[str, Any], *, kill_at: float | None = None, rate: float = 0.0
    ) -> dict[str, Any]:
        """Apply a deployment to every device and follow it to completion (``kill_at``: SIGKILL the lease
        holder once that share of the devices has succeeded)."""
        assert self.swarm is not None
        name = f"{name}-{self.run_id}"
        body = {
            "apiVersion": "nanofleet/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"bundle": {"name": "tiny-model", "version": version}, "strategy": strategy},
        }
        self.swarm.set_rate(rate)
        result: dict[str, Any] = {"name": name, "strategy": strategy, "telemetry_rate": rate}
        cpu = self.cpu()
        with self.api() as api:
            result["load_at_apply"] = _load()
            t0 = time.monotonic()
            r = api.post("/api/v1/deployments", json=body)
            result["apply_s"] = round(time.monotonic() - t0, 3)
            r.raise_for_status()
            applied = r.json()["deployment"]
            dep_id = result["id"] = applied["id"]
            result["apply_answer"] = {"status": applied["status"], "counts": applied["counts"]}
        applied_at = time.time()
        result.update(self._follow(name, kill_at))
        result["load_after"] = _load()
        result["cpu_cores"] = cpu.cores()
        result.update(self._converged(dep_id, applied_at, result.get("finished_at"), "apply"))
        self.swarm.set_rate(0)
        return result

    def _converged(self, command_id: str, sent_at: float, finished_at: float | None, what: str) -> dict[str, Any]:
        """How many devices committed ``command_id``, when the last did (after ``what``), and how long after
        it the fleet counted the deployment finished."""
        assert self.swarm is not None
        done = self.swarm.committed(command_id)
        out: dict[str, Any] = {"devices_committed": len(done)}
        if done and finished_at:
            last = max(done.values())
            out[f"last_device_commit_after_{what}_s"] = round(last - sent_at, 2)
            out["fleet_done_after_last_commit_s"] = round(finished_at - last, 2)
        return out

    def rollback(self, name: str, dep_id: str) -> dict[str, Any]:
        """Roll a finished rollout back (a signed rollback to every device's previous model) and follow it
        until the fleet counts it rolled back."""
        assert self.swarm is not None
        result: dict[str, Any] = {"name": name}
        cpu = self.cpu()
        with self.api() as api:
            result["load_at_control"] = _load()
            t0 = time.monotonic()
            r = api.post(f"/api/v1/deployments/{name}/rollback")
            result["control_s"] = round(time.monotonic() - t0, 3)
            r.raise_for_status()
            result["control_answer"] = {"status": r.json()["status"], "counts": r.json()["counts"]}
        sent_at = time.time()
        result.update(self._follow(name, None))
        result["load_after"] = _load()
        result["cpu_cores"] = cpu.cores()
        result.update(self._converged(f"{dep_id}.rollback", sent_at, result.get("finished_at"), "control"))
        return result

    def _follow(self, name: str, kill_at: float | None) -> dict[str, Any]:
        import datetime as dt

        n, out = len(self.logins), {}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                with self.api() as api:
                    dep = next(d for d in api.get("/api/v1/deployments").json() if d["name"] == name)
            except (httpx.HTTPError, StopIteration):
                time.sleep(0.5)
                continue
            if kill_at is not None and "killed" not in out and dep["counts"].get("succeeded", 0) >= kill_at * n:
                out.update(self._kill_leader())
            if dep["status"] in ("completed", "aborted", "paused", "failed", "rolled_back"):
                out["status"], out["counts"] = dep["status"], dep["counts"]
                if dep.get("finished_at"):
                    out["finished_at"] = dt.datetime.fromisoformat(dep["finished_at"]).timestamp()
                return out
            time.sleep(0.25)
        out["status"] = "timed out"
        return out

    def _kill_leader(self) -> dict[str, Any]:
        victim = self.leader()
        if victim is None:
            return {"killed": None}
        self.servers[victim].signal(signal.SIGKILL)
        t0 = time.monotonic()
        while (now_leader := self.leader()) is None and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        _say(f"killed {victim}; {now_leader} took the lease")
        return {
            "killed": victim,
            "new_leader": now_leader,
            "takeover_s": round(time.monotonic() - t0, 2),
            "load_at_kill": _load(),
        }


def probe(url: str, token: str, page: int, rounds: int) -> dict[str, Any]:
    """Read-side latencies: every page of the devices list (keyset cursor), the unpaginated list once, and
    the dashboard overview (signed in as the form does it)."""
    import re

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=120) as http:
        pages: list[float] = []
        for _ in range(rounds):
            nxt: str | None = f"/api/v1/devices?limit={page}"
            while nxt:
                t0 = time.perf_counter()
                r = http.get(nxt, headers=headers).raise_for_status()
                pages.append(time.perf_counter() - t0)
                nxt = r.links.get("next", {}).get("url")
        t0 = time.perf_counter()
        whole = http.get("/api/v1/devices", headers=headers).raise_for_status()
        whole_s = time.perf_counter() - t0
        login = http.get("/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login)
        assert csrf, "no login form"
        http.post("/login", data={"token": token, "csrf_token": csrf.group(1), "next": "/"})
        overview: list[float] = []
        for _ in range(20):
            t0 = time.perf_counter()
            http.get("/").raise_for_status()
            overview.append(time.perf_counter() - t0)
    ms = lambda s: round(s * 1000, 1)  # noqa: E731
    return {
        "devices_page_size": page,
        "devices_pages": len(pages),
        "devices_page_p50_ms": ms(_pct(pages, 0.5)),
        "devices_page_p95_ms": ms(_pct(pages, 0.95)),
        "devices_unpaginated_ms": ms(whole_s),
        "devices_unpaginated_mb": round(len(whole.content) / 2**20, 1),
        "overview_p50_ms": ms(_pct(overview, 0.5)),
        "overview_p95_ms": ms(_pct(overview, 0.95)),
    }


PHASES = ("telemetry", "read", "all", "waves", "kill", "rollback")


def _phases(spec: str) -> set[str]:
    """The phases asked for, refused before anything starts when one is unknown or cannot run."""
    phases = set(spec.split(","))
    if unknown := phases - set(PHASES):
        raise ValueError(f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    if "rollback" in phases and not phases & {"all", "waves", "kill"}:
        raise ValueError("the rollback phase rolls back this run's last rollout: add all, waves or kill")
    return phases


def bench_run(work: Path, args: Any) -> dict[str, Any]:
    phases = _phases(args.phases)
    run = Run(work, args.servers, args.connect_rate)
    res: dict[str, Any] = {"devices": len(run.logins), "servers": args.servers, "load_at_start": _load()}
    run.start()
    try:
        res["leader"] = run.leader()
        _say("connecting the swarm")
        res["connect"] = run.connect()
        _say(f"connected: {res['connect']}")
        if "telemetry" in phases:
            res["telemetry"] = run.telemetry(args.rate, args.duration)
            _say(f"telemetry: {res['telemetry']}")
        if "read" in phases:
            res["read_side"] = run.read_side(args.background_rate)
            _say(f"read side: {res['read_side']}")
        # Versions go up run after run (a board never goes back without a signed rollback).
        version = run.next_version()
        if "all" in phases:
            res["rollout_all"] = run.rollout("all", version, {"type": "all-at-once"})
            _say(f"all at once: {res['rollout_all']}")
            version += 1
        waves = {"type": "waves", "waves": {"percent_steps": [10, 50, 100]}}
        if "waves" in phases:
            res["rollout_waves"] = run.rollout("waves", version, waves)
            _say(f"waves: {res['rollout_waves']}")
            version += 1
        if "kill" in phases:
            res["rollout_kill"] = run.rollout("kill", version, waves, kill_at=0.2, rate=args.kill_rate)
            _say(f"kill: {res['rollout_kill']}")
        if "rollback" in phases:
            last = next((res[k] for k in ("rollout_kill", "rollout_waves", "rollout_all") if k in res), None)
            if last is None or last.get("status") != "completed":
                raise SystemExit(f"error: nothing to roll back: the last rollout ended {last and last.get('status')}")
            res["rollback"] = run.rollback(last["name"], last["id"])
            _say(f"rollback: {res['rollback']}")
        settled = run._settle()
        res["acked_whole_run"], res["missing_acked_whole_run"] = settled["acked"], settled["missing"]
        res["telemetry_table"] = run.table_size()
    finally:
        res["samples"] = run.samples
        run.stop()
    return res


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="enrol the devices and upload three bundles into a work directory")
    r = sub.add_parser("run", help="connect every device and measure (after setup)")
    for x in (s, r):
        x.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"work directory (default {DEFAULT_WORK})")
        x.add_argument("--json", action="store_true", help="print the whole result (the samples taken included)")
        x.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    s.add_argument("--devices", type=int, default=10_000, help="devices to enrol (default 10000)")
    s.add_argument(
        "--database-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="PostgreSQL (the schema is dropped and created)",
    )
    s.add_argument("--schema", default=BENCH_SCHEMA, help=f"schema for the fleet's tables (default {BENCH_SCHEMA})")
    s.add_argument("--workers", type=int, default=8, help="enrolments in flight (default 8)")
    r.add_argument("--servers", type=int, default=2, choices=(1, 2, 3, 4), help="fleet servers (default 2)")
    r.add_argument("--rate", type=float, default=2000, help="telemetry messages/s in the ingest phase (default 2000)")
    r.add_argument("--duration", type=float, default=300, help="seconds of the ingest phase (default 300)")
    r.add_argument(
        "--background-rate",
        type=float,
        default=333,
        help="telemetry messages/s while the read side is measured (default 333: 10,000 boards every 30 s)",
    )
    r.add_argument(
        "--kill-rate", type=float, default=333, help="telemetry messages/s during the SIGKILL rollout (default 333)"
    )
    r.add_argument(
        "--connect-rate", type=float, default=400, help="device connections started per second (default 400)"
    )
    r.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"what to measure, comma-separated (default: {','.join(PHASES)}; rollback rolls back the last "
        "rollout of the run)",
    )
    q = sub.add_parser("probe", help="(internal) read-side latencies against one server")
    q.add_argument("--url", required=True, help="a fleet server's URL")
    q.add_argument("--token", required=True, help="the admin token")
    q.add_argument("--page", type=int, default=100, help="devices per page (default 100)")
    q.add_argument("--rounds", type=int, default=1, help="walks over every page (default 1)")
    args = p.parse_args(argv)
    if args.cmd == "probe":
        print(json.dumps(probe(args.url, args.token, args.page, args.rounds)))
        return 0
    if args.cmd == "run":
        try:
            _phases(args.phases)
        except ValueError as exc:
            print(f"error: --phases: {exc}", file=sys.stderr)
            return 2
    if args.cmd == "run" and not (args.work / "state.json").is_file():
        print(f"error: no setup in {args.work}: run `fleet_scale.py setup --work {args.work}` first", file=sys.stderr)
        return 2
    res = (
        bench_setup(args.work, args.devices, args.database_url, args.workers, args.schema)
        if args.cmd == "setup"
        else bench_run(args.work, args)
    )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res if args.json else {k: v for k, v in res.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
