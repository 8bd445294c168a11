"""Bundles served from somewhere other than the fleet's API (``artifacts_base_url``): a plain nginx over the
blob store directory, and an S3-compatible object store (moto's server, a real HTTP S3 endpoint). The
fleet publishes each rolled-out bundle in the store's ``bundles/<name>/<version>/`` layout; devices fetch
the signed manifest and ranged file halves from there, verify them, and commit; the fleet's own artifact
route serves none of it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.fleet_scale import free_port, wait_port
from manifests import TrustStore
from tests.fleet.simdevice import SimDevice

from .conftest import Cluster, manifest, metric, wait_for

pytestmark = pytest.mark.slow
BUNDLE_ROUTE = "/bundles/{name}/{version}/{path:path}"


def nginx_bin() -> str:
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(path).exists():
        pytest.fail("nginx is not installed: run `make test` (scripts/ensure_services.sh installs it)")
    return path


@pytest.fixture
def nginx(cluster: Cluster) -> Iterator[tuple[str, Path]]:
    """nginx serving the cluster's blob directory at /; returns (base URL, access log)."""
    work = cluster.work / "nginx"
    work.mkdir()
    cluster.blobs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        f"""
user root;
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp;
    fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp;
    scgi_temp_path {work}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {cluster.blobs};
        location /bundles/ {{ }}
    }}
}}
"""
    )
    (work / "tmp").mkdir()
    with open(work / "stderr", "wb") as err:
        proc = subprocess.Popen([nginx_bin(), "-c", str(conf), "-p", str(work)], stderr=err)
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}/bundles", work / "access.log"
    finally:
        proc.terminate()
        proc.wait(10)


def roll_out(cluster: Cluster, artifacts_base_url: str, bundle: Path, **server: object) -> list[SimDevice]:
    srv = cluster.server("only", shared=False, artifacts_base_url=artifacts_base_url, **server)
    cluster.upload(bundle)
    devices = []
    for login in cluster.enrol(2, prefix="art"):
        d = SimDevice(
            login.device_id,
            cluster.broker.url,
            username=login.username,
            password=login.password,
            bundle_trust=TrustStore.from_paths([cluster.release_pub]),
            fleet_trust=TrustStore.from_paths([cluster.fleet_pub]),
        )
        devices.append(d.start())
    try:
        with cluster.admin(srv) as api:
            assert api.post("/api/v1/deployments", json=manifest("elsewhere", 1)).status_code == 201
            dep = wait_for(
                lambda: (x := api.get("/api/v1/deployments/elsewhere").json())["status"] == "completed" and x,
                60,
                what=f"the rollout through {artifacts_base_url}",
            )
        assert dep["counts"].get("succeeded") == 2, (dep["counts"], [d.results for d in devices])
        for d in devices:
            assert d.results[-1][1] == "committed" and d.current == ("tiny-model", 1)
            desired = httpx.get(
                f"{srv.url}/api/v1/devices/{d.id}/desired", headers={"Authorization": f"Bearer {cluster.admin_token}"}
            ).json()
            assert desired["bundle"]["base_url"] == f"{artifacts_base_url}/tiny-model/1"
        # Nothing came from the fleet's own artifact route.
        assert metric(srv.url, "nanofleet_api_request_duration_seconds_count", route=BUNDLE_ROUTE) == 0
    finally:
        for d in devices:
            d.stop()
    return devices


def test_rollout_through_nginx_over_the_blob_directory(cluster: Cluster, bundles, nginx) -> None:
    base, access_log = nginx
    roll_out(cluster, base, bundles[1])
    log = access_log.read_text()
    assert "GET /bundles/tiny-model/1/manifest.yaml HTTP/1.1\" 200" in log
    assert "GET /bundles/tiny-model/1/manifest.sig HTTP/1.1\" 200" in log
    assert log.count("GET /bundles/tiny-model/1/model.onnx HTTP/1.1\" 206") == 4  # two halves, two devices


@pytest.fixture
def s3() -> Iterator[str]:
    """A real S3-compatible HTTP endpoint: moto's server, on a free port."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        pytest.fail("boto3 and moto[server] are dev dependencies: pip install -e '.[dev]'")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_rollout_from_an_s3_bucket(cluster: Cluster, bundles, s3: str) -> None:
    import boto3

    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=s3, **creds).create_bucket(Bucket="fleet-blobs")
    s3_cfg = {
        "bucket": "fleet-blobs",
        "prefix": "prod/",
        "endpoint_url": s3,
        "region": "us-east-1",
        "access_key_id": "test",
        "secret_access_key": "test",
        "public_read": True,
    }
    roll_out(cluster, f"{s3}/fleet-blobs/prod/bundles", bundles[1], blobs={"s3": s3_cfg})
    listing = boto3.client("s3", endpoint_url=s3, **creds).list_objects_v2(Bucket="fleet-blobs")
    keys = {o["Key"] for o in listing["Contents"]}
    assert "prod/bundles/tiny-model/1/manifest.yaml" in keys
    assert any(k.startswith("prod/blobs/") for k in keys)
    # The fleet's own route still serves the files, from its checked local cache of the bucket.
    srv = cluster.servers["only"]
    body = httpx.get(f"{srv.url}/bundles/tiny-model/1/model.onnx").raise_for_status().content
    assert body == (bundles[1] / "model.onnx").read_bytes()
