"""The REST API against a running service over real HTTP, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import httpx
import pytest

from fleet.client import FleetAPIError, FleetClient
from manifests import SigningKey

from .conftest import BUNDLE, make_bundle


@pytest.fixture(params=["sqlite", "postgres"])
def fleet(request: pytest.FixtureRequest, make_fleet):
    if request.param == "postgres":
        url, schema = request.getfixturevalue("pg_schema")
        return make_fleet(database_url=url, schema=schema)
    return make_fleet()


def canary(version: int = 1, name: str = "canary", **spec_extra) -> dict:
    return {
        "apiVersion": "nanofleet/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "bundle": {"name": BUNDLE, "version": version},
            "strategy": {"type": "canary", "canary": {"devices": 1}},
            **spec_extra,
        },
    }


def test_no_auth_is_401_and_wrong_token_is_401(fleet) -> None:
    for path in (
        "/api/v1/devices",
        "/api/v1/models",
        "/api/v1/deployments",
        "/api/v1/status",
        "/api/v1/audit",
    ):
        r = httpx.get(fleet.url + path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.get(fleet.url + path, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401, path
    r = httpx.post(fleet.url + "/api/v1/deployments", json=canary())
    assert r.status_code == 401


def test_enrolment_is_one_time_and_devices_cannot_read_each_other(fleet) -> None:
    with fleet.admin() as admin:
        tok = admin.enrollment_token(uses=2, tags={"site": "lab"}, groups=["pilot"])["token"]
    with FleetClient(fleet.url) as anon:
        a = anon.enroll(tok, device_id="dev-a", hardware_class="pi5", ram_bytes=8 << 30)
        b = anon.enroll(tok, device_id="dev-b")
        with pytest.raises(FleetAPIError) as e:
            anon.enroll(tok, device_id="dev-c")
        assert e.value.status_code == 401  # used up
        with pytest.raises(FleetAPIError) as e:
            anon.enroll("nfe_forged", device_id="dev-d")
        assert e.value.status_code == 401
    assert a["mqtt"]["username"] == "dev-a" and a["mqtt"]["password"] == a["device_token"]
    assert "BEGIN PUBLIC KEY" in a["fleet_public_key"]
    ha = {"Authorization": f"Bearer {a['device_token']}"}
    own = httpx.get(f"{fleet.url}/api/v1/devices/dev-a/credentials", headers=ha)
    assert own.status_code == 200 and own.json()["mqtt"]["username"] == "dev-a"
    assert own.json()["mqtt"]["password"] is None  # the secret is never readable again
    for path in ("credentials", "telemetry", "desired", ""):
        r = httpx.get(f"{fleet.url}/api/v1/devices/dev-b/{path}".rstrip("/"), headers=ha)
        assert r.status_code == 403, path
    r = httpx.post(f"{fleet.url}/api/v1/devices/dev-b/credentials/rotate", headers=ha)
    assert r.status_code == 403
    # A device token is not an admin token.
    assert httpx.get(f"{fleet.url}/api/v1/devices", headers=ha).status_code == 403
    # Rotation invalidates the old token.
    new = httpx.post(
        f"{fleet.url}/api/v1/devices/dev-b/credentials/rotate",
        headers={"Authorization": f"Bearer {b['device_token']}"},
    ).json()
    assert (
        httpx.get(
            f"{fleet.url}/api/v1/devices/dev-b", headers={"Authorization": f"Bearer {b['device_token']}"}
        ).status_code
        == 401
    )
    assert (
        httpx.get(
            f"{fleet.url}/api/v1/devices/dev-b", headers={"Authorization": f"Bearer {new['device_token']}"}
        ).status_code
        == 200
    )
    with fleet.admin() as admin:
        devs = {d["id"]: d for d in admin.devices()}
        assert devs["dev-a"]["tags"] == {"site": "lab"} and devs["dev-a"]["groups"] == ["pilot"]
        assert devs["dev-a"]["hardware_class"] == "pi5" and devs["dev-a"]["ram_bytes"] == 8 << 30
        actions = [x["action"] for x in admin.audit()]
        assert actions.count("enrolled") == 2 and "credentials_rotated" in actions


def test_models_upload_verify_serve_delete(fleet, bundles, tmp_path: Path) -> None:
    with fleet.admin() as admin:
        m = admin.upload_bundle(bundles[1])
        assert (m["name"], m["version"]) == (BUNDLE, 1)
        # The same bundle again is a no-op (200), not a second copy.
        r = admin.http.post("/api/v1/models", files=_files(bundles[1]))
        assert r.status_code == 200

        # Tampered file: refused, nothing stored.
        bad = tmp_path / "tampered"
        shutil.copytree(bundles[2], bad)
        (bad / "model.onnx").write_bytes(b"\x00" + (bad / "model.onnx").read_bytes()[1:])
        r = admin.http.post("/api/v1/models", files=_files(bad))
        assert r.status_code == 422 and "sha256" in r.json()["detail"]
        # Signed by a key the fleet does not trust: refused before any file is read.
        rogue = make_bundle(tmp_path / "rogue", SigningKey.generate(), 5)
        r = admin.http.post("/api/v1/models", files=_files(rogue))
        assert r.status_code == 422 and "unknown_key" in r.json()["detail"]
        assert [x["version"] for x in admin.models()] == [1]

        base = m["base_url"]
        f = next(x for x in m["files"] if x["path"] == "model.onnx")
        full = httpx.get(f"{base}/model.onnx")
        assert full.status_code == 200 and hashlib.sha256(full.content).hexdigest() == f["sha256"]
        assert full.headers["etag"] == f'"{f["sha256"]}"' and full.headers["x-checksum-sha256"] == f["sha256"]
        part = httpx.get(f"{base}/model.onnx", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == full.content[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{f['size']}"
        assert (
            httpx.get(f"{base}/model.onnx", headers={"If-None-Match": full.headers["etag"]}).status_code
            == 304
        )
        assert httpx.get(f"{base}/model.onnx", headers={"Range": "bytes=99999999-"}).status_code == 416
        body = httpx.get(f"{base}/manifest.yaml")
        assert hashlib.sha256(body.content).hexdigest() == m["manifest_sha256"]
        assert httpx.get(f"{base}/nope.bin").status_code == 404
        assert httpx.get(f"{fleet.url}/bundles/{BUNDLE}/9/manifest.yaml").status_code == 404

        # In use -> delete refused; unused -> deleted and its blobs gone.
        fleet.enroll(1, telemetry_s=5)
        admin.apply(canary(1))
        from .conftest import wait_for

        wait_for(lambda: admin.deployment("canary")["status"] == "completed", what="canary completed")
        with pytest.raises(FleetAPIError) as e:
            admin.delete_model(BUNDLE, 1)
        assert e.value.status_code == 409 and "in use" in e.value.message
        admin.upload_bundle(bundles[3])
        blob = fleet.svc.blobs.path(
            next(x for x in admin.model(BUNDLE, 3)["files"] if x["path"] == "model.onnx")["sha256"]
        )
        assert blob.is_file()
        admin.delete_model(BUNDLE, 3)
        assert not blob.is_file()
        assert [x["version"] for x in admin.models()] == [1]


def _files(root: Path) -> list:
    from manifests import read_manifest_unverified

    m = read_manifest_unverified(root)
    return [
        ("files", (p, (root / p).read_bytes()))
        for p in ("manifest.yaml", "manifest.sig", *(f.path for f in m.files))
    ]


def test_invalid_manifest_is_422_naming_the_field(fleet, bundles) -> None:
    with fleet.admin() as admin:
        admin.upload_bundle(bundles[1])
        cases = {
            # A cross-field rule names the object holding both fields, and says which is missing.
            "spec.strategy": {"type": "canary"},
            "spec.strategy.max_in_flight": {"type": "all-at-once", "max_in_flight": 0},
            "spec.strategy.type": {"type": "sideways"},
        }
        for path, strategy in cases.items():
            doc = canary()
            doc["spec"]["strategy"] = strategy
            r = admin.http.post("/api/v1/deployments", json=doc)
            assert r.status_code == 422, path
            paths = [e["path"] for e in r.json()["errors"]]
            assert any(p.startswith(path) for p in paths), (path, paths)
            assert path.split(".")[-1] in r.json()["detail"]
        r = admin.http.post(
            "/api/v1/deployments",
            json={**canary(), "spec": {**canary()["spec"], "strategy": {"type": "canary"}}},
        )
        assert "strategy.canary" in r.json()["detail"]
        doc = canary()
        doc["spec"]["abort"] = {"failure_rate_pct": 250}
        r = admin.http.post("/api/v1/deployments", json=doc)
        assert r.status_code == 422 and r.json()["errors"][0]["path"] == "spec.abort.failure_rate_pct"
        doc = canary(version=7)
        r = admin.http.post("/api/v1/deployments", json=doc)
        assert r.status_code == 422 and r.json()["errors"][0]["path"] == "spec.bundle"
        doc = canary()
        doc["spec"]["surprise"] = 1
        r = admin.http.post("/api/v1/deployments", json=doc)
        assert r.status_code == 422 and r.json()["errors"][0]["path"] == "spec.surprise"


def test_apply_is_idempotent_and_a_new_spec_is_a_new_generation(fleet, bundles) -> None:
    with fleet.admin() as admin:
        admin.upload_bundle(bundles[1])
        r1 = admin.http.post("/api/v1/deployments", json=canary())
        assert r1.status_code == 201 and r1.json()["result"] == "created"
        r2 = admin.http.post("/api/v1/deployments", json=canary())
        assert r2.status_code == 200 and r2.json()["result"] == "unchanged"
        assert r2.json()["deployment"]["id"] == r1.json()["deployment"]["id"]
        doc = canary()
        doc["spec"]["strategy"]["wait_seconds"] = 5
        r3 = admin.apply(doc)
        assert r3["result"] == "configured" and r3["deployment"]["generation"] == 2
        assert len(admin.deployments()) == 1
        acts = [a["action"] for a in admin.audit(deployment="canary")]
        assert acts.count("applied") == 2 and "superseded" in acts
