"""Rollouts end to end: the real service, real HTTP, simulated devices over a real broker."""

from __future__ import annotations

from fleet.client import FleetClient

from .conftest import BUNDLE, wait_for


def upload(admin: FleetClient, bundles: dict, *versions: int) -> None:
    for v in versions:
        admin.upload_bundle(bundles[v])


def manifest(
    name: str, version: int, strategy: dict, abort: dict | None = None, selector: dict | None = None
) -> dict:
    return {
        "apiVersion": "nanofleet/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "bundle": {"name": BUNDLE, "version": version},
            "selector": selector or {},
            "strategy": strategy,
            "abort": abort or {},
        },
    }


def status_of(admin: FleetClient, name: str) -> str:
    return admin.deployment(name)["status"]


def test_all_at_once_embedded_broker(make_fleet, bundles) -> None:
    fleet = make_fleet()
    devs = fleet.enroll(3)
    with fleet.admin() as admin:
        upload(admin, bundles, 1)
        r = admin.apply(manifest("first", 1, {"type": "all-at-once"}))
        assert r["result"] == "created"
        wait_for(lambda: status_of(admin, "first") == "completed", what="completed")
        assert all(d.current == (BUNDLE, 1) for d in devs)
        # Idempotent apply.
        assert admin.apply(manifest("first", 1, {"type": "all-at-once"}))["result"] == "unchanged"
        assert {d["model"] for d in admin.devices()} == {f"{BUNDLE}@1"}
