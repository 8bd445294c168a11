"""One board partitioned from the broker while the rest of the fleet keeps going.

A real fleet service (in a thread, as tests/fleet run it) over a real Mosquitto, three real agent
processes (fake model runtime), bundles served by the fleet over HTTP. One agent reaches the broker
through a TCP proxy that can blackhole: it keeps its sockets open and silently drops every byte both ways,
as a dead link does (no RST, no FIN), so only MQTT keepalives can tell. While it is cut off, a rollout
to all three completes for the two others, the cut-off board keeps serving its model and queues its
telemetry; when the link heals it reconnects, takes the retained desired state, installs, reports, its
queued telemetry arrives, and the rollout completes.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from device.agent.fetch import HttpFetcher
from device.agent.updater import Updater
from fleet.client import FleetClient
from fleet.config import FleetConfig
from fleet.server import ServerThread
from manifests import SigningKey, TrustStore

from ..conftest import Mosquitto, free_port
from .fake_runtime import FakeRuntime
from .helpers import make_bundle
from .procs import AgentProcess, wait_for, write_config

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


class BlackholeProxy:
    """TCP proxy 127.0.0.1:port -> target. ``partition()``: every byte both ways is read and dropped, new
    connections are accepted and get nothing; ``heal()``: the dead connections are closed (their TCP
    state is gone, as after a real outage) and new ones are forwarded again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.cut.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def partition(self) -> None:
        self.cut.set()

    def heal(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self.heal()


@pytest.fixture
def proxy(mosquitto: Mosquitto) -> Iterator[BlackholeProxy]:
    p = BlackholeProxy(mosquitto.port)
    yield p
    p.close()


def wait(pred: Any, timeout: float, what: str) -> Any:
    return wait_for(pred, timeout, what)


def test_one_board_partitioned_while_the_fleet_rolls_out(
    tmp_path: Path, mosquitto: Mosquitto, proxy: BlackholeProxy
) -> None:
    key = SigningKey.generate()
    pub = tmp_path / "release.pub"
    pub.write_bytes(key.public_pem())
    bundles = {v: make_bundle(tmp_path / "bundles" / f"tiny-{v}", key, version=v) for v in (1, 2)}
    cfg = FleetConfig(data_dir=tmp_path / "fleet", port=free_port(), trusted_keys=[pub], tick_s=0.2)
    cfg.broker.embedded, cfg.broker.url = False, mosquitto.url
    fleet = ServerThread(cfg).start()
    agents: dict[str, AgentProcess] = {}
    try:
        admin = FleetClient(fleet.url, fleet.svc.admin_token)
        for b in bundles.values():
            admin.upload_bundle(b)
        names = ["part-a", "part-b", "part-p"]  # part-p is the one behind the proxy
        token = admin.enrollment_token(uses=len(names))["token"]
        template = tmp_path / "template"
        Updater(
            data_dir=template,
            device_id="template",
            trust=TrustStore([key.public_key]),
            fetcher=HttpFetcher(),
            runtime=FakeRuntime(),
            artifacts_base_url="http://unused.invalid/",
        ).bootstrap(bundles[1])
        with FleetClient(fleet.url) as anon:
            for name in names:
                creds = anon.enroll(token, device_id=name, hardware_class="sim")
                root = tmp_path / name
                root.mkdir()
                shutil.copytree(template, root / "data")
                config = root / "agent.yaml"
                port = write_config(
                    config,
                    device_id=name,
                    broker_url=proxy.url if name == "part-p" else mosquitto.url,
                    artifacts_url=fleet.url + "/",
                    pub_key=pub,
                    data_dir=root / "data",
                    interval_s=0.5,
                )
                doc = yaml.safe_load(config.read_text())  # the board logs in with what enrolment gave it
                doc["mqtt"].update(username=creds["mqtt"]["username"], password=creds["mqtt"]["password"])
                config.write_text(yaml.safe_dump(doc))
                agents[name] = AgentProcess(config, port, root / "data", root / "agent.log").start()
        for a in agents.values():
            wait(lambda a=a: (s := a.serving()) and s["version"] == 1, 30, "v1 to serve")

        def device(name: str) -> dict[str, Any]:
            return admin.device(name)

        wait(lambda: all(device(n)["online"] and device(n)["model"] == "tiny@1" for n in names), 30, "3 online on v1")
        part = agents["part-p"]

        # ---- the link to part-p dies (no FIN, no RST): only keepalives notice --------------------------
        proxy.partition()
        cut_at = dt.datetime.now(dt.timezone.utc)
        wait(lambda: not device("part-p")["online"], 40, "the broker's last will: part-p offline")
        wait(lambda: not _status(part)["broker_connected"], 40, "part-p to notice the dead link")

        admin.apply(
            {
                "apiVersion": "nanofleet/v1",
                "kind": "Deployment",
                "metadata": {"name": "v2-all"},
                "spec": {
                    "bundle": {"name": "tiny", "version": 2},
                    "selector": {"device_ids": names},
                    "strategy": {"type": "all-at-once"},
                },
            }
        )

        def targets() -> dict[str, str]:
            return {t["device_id"]: t["state"] for t in admin.deployment("v2-all")["targets"]}

        wait(
            lambda: targets()["part-a"] == "succeeded" and targets()["part-b"] == "succeeded",
            60,
            "the rollout to go through on the connected boards",
        )
        for name in ("part-a", "part-b"):
            assert agents[name].serving()["version"] == 2
        dep = admin.deployment("v2-all")
        assert dep["status"] == "in_progress" and targets()["part-p"] in ("pending", "in_flight"), dep
        # the cut-off board serves its committed model all along and keeps its telemetry on disk
        assert part.serving()["version"] == 1 and part.state()["state"] == "committed"
        wait(lambda: _status(part)["outbox_pending"] >= 5, 30, "telemetry queued on part-p")
        assert not device("part-p")["online"]

        # ---- the link heals --------------------------------------------------------------------------
        healed_at = dt.datetime.now(dt.timezone.utc)
        proxy.heal()
        wait(lambda: (s := part.serving()) and s["version"] == 2, 60, "part-p to take v2 after the heal")
        wait(lambda: admin.deployment("v2-all")["status"] == "completed", 60, "the rollout to complete")
        assert targets() == {n: "succeeded" for n in names}
        wait(lambda: device("part-p")["online"] and device("part-p")["model"] == "tiny@2", 30, "part-p online, v2")
        wait(lambda: _status(part)["outbox_pending"] <= 2, 30, "part-p's queue to drain")
        # what it sampled while cut off reached the fleet (store and forward), once each
        events = admin.request("GET", "/api/v1/devices/part-p/events", params={"limit": 1000})
        seqs = [e["seq"] for e in events]
        assert len(seqs) == len(set(seqs))
        samples = admin.telemetry("part-p", limit=10000)
        during = [s for s in samples if cut_at <= dt.datetime.fromisoformat(s["ts"]) <= healed_at]
        assert len(during) >= 5, f"{len(during)} samples from the partition reached the fleet"
        for a in agents.values():
            assert a.stop() == 0
    finally:
        for a in agents.values():
            a.stop()
        fleet.stop()


def _status(agent: AgentProcess) -> dict[str, Any]:
    try:
        return json.loads((agent.data_dir / "agent-status.json").read_text())
    except (OSError, ValueError):
        return {"broker_connected": None, "outbox_pending": 0}
