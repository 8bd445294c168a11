"""The REST API's edge against hostile input (issue 15 items 3, 5 and 8), on a real running service: every
string valid Unicode, every size capped, the broker's reserved names refused; and the admin API keeps
answering afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet.client import FleetClient
from fleet.config import FleetConfig
from fleet.server import ServerThread


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, signing) -> Iterator[ServerThread]:
    data: Path = tmp_path_factory.mktemp("api-input")
    server = ServerThread(FleetConfig(data_dir=data, port=0, trusted_keys=[signing[1]])).start()
    yield server
    server.stop()


@pytest.fixture
def api(fleet: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.svc.admin_token}"}, timeout=60
    ) as c:
        yield c


def token(api: httpx.Client, uses: int = 5) -> str:
    r = api.post("/api/v1/enrollment-tokens", json={"uses": uses})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def raw_json(api: httpx.Client, method: str, path: str, text: str) -> httpx.Response:
    """Send ``text`` as the JSON body exactly as written (escapes included)."""
    return api.request(method, path, content=text.encode(), headers={"content-type": "application/json"})


def reads_still_work(api: httpx.Client) -> None:
    for path in ("/api/v1/devices", "/api/v1/deployments", "/api/v1/audit", "/api/v1/status"):
        r = api.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])


def test_unpaired_surrogates_are_refused_everywhere(api: httpx.Client) -> None:
    """Item 3: "\\ud800" in a tag, a PATCH or a deployment's description was stored (201) and made the
    device, deployment and audit lists answer 500 for good."""
    t = token(api)
    r = raw_json(
        api,
        "POST",
        "/api/v1/enroll",
        json.dumps({"token": t, "device_id": "sur-1"})[:-1] + ', "tags": {"x": "\\ud800"}}',
    )
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == "validation" and "surrogate" in r.json()["detail"]
    r = api.post("/api/v1/enroll", json={"token": t, "device_id": "sur-1", "tags": {"x": "ok \U0001f600"}})
    assert r.status_code == 201, r.text  # a paired surrogate (an emoji) is fine
    for body in ('{"tags": {"note": "\\udfff"}}', '{"groups": ["\\ud83d"]}', '{"hardware_class": "pi\\u0000"}'):
        r = raw_json(api, "PATCH", "/api/v1/devices/sur-1", body)
        assert r.status_code == 422, (body, r.text)
    manifest = (
        '{"apiVersion": "nanofleet/v1", "kind": "Deployment", "metadata": {"name": "sur", "description": "\\ud800"},'
        ' "spec": {"bundle": {"name": "none", "version": 1}}}'
    )
    r = raw_json(api, "POST", "/api/v1/deployments", manifest)
    assert r.status_code == 422 and "metadata.description" in r.json()["detail"], r.text
    reads_still_work(api)
    assert api.get("/api/v1/devices/sur-1").json()["tags"] == {"x": "ok \U0001f600"}


def test_sizes_are_capped(api: httpx.Client) -> None:
    """Item 5: a 5 MB tag value, 1,000 groups and a 20 MB PATCH were all accepted."""
    t = token(api)
    r = api.post("/api/v1/enroll", json={"token": t, "device_id": "cap-1", "tags": {"v": "x" * 5_000_000}})
    assert r.status_code == 413 and r.json()["reason"] == "too_large"
    r = api.post("/api/v1/enroll", json={"token": t, "device_id": "cap-1", "tags": {"v": "x" * 1000}})
    assert r.status_code == 422
    r = api.post("/api/v1/enroll", json={"token": t, "device_id": "cap-1", "groups": [f"g{i}" for i in range(1000)]})
    assert r.status_code == 422
    r = api.post("/api/v1/enroll", json={"token": t, "device_id": "cap-1", "tags": {f"k{i}": "v" for i in range(65)}})
    assert r.status_code == 422
    r = api.post("/api/v1/enroll", json={"token": t, "device_id": "cap-1", "tags": {"bad key!": "v"}})
    assert r.status_code == 422
    r = api.post("/api/v1/enroll", json={"token": t, "device_id": "cap-1", "tags": {"site": "lab"}})
    assert r.status_code == 201
    r = api.patch("/api/v1/devices/cap-1", json={"tags": {"v": "y" * 20_000_000}})
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: capped while it streams in
        yield b'{"tags": {"v": "'
        for _ in range(300):
            yield b"z" * 10_000
        yield b'"}}'

    r = api.patch("/api/v1/devices/cap-1", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert api.get("/api/v1/devices/cap-1").json()["tags"] == {"site": "lab"}
    reads_still_work(api)


@pytest.mark.parametrize("device_id", ["nanofleet-fleet", "NanoFleet-fleet", "nanofleet-agent-x", "nanofleet"])
def test_the_fleets_reserved_names_are_not_device_ids(api: httpx.Client, fleet: ServerThread, device_id: str) -> None:
    """Item 8: enrolment handed out credentials for the broker's own service name."""
    with FleetClient(fleet.url) as anon:
        r = anon.http.post("/api/v1/enroll", json={"token": token(api, 1), "device_id": device_id})
    assert r.status_code == 422, r.text
    assert "reserved" in r.json()["detail"]
    assert fleet.svc.authenticate(device_id, "anything") is False
