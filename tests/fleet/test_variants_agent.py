"""Per-board variants with a real agent: real processes (`nanofleet device enroll`, `nanofleet device run`
with the real engine, `nanofleet fleet release create`), a real fleet (HTTP, embedded broker, SQLite) and
two signed copies of the cached default bundle. One copy declares the CUDA execution provider only (the
Jetson variant's shape); this CPU-only board reports its real onnxruntime providers, so the fleet must
send it the other copy, and the engine must run it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.client import FleetClient
from fleet.config import FleetConfig
from fleet.server import ServerThread
from manifests import SigningKey, read_manifest_unverified, write_signed_manifest
from tests.conftest import free_port

from .conftest import wait_for

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CUDA = "CUDAExecutionProvider"


def copy_as(src: Path, dest: Path, key: SigningKey, version: int, providers: list[str]) -> Path:
    """The same model files (hard links), another version, the execution providers it declares."""
    dest.mkdir(parents=True)
    m = read_manifest_unverified(src)
    for f in m.files:
        os.link(src / f.path, dest / f.path)
    runtime = m.runtime.model_copy(update={"execution_providers": providers})
    write_signed_manifest(dest, m.model_copy(update={"version": version, "runtime": runtime}), key)
    return dest


def nanofleet(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nanofleet.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.mark.timeout(900)
def test_a_real_agent_gets_the_variant_its_board_can_run(tmp_path: Path, default_bundle: tuple[Path, Path]) -> None:
    bundle, pub = default_bundle
    key = SigningKey.load(pub.parent / "nanofleet.key")
    base = read_manifest_unverified(bundle)
    gpu = copy_as(bundle, tmp_path / "gpu", key, base.version + 1, [CUDA])
    cpu = copy_as(bundle, tmp_path / "cpu", key, base.version + 2, [])

    cfg = FleetConfig(data_dir=tmp_path / "fleet", port=0, trusted_keys=[pub], tick_s=0.25)
    server = ServerThread(cfg).start()
    agent = None
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115 - closed below
    try:
        conn = ["--url", server.url, "--token", server.svc.admin_token]
        # The release, built from the two bundle folders by the CLI (which uploads them first).
        r = nanofleet(
            "fleet", "release", "create", "--name", "smollm2", "--version", "1",
            "--variant", f"cuda={gpu}",
            "--variant", f"cpu={cpu},arch={platform.machine()},min_ram=256MiB",
            *conn, "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        rel = json.loads(r.stdout)["release"]
        # The CUDA-only bundle's variant got the provider rule from its manifest.
        assert rel["variants"][0]["rules"] == {"execution_providers": [CUDA]}

        with FleetClient(server.url, server.svc.admin_token) as admin:
            token = admin.enrollment_token(uses=1, hardware_class="sim-board")["token"]
        board = tmp_path / "board"
        port = str(free_port())
        r = nanofleet(
            "device", "enroll", "--fleet", server.url, "--token", token, "--data-dir", str(board),
            "--device-id", "real-board", "--api-port", port, "--set", "limits.threads=1",
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        agent = subprocess.Popen(
            [sys.executable, "-m", "nanofleet.cli", "device", "run", "--config", str(board / "agent.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        with FleetClient(server.url, server.svc.admin_token) as admin:
            reported = wait_for(
                lambda: ((admin.device("real-board").get("reported") or {}).get("capabilities")),
                90,
                what=f"the agent's reported capabilities ({tmp_path / 'agent.log'})",
            )
            import onnxruntime as ort

            assert reported["onnxruntime_version"] == ort.__version__
            assert CUDA not in reported["execution_providers"] and reported["cpu_features"]
            admin.apply(
                {
                    "apiVersion": "nanofleet/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "smollm2-variants"},
                    "spec": {"release": {"name": "smollm2", "version": 1}, "strategy": {"type": "all-at-once"}},
                }
            )
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                dep = admin.deployment("smollm2-variants")
                if dep["status"] != "in_progress":
                    break
                time.sleep(1)
            target = dep["targets"][0]
            assert dep["status"] == "completed" and target["state"] == "succeeded", (dep, log_tail(tmp_path))
            assert (target["variant"], target["bundle"]) == ("cpu", f"{base.name}@{base.version + 2}")
            dev = admin.device("real-board")
            assert dev["model"] == f"{base.name}@{base.version + 2}"
            chosen = [a for a in admin.audit(deployment="smollm2-variants") if a["action"] == "variant_chosen"]
            assert chosen and chosen[0]["details"]["variant"] == "cpu"
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(30)
        log.close()
        server.stop()


def log_tail(tmp_path: Path) -> str:
    return (tmp_path / "agent.log").read_text(errors="replace")[-3000:]
