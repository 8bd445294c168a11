"""Adapters over the air, end to end with real processes: a `nanofleet fleet serve` (embedded broker), boards
enrolled with `nanofleet device enroll` running `nanofleet device run` with the real engine over the cached
int8 base, the cached qv adapter bundle uploaded and rolled out with a canary, re-signed (nothing but its
manifest downloaded), then a broken version that the canary refuses at activation: the rollout aborts and
rolls back with a signed rollback, the other board never touched. A board on another base refuses the
adapter before downloading it, with a reason."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml

from manifests import SigningKey, describe_file, read_manifest_unverified
from manifests.adapter import (
    ADAPTER_FILE,
    ADAPTER_ROLE,
    read_adapter_manifest_unverified,
    write_signed_adapter_manifest,
)
from tests.conftest import free_port
from tests.device_agent.helpers import make_bundle
from tests.offline.conftest import FleetProc, cli, popen_cli, stop, wait_for

pytestmark = [pytest.mark.slow]
PROMPT = "The misting pumps run for forty seconds"


def resign_adapter(src: Path, dest: Path, key: SigningKey, version: int, *, scale_b: float | None = None) -> Path:
    """A copy of an adapter bundle as ``version``, signed again; ``scale_b`` multiplies every B matrix (a
    broken fine-tune: the same signature chain, garbage weights)."""
    shutil.copytree(src, dest)
    m = read_adapter_manifest_unverified(dest)
    files = list(m.files)
    if scale_b is not None:
        from export.adapters import PackedAdapter, write_adapter_file

        stored = ort.AdapterFormat.read_adapter(str(dest / ADAPTER_FILE)).get_parameters()
        params = {k: v.numpy() for k, v in stored.items()}
        params = {k: (v * scale_b if k.endswith(".b") else v).astype(np.float32) for k, v in params.items()}
        (dest / ADAPTER_FILE).unlink()
        write_adapter_file(PackedAdapter(params, list(m.lora.sites), list(m.lora.layers)), dest / ADAPTER_FILE,
                           version, m.base.version)  # fmt: skip
        files = [describe_file(dest, ADAPTER_FILE, ADAPTER_ROLE) if f.role == ADAPTER_ROLE else f for f in files]
    write_signed_adapter_manifest(dest, m.model_copy(update={"version": version, "files": files}), key)
    return dest


class Board:
    """An enrolled board running `nanofleet device run` (its agent.yaml from `device enroll`, then adjusted)."""

    def __init__(self, fleet: FleetProc, root: Path, device_id: str, bootstrap: Path, runtime: str = "engine") -> None:
        self.root, self.device_id = root, device_id
        with fleet.admin() as c:
            token = c.enrollment_token(uses=1)["token"]
        r = cli("device", "enroll", "--fleet", fleet.url, "--token", token, "--data-dir", str(root),
                "--device-id", device_id, "--json")  # fmt: skip
        assert r.returncode == 0, r.stderr
        self.config = root / "agent.yaml"
        doc = yaml.safe_load(self.config.read_text())
        self.port = free_port()
        doc["api"] = {**doc.get("api", {}), "port": self.port, "bind": "127.0.0.1"}
        token_file = doc["api"].get("token_file")
        self.headers = {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"} if token_file else {}
        doc["runtime"] = runtime
        doc["bootstrap_bundle"] = str(bootstrap)
        doc.setdefault("limits", {}).update(threads=1, weights_cache=False, disk_margin_bytes=0)
        doc.setdefault("telemetry", {})["interval_s"] = 0.5
        self.config.write_text(yaml.safe_dump(doc))
        self.proc = popen_cli("device", "run", "--config", str(self.config), log=root / "agent.log")

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def models(self) -> list[dict[str, Any]]:
        try:
            r = httpx.get(f"{self.api}/v1/models", headers=self.headers, timeout=30)
        except httpx.HTTPError:
            return []
        return r.json()["data"] if r.status_code == 200 else []

    def complete(self, model: str) -> str:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{self.api}/v1/completions", json=body, headers=self.headers, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        return r.json()["choices"][0]["text"]

    def log(self) -> str:
        p = self.root / "agent.log"
        return p.read_text()[-4000:] if p.is_file() else ""


@pytest.fixture
def fleet(tmp_path: Path, adapter_keys: tuple[Path, Path]) -> Iterator[FleetProc]:
    (tmp_path / "fleet").mkdir()
    f = FleetProc(tmp_path / "fleet", adapter_keys[1]).start()
    yield f
    f.stop()


def _deploy(fleet: FleetProc, name: str, bundle: str, version: int, devices: list[str], **spec: Any) -> None:
    with fleet.admin() as c:
        c.apply({"apiVersion": "nanofleet/v1", "kind": "Deployment", "metadata": {"name": name},
                 "spec": {"bundle": {"name": bundle, "version": version}, "selector": {"device_ids": devices},
                          **spec}})  # fmt: skip


def _settled(fleet: FleetProc, name: str, timeout: float = 180) -> dict[str, Any]:
    return wait_for(lambda: (d := fleet.deployment(name))["status"] not in ("in_progress",) and d, timeout,
                    f"deployment {name} to settle")  # fmt: skip


def _reported(fleet: FleetProc, device_id: str) -> dict[str, Any]:
    with fleet.admin() as c:
        return c.device(device_id).get("reported") or {}


def _events(fleet: FleetProc, device_id: str) -> list[dict[str, Any]]:
    with fleet.admin() as c:
        return [e["payload"] for e in c.request("GET", f"/api/v1/devices/{device_id}/events")]


def _adapter_bytes(fleet: FleetProc, device_id: str, command_id: str) -> dict[str, int]:
    """The byte counts of the adapter result event of ``command_id`` (waits for the event to arrive)."""

    def find() -> dict[str, int] | None:
        hits = [e for e in _events(fleet, device_id) if e["kind"] == "result" and e.get("deployment_id") == command_id
                and e.get("details", {}).get("kind") == "adapter"]  # fmt: skip
        return hits[-1]["details"]["bytes"] if hits else None

    return wait_for(find, 30, f"the result event of {command_id} on {device_id}")


def test_an_adapter_rolls_out_with_a_canary_and_a_bad_one_aborts_and_rolls_back(
    fleet: FleetProc, tmp_path: Path, base_int8: Path, qv_int8: tuple[Path, dict], adapter_keys: tuple[Path, Path]
) -> None:
    key = SigningKey.load(adapter_keys[0])
    base = read_manifest_unverified(base_int8)
    v2 = resign_adapter(qv_int8[0], tmp_path / "qv-v2", key, 2)
    bad = resign_adapter(qv_int8[0], tmp_path / "qv-bad", key, 3, scale_b=300.0)
    other_base = make_bundle(tmp_path / "other-base", key, name="tiny", version=1)
    with fleet.admin() as c:
        for b in (base_int8, qv_int8[0], v2, bad):
            c.upload_bundle(b)
        summary = c.model("qv", 1)["summary"]
    assert summary["kind"] == "adapter" and summary["base"]["manifest_sha256"] == fixtures_sha(base_int8)

    boards = [Board(fleet, tmp_path / f"b{i}", f"b{i}", base_int8) for i in (1, 2)]
    odd = Board(fleet, tmp_path / "b3", "b3", other_base, runtime="tests.device_agent.fake_runtime:factory")
    try:
        for b in boards:
            wait_for(lambda b=b: [m["id"] for m in b.models()] == [base.name], 240, f"{b.device_id} serving\n{b.log()}")
        wait_for(lambda: all(_reported(fleet, d).get("state") == "committed" for d in ("b1", "b2", "b3")), 60,
                 "all boards report their base")  # fmt: skip
        plain = boards[0].complete(base.name)

        # 1. qv@1 with a canary: each board answers as <base>:qv, having fetched only the adapter's bytes
        _deploy(fleet, "qv-1", "qv", 1, ["b1", "b2"], strategy={"type": "canary", "canary": {"devices": 1}})
        dep = _settled(fleet, "qv-1")
        assert dep["status"] == "completed", dep
        adapter_bytes = sum(f["size"] for f in read_adapter_manifest_unverified(qv_int8[0]).model_dump()["files"])
        for b in boards:
            ids = [m["id"] for m in b.models()]
            assert ids == [base.name, f"{base.name}:qv"], ids
            tuned = b.complete(f"{base.name}:qv")
            assert tuned != plain and b.complete(base.name) == plain
            got = _adapter_bytes(fleet, b.device_id, _command(dep, b.device_id))
            assert got["fetched"] == adapter_bytes and got["copied"] == 0, got
            rep = _reported(fleet, b.device_id)
            (held,) = rep["adapters"]
            assert held["name"] == "qv" and held["version"] == 1 and held["resident"]
            assert held["base_manifest_sha256"] == fixtures_sha(base_int8) and held["previous_version"] is None

        # 2. the same weights re-signed as qv@2: nothing but the manifest and signature crosses the network
        _deploy(fleet, "qv-2", "qv", 2, ["b1", "b2"])
        dep = _settled(fleet, "qv-2")
        assert dep["status"] == "completed", dep
        for b in boards:
            got = _adapter_bytes(fleet, b.device_id, _command(dep, b.device_id))
            assert got["fetched"] == 0 and got["copied"] == adapter_bytes, got
            rep = _reported(fleet, b.device_id)["adapters"][0]
            assert (rep["version"], rep["previous_version"]) == (2, 1)
            assert b.complete(f"{base.name}:qv") == tuned

        # the dashboard shows the adapters per model and per device
        models, device = _dashboard(fleet, "/models", "/devices/b1")
        assert 'href="#model-qv-2">qv@2' in models and f"<code>{base.name}:qv</code>" in models
        assert "NOT verified" not in models
        assert "qv@2 (resident), v1 kept for rollback" in device

        # 3. a broken qv@3 with a canary: refused at activation, the deployment aborts and rolls back to qv@2
        _deploy(fleet, "qv-3", "qv", 3, ["b1", "b2"], strategy={"type": "canary", "canary": {"devices": 1}},
                abort={"failure_rate_pct": 50, "min_devices": 1, "on_abort": "rollback"})  # fmt: skip
        dep = _settled(fleet, "qv-3")
        wait_for(lambda: fleet.deployment("qv-3")["status"] == "rolled_back", 120, "qv-3 rolled back")
        dep = fleet.deployment("qv-3")
        assert "fail" in (dep["abort_reason"] or ""), dep
        canary = next(t for t in dep["targets"] if t["wave"] == 0)
        assert canary["state"] == "rolled_back", dep["targets"]
        assert all(t["state"] == "skipped" for t in dep["targets"] if t is not canary), dep["targets"]
        errors = [e for e in _events(fleet, canary["device_id"])
                  if e["kind"] == "error" and e["details"].get("reason") == "adapter_quality"]  # fmt: skip
        assert errors and "breaks the model" in errors[-1]["message"], errors
        for b in boards:
            rep = _reported(fleet, b.device_id)["adapters"][0]
            assert rep["version"] == 2 and rep["resident"]
            assert b.complete(f"{base.name}:qv") == tuned  # the good version serves on every board

        # 4. a board on another base refuses the adapter before downloading a byte of it
        _deploy(fleet, "qv-odd", "qv", 2, ["b3"])
        dep = _settled(fleet, "qv-odd")
        (t,) = dep["targets"]
        assert t["state"] == "failed" and "needs base" in (t["error"] or ""), t
        refused = [e for e in _events(fleet, "b3") if e["kind"] == "refused"]
        assert refused and refused[-1]["details"]["reason"] == "adapter_base_mismatch", refused
        assert not (tmp_path / "b3" / "adapters" / "qv").exists()  # nothing fetched
    finally:
        for b in (*boards, odd):
            stop(b.proc)


def _unloaded_results(fleet: FleetProc, device_id: str, command_id: str) -> list[dict[str, Any]]:
    """The adapter result events of ``command_id`` on ``device_id`` that say the adapter was unloaded."""
    return [e for e in _events(fleet, device_id) if e["kind"] == "result" and e.get("deployment_id") == command_id
            and e.get("details", {}).get("kind") == "adapter" and e["details"].get("unloaded")]  # fmt: skip


def test_rolling_back_an_adapter_the_boards_held_no_earlier_version_of_unloads_it(
    fleet: FleetProc, tmp_path: Path, base_int8: Path, qv_int8: tuple[Path, dict], adapter_keys: tuple[Path, Path]
) -> None:
    """qv@1, the boards' first version of it: the real board takes it (canary), the board on another base refuses
    it, the failure-rate rule aborts and rolls back; neither held an earlier version, so each rollback names
    version 0 (signed) and unloads it: the real board serves its base alone, both targets rolled_back. Then qv@1
    again on the real board, rolled back by hand: unloaded again."""
    key = SigningKey.load(adapter_keys[0])
    base = read_manifest_unverified(base_int8)
    other_base = make_bundle(tmp_path / "other-base", key, name="tiny", version=1)
    with fleet.admin() as c:
        for b in (base_int8, qv_int8[0]):
            c.upload_bundle(b)
    board = Board(fleet, tmp_path / "b1", "b1", base_int8)  # enrolled first: the canary
    odd = Board(fleet, tmp_path / "b2", "b2", other_base, runtime="tests.device_agent.fake_runtime:factory")
    try:
        wait_for(lambda: [m["id"] for m in board.models()] == [base.name], 240, f"b1 serving\n{board.log()}")
        wait_for(lambda: all(_reported(fleet, d).get("state") == "committed" for d in ("b1", "b2")), 60,
                 "both boards report their base")  # fmt: skip
        plain = board.complete(base.name)

        # 1. by an abort rule: b1 takes qv@1, b2 refuses it (1 of 2 failed), the deployment rolls back
        _deploy(fleet, "qv-first", "qv", 1, ["b1", "b2"], strategy={"type": "canary", "canary": {"devices": 1}},
                abort={"failure_rate_pct": 50, "min_devices": 2, "on_abort": "rollback"})  # fmt: skip
        wait_for(lambda: fleet.deployment("qv-first")["status"] in ("rolled_back", "completed"), 240,
                 f"qv-first rolled back\n{board.log()}")  # fmt: skip
        dep = fleet.deployment("qv-first")
        assert dep["status"] == "rolled_back" and "failure rate" in (dep["abort_reason"] or ""), dep
        targets = {t["device_id"]: t for t in dep["targets"]}
        assert {d: t["state"] for d, t in targets.items()} == {"b1": "rolled_back", "b2": "rolled_back"}, targets
        assert all(t["previous"] == "qv@0" for t in targets.values()), targets
        started = [e for e in _events(fleet, "b1") if e["kind"] == "result" and e.get("deployment_id") == dep["id"]]
        assert started and started[-1]["details"].get("unloaded") is False  # b1 did take qv@1 before the abort
        for d in ("b1", "b2"):
            assert wait_for(lambda d=d: _unloaded_results(fleet, d, f"{dep['id']}.rollback"), 30, f"{d} unloaded")
            assert not _reported(fleet, d).get("adapters"), _reported(fleet, d)
        assert [m["id"] for m in board.models()] == [base.name]
        assert board.complete(base.name) == plain
        assert not (tmp_path / "b1" / "adapters" / "qv").exists()

        # 2. by hand: qv@1 again (not below the highest committed version: no authorization needed), rolled back
        _deploy(fleet, "qv-again", "qv", 1, ["b1"])
        dep = _settled(fleet, "qv-again")
        assert dep["status"] == "completed", dep
        assert [m["id"] for m in board.models()] == [base.name, f"{base.name}:qv"]
        assert board.complete(f"{base.name}:qv") != plain
        (t,) = dep["targets"]
        assert t["previous"] == "qv@0", t  # the unload left it no version to go back to
        with fleet.admin() as c:
            c.control("qv-again", "rollback")
        wait_for(lambda: fleet.deployment("qv-again")["status"] == "rolled_back", 120, f"qv-again\n{board.log()}")
        (t,) = fleet.deployment("qv-again")["targets"]
        assert t["state"] == "rolled_back", t
        wait_for(lambda: [m["id"] for m in board.models()] == [base.name], 30, "b1 serving the base alone")
        assert not _reported(fleet, "b1").get("adapters") and board.complete(base.name) == plain
    finally:
        for b in (board, odd):
            stop(b.proc)


def _dashboard(fleet: FleetProc, *paths: str) -> list[str]:
    """Pages of the dashboard, signed in with the admin token the way the form does it."""
    import re

    with httpx.Client(base_url=fleet.url, follow_redirects=False, timeout=30) as client:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
        assert csrf
        token = (fleet.data / "admin.token").read_text().strip()
        r = client.post("/login", data={"token": token, "csrf_token": csrf.group(1), "next": "/"})
        assert r.status_code == 303, r.text
        pages = [client.get(p) for p in paths]
    assert all(p.status_code == 200 for p in pages), [p.status_code for p in pages]
    return [p.text for p in pages]


def _command(dep: dict[str, Any], device_id: str) -> str:
    """The command id a device got (a deployment's first try uses the deployment's id)."""
    assert any(t["device_id"] == device_id for t in dep["targets"])
    return dep["id"]


def fixtures_sha(bundle: Path) -> str:
    from manifests import manifest_sha256

    return manifest_sha256(bundle)
