"""`nanofleet demo`: the main job, end to end on one machine.

1. export the default model (SmolLM2-135M-Instruct) to a signed INT8 bundle, unless cached;
2. start the fleet (SQLite + embedded MQTT broker) and N device agents, each its own process and data dir;
3. enrol the agents and roll v1 out with a canary;
4. ask every device a question through its OpenAI-compatible API, show answers and telemetry;
5. roll v2 out in waves;
6. roll out a deliberately broken v3 (its golden check cannot pass): the canary fails, the fleet
   aborts and sends a signed rollback;
7. stop everything it started and exit 0; with ``--keep``, leave the fleet and the agents running and say
   how to open the dashboard, enrol one more board and stop it all (``nanofleet demo --stop``).

The fleet runs as its own `nanofleet fleet serve` process (so it can outlive the demo), each agent as a
`nanofleet device run` process; ``run/demo.json`` records them for ``--stop``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import typer

QUESTION = "What is the capital of France? Answer in one short sentence."
REPO = Path(__file__).resolve().parents[1]
STATE_FILE = "demo.json"
# The tag the printed enrolment token gives one more board: manifests/examples/deployment-canary.yaml
# selects it, so the README's next steps roll a model out to that board alone.
EXTRA_BOARD_TAGS = {"site": "lab"}


class DemoError(Exception):
    pass


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    devices: int = typer.Option(3, "--devices", "-n", min=1, max=16, help="How many local device agents."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout (progress on stderr)."),
    work_dir: Path = typer.Option(
        Path(".cache/demo"), "--work-dir", help="Cache (keys, exported bundle) and this run's files."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="Inference threads per agent."),
    keep: bool = typer.Option(
        False,
        "--keep",
        help="Leave the fleet and its agents running at the end (dashboard, one more board); "
        "stop them with `nanofleet demo --stop`.",
    ),
    stop: bool = typer.Option(
        False, "--stop", help="Stop a demo left running by --keep (fleet, agents, boards enrolled into it)."
    ),
) -> None:
    """Export the default model, start a fleet and N agents, roll out v1 (canary) and v2 (waves), ask
    every device a question, then show a broken v3 being aborted and rolled back automatically."""
    import logging

    from manifests.cli_output import console, emit_json, fail

    # amqtt logs every dropped client at WARNING; the demo reports what matters itself.
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    if stop:
        try:
            stopped = stop_kept(work_dir.resolve(), console)
        except DemoError as exc:
            fail(str(exc), as_json=as_json, reason="demo")
        if as_json:
            emit_json({"ok": True, "stopped": stopped})
        return
    t0 = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so every process this demo started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        summary = Demo(devices, work_dir.resolve(), threads, keep, console).run()
    except DemoError as exc:
        fail(str(exc), as_json=as_json, reason="demo")
    summary["seconds"] = round(time.monotonic() - t0, 1)
    if as_json:
        emit_json(summary)
    else:
        console.print(f"[bold green]demo finished in {summary['seconds']:.0f}s[/]")
        if keep:
            print_kept(summary["kept"], console)


class Demo:
    def __init__(self, n: int, work: Path, threads: int, keep: bool, console: Any) -> None:
        self.n, self.work, self.threads, self.keep, self.console = n, work, threads, keep, console
        self.run_dir = work / "run"
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    # ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if live := _live_processes(self.run_dir):
            raise DemoError(
                f"a demo kept with --keep is still running ({len(live)} processes in {self.run_dir}): "
                "stop it first with `nanofleet demo --stop`"
            )
        bundles = self.bundles()
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        with ExitStack() as stack:
            stack.callback(self.stop_all)
            server = self.start_fleet()
            from fleet.client import FleetClient

            admin = stack.enter_context(FleetClient(server.url, server.admin_token))
            agents = self.start_agents(server, admin)
            self.write_state(server, agents)
            self.step("uploading the bundles to the fleet registry")
            for v in (1, 2, 3):
                m = admin.upload_bundle(bundles[v])
                self.say(f"  {m['name']}@{m['version']}: {m['total_size'] / 2**20:.1f} MiB, signed by {m['key_id']}")
            name = bundles["name"]

            self.step(f"v1 to {self.n} devices: canary first, then the rest")
            self.rollout(
                admin,
                self.deployment("demo-v1", name, 1, {"type": "canary", "canary": {"devices": 1}, "wait_seconds": 2}),
                "completed",
                420,
            )
            answers = self.ask_all(agents)
            self.show(admin, answers)

            self.step("v2 in waves")
            waves = [1, self.n - 1] if self.n > 1 else [1]
            self.rollout(
                admin,
                self.deployment(
                    "demo-v2",
                    name,
                    2,
                    {"type": "waves", "waves": {"sizes": waves}, "wait_seconds": 2, "max_in_flight": 2},
                ),
                "completed",
                420,
            )

            self.step("a broken v3 (its golden check cannot pass): expect an automatic abort and rollback")
            dep = self.rollout(
                admin,
                self.deployment(
                    "demo-v3-broken",
                    name,
                    3,
                    {"type": "canary", "canary": {"devices": 1}, "wait_seconds": 5},
                    abort={
                        "failure_rate_pct": 1,
                        "min_devices": 1,
                        "convergence_timeout_s": 240,
                        "on_abort": "rollback",
                    },
                ),
                "rolled_back",
                420,
            )
            self.say(f"  aborted: {dep['abort_reason']}")
            self.wait(
                lambda: all(d.get("model") == f"{name}@2" for d in admin.devices()),
                120,
                "every device back on v2",
            )
            answers = self.ask_all(agents)
            self.show(admin, answers)
            devs = {d["id"]: d for d in admin.devices()}
            kept = self.keep_running(server, admin) if self.keep else None
            return {
                "ok": True,
                "kept": kept,
                "bundle": name,
                "fleet_url": server.url,
                "deployments": {
                    d["name"]: {"status": d["status"], "abort_reason": d["abort_reason"]} for d in admin.deployments()
                },
                "devices": [
                    {
                        "id": a["id"],
                        "model_version": _version(devs[a["id"]].get("model")),
                        "answer": answers.get(a["id"]),
                        "telemetry": devs[a["id"]].get("telemetry"),
                    }
                    for a in agents
                ],
            }

    # ---------------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        self.console.print(msg)

    def step(self, msg: str) -> None:
        self.console.rule(f"[bold]{msg}")

    def wait(self, pred: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self.console.status(f"waiting: {what}"):
            while time.monotonic() < deadline:
                self.check_procs()
                got = pred()
                if got:
                    return got
                time.sleep(0.5)
        raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")

    def check_procs(self) -> None:
        for name, p in self.procs:
            if p.poll() is not None:
                log = self.run_dir / f"{name}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise DemoError(f"{name} exited with {p.returncode}:\n{tail}")

    # 1. bundles ----------------------------------------------------------------------------------
    def bundles(self) -> dict[Any, Any]:
        from manifests import (
            GoldenCheck,
            SigningKey,
            TrustStore,
            VerificationError,
            verify_bundle,
            write_keypair,
        )

        from .resign import resign_bundle

        keys = self.work / "keys"
        if not (keys / "nanofleet.key").exists():
            write_keypair(keys)
        key = SigningKey.load(keys / "nanofleet.key")
        trust = TrustStore.from_paths([keys / "nanofleet.pub"])
        v1 = self.work / "bundles" / "v1"
        try:
            m1 = verify_bundle(v1, trust)
            self.say(f"[green]cached[/] {m1.ref} in {v1}")
        except (VerificationError, OSError):
            self.step("exporting the default model (SmolLM2-135M-Instruct -> signed INT8 bundle)")
            cmd = [
                sys.executable,
                "-m",
                "nanofleet.cli",
                "export",
                "--key",
                str(keys / "nanofleet.key"),
                "--out",
                str(v1),
                "--version",
                "1",
                "--force",
            ]
            self.say("  $ nanofleet export " + " ".join(cmd[4:]))
            # Its output goes to stderr: stdout stays clean for --json.
            proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO, stdout=sys.stderr)
            if proc.returncode != 0:
                raise DemoError(f"nanofleet export failed with exit code {proc.returncode}") from None
            m1 = verify_bundle(v1, trust)

        def derive(version: int, golden: GoldenCheck | None) -> Path:
            """v2 and v3 reuse v1's files (the fleet stores them once): `nanofleet bundle resign`."""
            out = self.work / "bundles" / f"v{version}"
            if out.exists():
                shutil.rmtree(out)
            resign_bundle(v1, out, key, version=version, update={"golden": golden} if golden else None)
            return out

        broken = None
        if m1.golden is not None:
            # Expect different tokens than the model produces: the agent's activation check must fail.
            g = m1.golden
            wrong = [(t + 1) % m1.arch.vocab_size for t in g.expected_token_ids]
            broken = GoldenCheck(
                prompt_token_ids=g.prompt_token_ids,
                expected_token_ids=wrong,
                latency_budget_ms=g.latency_budget_ms,
            )
        else:
            raise DemoError("the exported bundle has no golden check; cannot build the broken v3")
        return {
            "name": m1.name,
            1: v1,
            2: derive(2, None),
            3: derive(3, broken),
            "pub": keys / "nanofleet.pub",
        }

    # 2. fleet and agents ---------------------------------------------------------------------------
    def start_fleet(self) -> FleetProcess:
        """`nanofleet fleet serve` as its own process (it may outlive the demo: --keep)."""
        import yaml

        self.step("starting the fleet (SQLite, embedded MQTT broker)")
        config = self.run_dir / "fleet.yaml"
        doc = {
            "data_dir": "fleet",
            "host": "127.0.0.1",
            "port": 0,
            "trusted_keys": [str(self.work / "keys" / "nanofleet.pub")],
            "tick_s": 0.25,
            "broker": {"keepalive_s": 10},
        }
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        proc = self.spawn("fleet", ["fleet", "serve", "--config", str(config)])
        info_file = self.run_dir / "fleet" / "service.json"

        def started() -> dict[str, Any] | None:
            try:
                info = json.loads(info_file.read_text())
            except (OSError, ValueError):
                return None
            return info if info.get("pid") == proc.pid else None

        info = self.wait(started, 120, "the fleet service")
        token_file = self.run_dir / "fleet" / "admin.token"
        server = FleetProcess(
            url=info["url"],
            mqtt_url=info["mqtt_url"],
            admin_token_file=token_file,
            admin_token=token_file.read_text().strip(),
            config=config,
            pid=proc.pid,
        )
        self.say(f"  fleet {server.url}  MQTT {server.mqtt_url}  admin token in {token_file}")
        return server

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "nanofleet.cli", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            # Its own session: a terminal's hang-up after the demo (with --keep) does not reach it.
            start_new_session=True,
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def write_state(self, server: FleetProcess, agents: list[dict[str, Any]]) -> None:
        """run/demo.json: what this run started, for `demo --stop` (also after a crash of the demo)."""
        from manifests import atomic_write_text

        doc = {
            "fleet": {
                "url": server.url,
                "mqtt_url": server.mqtt_url,
                "admin_token_file": str(server.admin_token_file),
                "config": str(server.config),
            },
            "pids": [p.pid for _, p in self.procs],
            "agents": agents,
        }
        atomic_write_text(self.run_dir / STATE_FILE, json.dumps(doc, indent=2))

    def keep_running(self, server: FleetProcess, admin: Any) -> dict[str, Any]:
        """--keep: leave everything up, and make the one-time token for one more board."""
        from fleet.server import free_port

        token = admin.enrollment_token(uses=1, ttl_s=7 * 86400, tags=EXTRA_BOARD_TAGS, groups=["lab"])
        board = self.run_dir / "boards" / "board-1"
        self.procs = []  # nothing to stop on the way out
        return {
            "fleet_url": server.url,
            "dashboard_url": server.url + "/",
            "admin_token_file": str(server.admin_token_file),
            "fleet_config": str(server.config),
            "enroll_command": (
                f"nanofleet device enroll --fleet {server.url} --token {token['token']} "
                f"--data-dir {_rel(board)} --api-port {free_port('127.0.0.1')}"
            ),
            "run_command": f"nanofleet device run --config {_rel(board / 'agent.yaml')}",
            "apply_command": (
                f"nanofleet fleet apply manifests/examples/deployment-canary.yaml --config {_rel(server.config)}"
                " --watch"
            ),
            "stop_command": "nanofleet demo --stop"
            + ("" if self.work == DEFAULT_WORK.resolve() else f" --work-dir {_rel(self.work)}"),
        }

    def start_agents(self, server: FleetProcess, admin: Any) -> list[dict[str, Any]]:
        """Each agent joins the way a board does (`nanofleet device enroll`), then runs as its own process."""
        from device.agent.enroll import EnrollError, EnrollRequest, enroll
        from fleet.server import free_port

        self.step(f"enrolling and starting {self.n} device agents")
        token = admin.enrollment_token(uses=self.n, tags={"site": "demo"}, groups=["demo"])["token"]
        agents = []
        for i in range(self.n):
            dev_id = f"demo-{i}"
            root = self.run_dir / dev_id
            port = free_port("127.0.0.1")
            req = EnrollRequest(
                fleet_url=server.url,
                token=token,
                data_dir=root / "data",
                config_dir=root,
                device_id=dev_id,
                hardware_class="x86-demo",
                api_port=port,
                # Short intervals: the demo's rollouts and telemetry show within seconds.
                settings={
                    "mqtt.keepalive_s": 10,
                    "mqtt.reconnect_max_s": 2,
                    "telemetry.interval_s": 2,
                    "limits.threads": self.threads,
                },
            )
            try:
                enrolled = enroll(req)
            except EnrollError as exc:
                raise DemoError(f"enrolling {dev_id}: {exc.message}") from None
            api_token = (root / "api.token").read_text().strip()
            proc = self.spawn(dev_id, ["device", "run", "--config", str(enrolled.config)])
            agents.append(
                {"id": dev_id, "api": f"http://127.0.0.1:{port}", "token": api_token, "config": str(enrolled.config)}
            )
            self.say(f"  {dev_id}: pid {proc.pid}, API :{port}, data {root / 'data'}")
        self.wait(lambda: sum(d["online"] for d in admin.devices()) == self.n, 120, "every agent online")
        return agents

    def stop_all(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if not self.keep and self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self.keep and self.procs:  # --keep, but the story failed: nothing is left half-running
            (self.run_dir / STATE_FILE).unlink(missing_ok=True)

    # 3. rollouts -----------------------------------------------------------------------------------
    @staticmethod
    def deployment(
        name: str, bundle: str, version: int, strategy: dict[str, Any], abort: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            "apiVersion": "nanofleet/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "bundle": {"name": bundle, "version": version},
                "selector": {"tags": {"site": "demo"}},
                "strategy": strategy,
                "abort": abort
                or {
                    "failure_rate_pct": 50,
                    "min_devices": 1,
                    "convergence_timeout_s": 300,
                    "on_abort": "rollback",
                },
            },
        }

    def rollout(self, admin: Any, doc: dict[str, Any], expect: str, timeout: float) -> dict[str, Any]:
        from fleet.cli import deployment_detail

        res = admin.apply(doc)
        name = doc["metadata"]["name"]
        self.say(f"  applied {name}: {res['result']}, waves {res['deployment']['waves']}")
        last = ""
        deadline = time.monotonic() + timeout
        dep = res["deployment"]
        while time.monotonic() < deadline:
            self.check_procs()
            dep = admin.deployment(name)
            line = f"  {dep['status']}: wave {min(dep['wave'] + 1, dep['waves'])}/{dep['waves']} " + ", ".join(
                f"{k}={v}" for k, v in sorted(dep["counts"].items()) if k != "total"
            )
            if line != last:
                self.say(line)
                last = line
            if dep["status"] == expect:
                break
            if dep["status"] in ("completed", "aborted", "rolled_back", "paused") and dep["status"] != expect:
                self.console.print(deployment_detail(dep))
                raise DemoError(f"deployment {name} ended {dep['status']} (expected {expect}): {dep['abort_reason']}")
            time.sleep(0.5)
        else:
            raise DemoError(f"deployment {name} did not reach {expect} within {timeout:.0f}s")
        self.console.print(deployment_detail(dep))
        return dep

    # 4. ask and show -------------------------------------------------------------------------------
    def ask_all(self, agents: list[dict[str, Any]]) -> dict[str, str]:
        import httpx

        self.step(f"asking every device: {QUESTION!r}")
        answers = {}
        for a in agents:
            headers = {"Authorization": f"Bearer {a['token']}"}
            self.wait(lambda a=a, h=headers: _ready(httpx, a["api"], h), 120, f"{a['id']} serving")
            # The agent serves its committed bundle under the bundle's name.
            model = httpx.get(f"{a['api']}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
            r = httpx.post(
                f"{a['api']}/v1/chat/completions",
                headers=headers,
                timeout=120,
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 32,
                    "temperature": 0,
                },
            )
            if r.status_code != 200:
                raise DemoError(f"{a['id']} answered HTTP {r.status_code}: {r.text[:300]}")
            answers[a["id"]] = r.json()["choices"][0]["message"]["content"].strip()
        return answers

    def show(self, admin: Any, answers: dict[str, str]) -> None:
        from rich.table import Table

        time.sleep(2.5)  # one telemetry interval, so the table shows the requests just made
        t = Table(title=f"devices ({admin.devices()[0].get('model', '?').rsplit('@', 1)[0]})")
        for col in ("device", "ver", "answer", "tok/s", "TTFT p95", "req", "RSS"):
            t.add_column(col, min_width=30 if col == "answer" else None)
        for d in admin.devices():
            tel = d.get("telemetry") or {}
            t.add_row(
                d["id"],
                f"v{_version(d.get('model'))}",
                answers.get(d["id"], "-"),
                f"{tel['decode_tok_s']:.1f}" if tel.get("decode_tok_s") else "-",
                f"{tel['ttft_p95_ms']:.0f} ms" if tel.get("ttft_p95_ms") else "-",
                str(tel.get("requests", "-")),
                f"{tel['rss_bytes'] / 2**20:.0f} MiB" if tel.get("rss_bytes") else "-",
            )
        self.console.print(t)


