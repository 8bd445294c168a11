"""A small typed client for the fleet's REST API (used by the CLI, the demo and the tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from manifests import MANIFEST_NAME, SIGNATURE_NAME, read_manifest_unverified
from manifests.adapter import is_adapter_manifest, read_adapter_manifest_unverified

from .errors import FleetError


class FleetAPIError(FleetError):
    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("detail") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {detail}")
        self.status_code = status
        self.body = body
        self.reason = (body.get("reason") if isinstance(body, dict) else None) or "http"


class FleetClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """Any API call: the decoded JSON answer (None for 204); FleetAPIError for a 4xx/5xx, FleetError
        when the service cannot be reached."""
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise FleetError(f"cannot reach the fleet service at {self.url}: {exc}") from exc
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise FleetAPIError(r.status_code, body)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    # devices
    def enrollment_token(self, **kw: Any) -> dict[str, Any]:
        return self.request("POST", "/api/v1/enrollment-tokens", json=kw)

    def enroll(self, token: str, **kw: Any) -> dict[str, Any]:
        return self.request("POST", "/api/v1/enroll", json={"token": token, **kw})

    def devices(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/devices")

    def device(self, device_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/devices/{device_id}")

    def telemetry(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/v1/devices/{device_id}/telemetry", params={"limit": limit})

    # models
    def upload_bundle(self, bundle_dir: str | Path) -> dict[str, Any]:
        root = Path(bundle_dir)
        body = (root / MANIFEST_NAME).read_bytes() if (root / MANIFEST_NAME).is_file() else b""
        # an adapter bundle (nanofleet export-adapter) is pushed the same way: its own manifest lists its files
        read = read_adapter_manifest_unverified if is_adapter_manifest(body) else read_manifest_unverified
        manifest = read(root)
        paths = [MANIFEST_NAME, SIGNATURE_NAME, *(f.path for f in manifest.files)]
        handles = [(p, open(root / p, "rb")) for p in paths]  # noqa: SIM115 - closed below
        try:
            files = [("files", (p, fh, "application/octet-stream")) for p, fh in handles]
            return self.request("POST", "/api/v1/models", files=files)
        finally:
            for _, fh in handles:
                fh.close()

    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/models")

    def model(self, name: str, version: int) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/models/{name}/{version}")

    def delete_model(self, name: str, version: int) -> None:
        self.request("DELETE", f"/api/v1/models/{name}/{version}")

    # releases
    def create_release(self, release: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/v1/releases", json=release)

    def releases(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/releases")

    def release(self, name: str, version: int) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/releases/{name}/{version}")

    # deployments
    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/v1/deployments", json=manifest)

    def deployments(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/deployments")

    def deployment(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/deployments/{name}")

    def control(self, name: str, action: str) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/deployments/{name}/{action}")

    def audit(self, deployment: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if deployment:
            params["deployment"] = deployment
        return self.request("GET", "/api/v1/audit", params=params)

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/api/v1/status")

    # offline media
    def offline_package(self, deployment: str, **request: Any) -> dict[str, Any]:
        """The signed package document (``dry_run=True``: only the devices and size it would take)."""
        return self.request("POST", f"/api/v1/deployments/{deployment}/offline-package", json=request)

    def import_telemetry(self, data: bytes) -> dict[str, Any]:
        """Import one telemetry export file (its raw bytes)."""
        return self.request(
            "POST",
            "/api/v1/offline/telemetry",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def offline_devices(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/v1/offline/devices")
