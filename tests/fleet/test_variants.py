"""Per-board variants end to end: the real service, real HTTP, a two-variant release, simulated Pi 4,
Pi 5 and Pi Zero boards over a real broker. Each lands the variant its reported capabilities fit; the
board no variant fits is marked unfit with the reason and sent nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.client import FleetAPIError, FleetClient
from manifests import (
    BoardCapabilities,
    SigningKey,
    TrustStore,
    load_public_key,
    read_manifest_unverified,
    write_signed_manifest,
)

from .conftest import make_bundle, wait_for
from .simdevice import SimDevice

GiB = 2**30
A72 = ["fp", "asimd", "evtstrm", "crc32", "cpuid"]  # Pi 4: no dot product
A76 = [*A72, "asimddp", "asimdhp", "atomics", "lrcpc", "dcpop"]  # Pi 5
CPU_ONLY = ["CPUExecutionProvider"]


def caps(hw: str, ram: int, features: list[str]) -> BoardCapabilities:
    return BoardCapabilities(
        arch="aarch64",
        hardware_class=hw,
        ram_bytes=ram,
        cpu_features=features,
        onnxruntime_version="1.22.0",
        execution_providers=CPU_ONLY,
    )


class Board(SimDevice):
    """A simulated device whose reported state carries board capabilities (None: an older agent)."""

    def __init__(self, *args: Any, capabilities: BoardCapabilities | None = None, **kw: Any) -> None:
        self.capabilities = capabilities
        super().__init__(*args, **kw)

    def _hardware(self) -> dict[str, Any]:
        caps = self.capabilities
        return {
            "hardware_class": caps.hardware_class if caps else None,
            "cpu_arch": "aarch64",
            "ram_bytes": caps.ram_bytes if caps else None,
            "capabilities": caps,
        }


def enrol_board(fleet: Any, device_id: str, hw: str, *, at_enrol: BoardCapabilities | None,
                reported: BoardCapabilities | None, **kw: Any) -> Board:  # fmt: skip
    with fleet.admin() as admin:
        token = admin.enrollment_token(uses=1)["token"]
    body: dict[str, Any] = {"device_id": device_id, "hardware_class": hw}
    if at_enrol is not None:
        body["capabilities"] = at_enrol.to_json()
    with FleetClient(fleet.url) as anon:
        creds = anon.enroll(token, **body)
    board = Board(
        creds["device_id"],
        creds["mqtt"]["url"],
        username=creds["mqtt"]["username"],
        password=creds["mqtt"]["password"],
        bundle_trust=TrustStore.from_paths([fleet.bundle_pub]),
        fleet_trust=TrustStore([load_public_key(creds["fleet_public_key"].encode())]),
        capabilities=reported,
        **({"telemetry_s": 5} | kw),
    )
    fleet.devices.append(board)
    return board.start()


def release_doc(version: int = 1, int8_rules: dict | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "nanofleet/v1",
        "kind": "Release",
        "metadata": {"name": "tiny", "version": version, "description": "two precisions of tiny-model"},
        "spec": {
            "variants": [
                {
                    "name": "int8",
                    "bundle": {"name": "tiny-int8", "version": 1},
                    "rules": int8_rules or {"min_ram": "4GiB", "cpu_features": ["asimddp"]},
                },
                {"name": "int4", "bundle": {"name": "tiny-int4", "version": 1}, "rules": {"min_ram": "1GiB"}},
            ]
        },
    }


def deployment(name: str, release: tuple[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "nanofleet/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"release": {"name": release[0], "version": release[1]}, "strategy": {"type": "all-at-once"}},
    }


@pytest.fixture
def variant_bundles(tmp_path: Path, bundle_key: tuple[SigningKey, Path]) -> dict[str, Path]:
    return {n: make_bundle(tmp_path / n, bundle_key[0], 1, name=f"tiny-{n}") for n in ("int8", "int4")}


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_two_variant_release_lands_the_right_variant_on_each_board(request, make_fleet, variant_bundles, db) -> None:
    if db == "postgres":
        url, schema = request.getfixturevalue("pg_schema")
        fleet = make_fleet(database_url=url, schema=schema)
    else:
        fleet = make_fleet()
    pi5 = enrol_board(fleet, "pi5-a", "pi5", at_enrol=None, reported=caps("pi5", 8 * GiB, A76))
    # An agent that sent its capabilities at enrolment only (its reported state has none).
    pi4 = enrol_board(fleet, "pi4-a", "pi4", at_enrol=caps("pi4", 4 * GiB, A72), reported=None)
    zero = enrol_board(fleet, "zero-a", "pi-zero-2w", at_enrol=None, reported=caps("pi-zero-2w", GiB // 2, A72))
    with fleet.admin() as admin:
        for b in variant_bundles.values():
            admin.upload_bundle(b)
        created = admin.create_release(release_doc())
        assert created["result"] == "created"
        assert [v["name"] for v in created["release"]["variants"]] == ["int8", "int4"]
        assert admin.create_release(release_doc())["result"] == "unchanged"
        wait_for(
            lambda: all((admin.device(d.id)["reported"] or {}).get("state") for d in (pi5, pi4, zero)),
            what="every board reported",
        )
        assert admin.apply(deployment("tiny-rollout", ("tiny", 1)))["result"] == "created"
        wait_for(lambda: admin.deployment("tiny-rollout")["status"] == "completed", 30, what="completed")
        dep = admin.deployment("tiny-rollout")
        # A stick carries one bundle: an offline package of a release deployment is refused in one line.
        with pytest.raises(FleetAPIError) as ei:
            admin.request("POST", "/api/v1/deployments/tiny-rollout/offline-package", json={"dry_run": True})
        assert ei.value.status_code == 409 and "offline packages carry one bundle" in ei.value.body["detail"]

    assert pi5.current == ("tiny-int8", 1) and pi4.current == ("tiny-int4", 1)
    assert zero.current is None and not any(t.endswith("/desired") for t in zero.topics_seen)
    assert dep["release"] == "tiny@1"
    rows = {t["device_id"]: t for t in dep["targets"]}
    def row(device_id: str) -> tuple[str, str, str]:
        return rows[device_id]["variant"], rows[device_id]["bundle"], rows[device_id]["state"]

    assert row("pi5-a") == ("int8", "tiny-int8@1", "succeeded")
    assert row("pi4-a") == ("int4", "tiny-int4@1", "succeeded")
    z = rows["zero-a"]
    assert z["state"] == "unfit" and z["variant"] is None and z["bundle"] is None
    assert z["error"] == (
        "no variant of tiny@1 fits: int8 needs 4.0 GiB RAM, board has 0.5 GiB; "
        "int4 needs 1.0 GiB RAM, board has 0.5 GiB"
    )
    assert dep["counts"]["unfit"] == 1 and dep["counts"]["succeeded"] == 2

    # The dashboard's deployment page shows the choice per device.
    with httpx.Client(base_url=fleet.url, follow_redirects=False, timeout=30) as web:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', web.get("/login").text)
        assert csrf
        token = fleet.svc.admin_token
        assert web.post("/login", data={"token": token, "csrf_token": csrf.group(1), "next": "/"}).status_code == 303
        html = web.get("/deployments/tiny-rollout").text
    assert "release tiny@1" in html
    assert re.search(r'data-target="pi5-a".*?<td class="variant">int8 \(tiny-int8@1\)</td>', html, re.S)
    assert re.search(r'data-target="pi4-a".*?<td class="variant">int4 \(tiny-int4@1\)</td>', html, re.S)
    assert re.search(r'data-target="zero-a" data-state="unfit">.*?no variant of tiny@1 fits', html, re.S)


def test_health_rules_watch_each_device_on_its_own_variant_and_rollback_returns_it(
    make_fleet, tmp_path: Path, bundle_key: tuple[SigningKey, Path]
) -> None:
    """A Pi 4 gets the second variant; its decode rate on it regresses: the abort rule must judge the bundle
    it was sent (not the release's first), and the rollback sends it back to what it ran before."""
    fleet = make_fleet()
    pi4 = enrol_board(fleet, "pi4-b", "pi4", at_enrol=None, reported=caps("pi4", 4 * GiB, A72), telemetry_s=0.2)
    pi4.behaviour.decode_tok_s = {1: 100.0, 2: 40.0}  # the variants are version 2: 60% slower on this board
    with fleet.admin() as admin:
        admin.upload_bundle(make_bundle(tmp_path / "base", bundle_key[0], 1, name="tiny-base"))
        for n in ("int8", "int4"):
            admin.upload_bundle(make_bundle(tmp_path / n, bundle_key[0], 2, name=f"tiny-{n}"))
        base = {"apiVersion": "nanofleet/v1", "kind": "Deployment", "metadata": {"name": "base"},
                "spec": {"bundle": {"name": "tiny-base", "version": 1}}}  # fmt: skip
        admin.apply(base)
        wait_for(lambda: (admin.device("pi4-b").get("telemetry") or {}).get("model", {}).get("version") == 1,
                 what="telemetry on the base model")  # fmt: skip
        doc = release_doc()
        for v in doc["spec"]["variants"]:
            v["bundle"]["version"] = 2
        admin.create_release(doc)
        dep = deployment("slow", ("tiny", 1))
        dep["spec"]["abort"] = {"max_decode_drop_pct": 30, "on_abort": "rollback"}
        admin.apply(dep)
        wait_for(lambda: admin.deployment("slow")["status"] == "rolled_back", 30, what="rolled back")
        out = admin.deployment("slow")
    assert "decode 40.0 tok/s is 60% below 100.0 tok/s" in out["abort_reason"]
    t = out["targets"][0]
    assert (t["variant"], t["bundle"], t["state"]) == ("int4", "tiny-int4@2", "rolled_back")
    assert pi4.current == ("tiny-base", 1)


def test_release_api_refuses_what_it_cannot_keep(make_fleet, variant_bundles, tmp_path: Path, bundle_key) -> None:
    fleet = make_fleet()
    with fleet.admin() as admin:
        with pytest.raises(FleetAPIError) as ei:
            admin.create_release(release_doc())  # no bundles uploaded yet
        assert ei.value.status_code == 422 and "tiny-int8@1" in str(ei.value.body)
        for b in variant_bundles.values():
            admin.upload_bundle(b)
        admin.create_release(release_doc())
        with pytest.raises(FleetAPIError) as ei:
            admin.create_release(release_doc(int8_rules={"min_ram": "2GiB"}))
        assert ei.value.status_code == 409 and "make tiny@2" in ei.value.body["detail"]
        with pytest.raises(FleetAPIError) as ei:
            admin.apply(deployment("nope", ("tiny", 9)))
        assert ei.value.status_code == 422 and ei.value.body["errors"][0]["path"] == "spec.release"
        # A bundle that wants CUDA only: its variant's rules get the provider, so no CPU board is sent it.
        gpu = make_bundle(tmp_path / "fp16", bundle_key[0], 1, name="tiny-fp16")
        m = read_manifest_unverified(gpu)
        runtime = m.runtime.model_copy(update={"execution_providers": ["CUDAExecutionProvider"]})
        write_signed_manifest(gpu, m.model_copy(update={"runtime": runtime}), bundle_key[0])
        admin.upload_bundle(gpu)
        doc = release_doc(2)
        doc["spec"]["variants"].insert(0, {"name": "fp16-cuda", "bundle": {"name": "tiny-fp16", "version": 1}})
        out = admin.create_release(doc)["release"]
        assert out["variants"][0]["rules"] == {"execution_providers": ["CUDAExecutionProvider"]}
        assert [r["version"] for r in admin.releases()] == [1, 2]
        assert admin.release("tiny", 2)["variants"][1]["rules"]["min_ram"] == 4 * GiB
        # While a deployment of the release is active, no variant's bundle may go, sent to a board or not.
        token = admin.enrollment_token(uses=1)["token"]
        with FleetClient(fleet.url) as anon:  # a board that enrols and never connects: its target stays in flight
            anon.enroll(token, device_id="quiet", capabilities=caps("pi5", 8 * GiB, A76).to_json())
        admin.apply(deployment("held", ("tiny", 1)))
        wait_for(lambda: admin.deployment("held")["targets"][0]["state"] == "in_flight", what="in flight")
        with pytest.raises(FleetAPIError) as ei:
            admin.delete_model("tiny-int4", 1)
        assert ei.value.status_code == 409 and "variant int4 of tiny@1" in ei.value.body["detail"]
        admin.control("held", "abort")
        admin.delete_model("tiny-int4", 1)