def _version(model: str | None) -> int | None:
    return int(model.rsplit("@", 1)[1]) if model and "@" in model else None


def _ready(httpx: Any, api: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(f"{api}/readyz", headers=headers, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


DEFAULT_WORK = Path(".cache/demo")


class FleetProcess:
    """The demo's `fleet serve` process, as the demo talks to it."""

    def __init__(
        self, *, url: str, mqtt_url: str, admin_token_file: Path, admin_token: str, config: Path, pid: int
    ) -> None:
        self.url, self.mqtt_url, self.pid = url, mqtt_url, pid
        self.admin_token_file, self.admin_token, self.config = admin_token_file, admin_token, config


def _rel(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_kept(kept: dict[str, Any], console: Any) -> None:
    console.rule("[bold]the fleet is still running (--keep)")
    console.print(
        f"dashboard     {kept['dashboard_url']}  (sign in with the admin token)\n"
        f"admin token   {kept['admin_token_file']}\n"
        f"enrol one more board on this machine (the command holds its one-time token; the demo's fleet "
        f"listens on 127.0.0.1 only):\n  {kept['enroll_command']}\n"
        f"start it      {kept['run_command']}\n"
        f"roll out      {kept['apply_command']}\n"
        f"stop it all   {kept['stop_command']}",
        soft_wrap=True,
    )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _live_processes(run_dir: Path) -> list[int]:
    """Processes of a kept demo: the ones it recorded, and any `nanofleet` started with a --config inside
    its run folder (a board enrolled into it by hand, however its path was typed). By pid."""
    pids: set[int] = set()
    try:
        pids.update(json.loads((run_dir / STATE_FILE).read_text()).get("pids", []))
    except (OSError, ValueError):
        pass
    proc_root = Path("/proc")
    if proc_root.is_dir():
        for entry in proc_root.iterdir():
            if entry.name.isdigit() and _config_under(int(entry.name), run_dir):
                pids.add(int(entry.name))
    return sorted(p for p in pids if p != os.getpid() and "nanofleet" in _cmdline(p))


def _config_under(pid: int, run_dir: Path) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    for flag, value in zip(args, args[1:], strict=False):
        if flag in (b"--config", b"-c"):
            path = Path(os.fsdecode(value))
            resolved = (path if path.is_absolute() else cwd / path).resolve()
            if resolved.is_relative_to(run_dir.resolve()):
                return True
    return False


def stop_kept(work: Path, console: Any) -> int:
    """`demo --stop`: SIGTERM the kept demo's processes, SIGKILL what is left after 20 s, remove run/."""
    run_dir = work / "run"
    pids = _live_processes(run_dir)
    if not pids and not (run_dir / STATE_FILE).exists():
        console.print(f"no demo kept running in {run_dir}")
        return 0
    for pid in pids:
        with _suppress_gone():
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_cmdline(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _cmdline(pid):
            with _suppress_gone():
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(run_dir, ignore_errors=True)
    console.print(f"stopped {len(pids)} processes of the kept demo and removed {run_dir}")
    return len(pids)


def _suppress_gone() -> Any:
    from contextlib import suppress

    return suppress(ProcessLookupError, PermissionError)
