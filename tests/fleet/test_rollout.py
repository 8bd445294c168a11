"""Rollouts end to end: the real service, real HTTP, simulated devices over a real broker."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_all_at_once_then_manual_rollback(request, make_fleet, bundles, db) -> None:
    if db == "postgres":
        url, schema = request.getfixturevalue("pg_schema")
        fleet = make_fleet(database_url=url, schema=schema)
    else:
        fleet = make_fleet()
    devs = fleet.enroll(3, telemetry_s=5)
    with fleet.admin() as admin:
        upload(admin, bundles, 1, 2)
        r = admin.apply(manifest("first", 1, {"type": "all-at-once"}))
        assert r["result"] == "created"
        wait_for(lambda: status_of(admin, "first") == "completed", what="completed")
        assert all(d.current == (BUNDLE, 1) for d in devs)
        # Idempotent apply.
        assert admin.apply(manifest("first", 1, {"type": "all-at-once"}))["result"] == "unchanged"
        assert {d["model"] for d in admin.devices()} == {f"{BUNDLE}@1"}
        admin.apply(manifest("second", 2, {"type": "all-at-once"}))
        wait_for(lambda: status_of(admin, "second") == "completed", what="v2 completed")
        admin.control("second", "rollback")
        wait_for(lambda: status_of(admin, "second") == "rolled_back", what="rolled back")
        assert all(d.current == (BUNDLE, 1) and d.highest == 2 for d in devs)
        assert {d["model"] for d in admin.devices()} == {f"{BUNDLE}@1"}


def baseline_v1(fleet, admin: FleetClient, bundles: dict, name: str = "base") -> None:
    upload(admin, bundles, 1, 2, 3)
    admin.apply(manifest(name, 1, {"type": "all-at-once"}))
    wait_for(lambda: status_of(admin, name) == "completed", 30, what=f"{name} completed")


def max_in_flight(admin: FleetClient, name: str) -> int:
    running = peak = 0
    for a in sorted(admin.audit(deployment=name, limit=1000), key=lambda a: a["id"]):
        if a["action"] == "device_started":
            running += 1
            peak = max(peak, running)
        elif a["action"] in ("device_succeeded", "device_failed"):
            running -= 1
    return peak


def wave_of_each_start(admin: FleetClient, name: str) -> list[tuple[str, int]]:
    rows = sorted(admin.audit(deployment=name, limit=1000), key=lambda a: a["id"])
    # The audit log counts waves from 1 (as the dashboard does); the deployment's fields count from 0.
    return [(a["device_id"], a["details"]["wave"] - 1) for a in rows if a["action"] == "device_started"]


@pytest.mark.mosquitto
def test_canary_then_waves_over_mosquitto(make_fleet, bundles, mosquitto) -> None:
    fleet = make_fleet(broker_url=mosquitto.url)
    devs = fleet.enroll(6, tags={"site": "lab"}, telemetry_s=1.0)
    with fleet.admin() as admin:
        baseline_v1(fleet, admin, bundles)

        # Canary: one device first; nobody else starts until it converged and soaked.
        admin.apply(
            manifest(
                "canary-v2",
                2,
                {"type": "canary", "canary": {"devices": 1}, "wait_seconds": 1},
                selector={"tags": {"site": "lab"}},
            )
        )
        wait_for(lambda: status_of(admin, "canary-v2") == "completed", 40, what="canary completed")
        starts = wave_of_each_start(admin, "canary-v2")
        assert [w for _, w in starts] == [0, 1, 1, 1, 1, 1]
        rows = sorted(admin.audit(deployment="canary-v2", limit=1000), key=lambda a: a["id"])
        actions = [a["action"] for a in rows]
        first_ok = actions.index("device_succeeded")
        assert actions.index("wave_converged") > first_ok
        before_wave2 = actions[: actions.index("wave_started")]
        assert before_wave2.count("device_started") == 1
        assert all(d.current == (BUNDLE, 2) for d in devs)

        # Waves by percentage with a cap on devices in flight.
        admin.apply(
            manifest(
                "waves-v3",
                3,
                {"type": "waves", "waves": {"percent_steps": [20, 50, 100]}, "max_in_flight": 2},
            )
        )
        wait_for(lambda: status_of(admin, "waves-v3") == "completed", 40, what="waves completed")
        waves = [w for _, w in wave_of_each_start(admin, "waves-v3")]
        assert waves == [0, 0, 1, 2, 2, 2]  # cumulative 20/50/100% of 6 devices: 2, then 3, then 6
        assert max_in_flight(admin, "waves-v3") <= 2
        assert all(d.current == (BUNDLE, 3) for d in devs)
        dep = admin.deployment("waves-v3")
        assert {t["previous"] for t in dep["targets"]} == {f"{BUNDLE}@2"}
        assert {d["model"] for d in admin.devices()} == {f"{BUNDLE}@3"}


@pytest.mark.mosquitto
def test_abort_on_failure_rate_rolls_back_with_a_signed_rollback(make_fleet, bundles, mosquitto) -> None:
    fleet = make_fleet(broker_url=mosquitto.url)
    devs = fleet.enroll(4, telemetry_s=2.0)
    with fleet.admin() as admin:
        baseline_v1(fleet, admin, bundles)
        devs[1].behaviour.fail_versions = {2}  # wave 1 = devices 0 and 1: one succeeds, one fails
        admin.apply(
            manifest(
                "bad-v2",
                2,
                {"type": "waves", "waves": {"sizes": [2, 2]}},
                abort={"failure_rate_pct": 50, "min_devices": 2, "on_abort": "rollback"},
            )
        )
        wait_for(lambda: status_of(admin, "bad-v2") == "rolled_back", 40, what="rolled back")
        dep = admin.deployment("bad-v2")
        assert dep["abort_reason"].startswith("failure rate 50%")
        states = {t["device_id"]: t["state"] for t in dep["targets"]}
        assert states == {
            "sim-00": "rolled_back",
            "sim-01": "rolled_back",
            "sim-02": "skipped",
            "sim-03": "skipped",
        }
        # sim-00 had committed v2: only the fleet-signed rollback let it go back below its highest version.
        assert devs[0].current == (BUNDLE, 1) and devs[0].highest == 2
        assert ("bad-v2" in devs[0].results[-1][0]) and devs[0].results[-1][1] == "committed"
        assert all(d.current == (BUNDLE, 1) for d in devs)
        assert devs[2].results == devs[3].results  # never touched by bad-v2
        actions = [a["action"] for a in admin.audit(deployment="bad-v2")]
        assert {"abort", "rollback", "device_failed", "rolled_back"} <= set(actions)


@pytest.mark.mosquitto
def test_abort_on_telemetry_regression_pauses_then_manual_rollback(make_fleet, bundles, mosquitto) -> None:
    fleet = make_fleet(broker_url=mosquitto.url)
    devs = fleet.enroll(3, telemetry_s=0.2)
    for d in devs:
        d.behaviour.decode_tok_s = {1: 100.0, 2: 40.0}  # v2 decodes 60% slower on this hardware
    with fleet.admin() as admin:
        baseline_v1(fleet, admin, bundles)
        wait_for(
            lambda: all(
                (x.get("telemetry") or {}).get("model", {}).get("version") == 1 for x in admin.devices()
            ),
            what="v1 telemetry",
        )
        admin.apply(
            manifest(
                "slow-v2",
                2,
                {"type": "canary", "canary": {"devices": 1}, "wait_seconds": 30},
                abort={"max_decode_drop_pct": 30, "on_abort": "pause"},
            )
        )
        wait_for(lambda: status_of(admin, "slow-v2") == "paused", 30, what="paused on regression")
        dep = admin.deployment("slow-v2")
        assert "decode 40.0 tok/s is 60% below 100.0 tok/s" in dep["abort_reason"]
        canary_target = dep["targets"][0]
        assert canary_target["baseline"]["decode_tok_s"] == pytest.approx(100.0)
        assert canary_target["health"]["decode_drop_pct"] == pytest.approx(60.0)
        assert [t["state"] for t in dep["targets"][1:]] == ["pending", "pending"]
        assert devs[0].current == (BUNDLE, 2) and devs[1].current == (BUNDLE, 1)

        # Manual rollback of a paused deployment.
        admin.control("slow-v2", "rollback")
        wait_for(lambda: status_of(admin, "slow-v2") == "rolled_back", 30, what="manual rollback")
        assert all(d.current == (BUNDLE, 1) for d in devs)
        acts = [(a["actor"], a["action"]) for a in admin.audit(deployment="slow-v2")]
        assert ("rollout", "health_regression") in acts and ("admin", "rollback") in acts


@pytest.mark.mosquitto
def test_convergence_timeout_aborts_and_manual_pause_resume(make_fleet, bundles, mosquitto) -> None:
    fleet = make_fleet(broker_url=mosquitto.url)
    devs = fleet.enroll(2, telemetry_s=5)
    devs[0].behaviour.hang_versions = {2}
    with fleet.admin() as admin:
        baseline_v1(fleet, admin, bundles)
        admin.apply(
            manifest(
                "hang-v2",
                2,
                {"type": "waves", "waves": {"sizes": [1, 1]}},
                abort={"convergence_timeout_s": 4, "on_abort": "pause"},
            )
        )
        wait_for(lambda: status_of(admin, "hang-v2") == "paused", 20, what="timeout abort")
        assert "did not converge within 4s" in admin.deployment("hang-v2")["abort_reason"]
        # Resume retries the device with a fresh command id; this time it works.
        devs[0].behaviour.hang_versions = set()
        admin.control("hang-v2", "resume")
        wait_for(lambda: status_of(admin, "hang-v2") == "completed", 20, what="completed after resume")
        assert all(d.current == (BUNDLE, 2) for d in devs)
        with pytest.raises(Exception) as e:
            admin.control("hang-v2", "pause")
        assert getattr(e.value, "status_code", None) == 409


@pytest.mark.mosquitto
def test_service_sigkill_mid_rollout_continues(tmp_path, bundles, bundle_key, mosquitto) -> None:
    from .conftest import ProcessFleet

    data = tmp_path / "fleet-data"
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(
        f"data_dir: {data}\nport: 0\ntrusted_keys: [{bundle_key[1]}]\ntick_s: 0.1\n"
        f"broker: {{embedded: false, url: '{mosquitto.url}'}}\n"
    )
    fleet = ProcessFleet(cfg, data, bundle_key[1]).start()
    try:
        devs = fleet.enroll(3, telemetry_s=5)
        with fleet.admin() as admin:
            baseline_v1(fleet, admin, bundles)
            admin.apply(
                manifest("v2", 2, {"type": "waves", "waves": {"sizes": [1, 1, 1]}, "wait_seconds": 2})
            )
            wait_for(lambda: devs[0].current == (BUNDLE, 2), 20, what="first wave done")
        fleet.kill()  # SIGKILL: no shutdown code runs
        assert devs[2].current == (BUNDLE, 1)
        fleet.start()
        with fleet.admin() as admin:
            wait_for(lambda: status_of(admin, "v2") == "completed", 40, what="completed after restart")
            assert all(d.current == (BUNDLE, 2) for d in devs)
            waves = [w for _, w in wave_of_each_start(admin, "v2")]
            assert waves == [0, 1, 2]  # each device started once: nothing lost, nothing repeated
    finally:
        fleet.close()


@pytest.mark.mosquitto
def test_broker_restart_mid_rollout_converges(make_fleet, bundles, mosquitto) -> None:
    fleet = make_fleet(broker_url=mosquitto.url)
    devs = fleet.enroll(3, telemetry_s=5)
    with fleet.admin() as admin:
        baseline_v1(fleet, admin, bundles)
        admin.apply(manifest("v2", 2, {"type": "canary", "canary": {"devices": 1}, "wait_seconds": 1.5}))
        wait_for(lambda: devs[0].current == (BUNDLE, 2), 20, what="canary done")
        mosquitto.stop()  # the next wave's desired state is published while the broker is down
        import time

        time.sleep(2.5)
        assert admin.deployment("v2")["wave"] == 1
        mosquitto.start()
        wait_for(lambda: status_of(admin, "v2") == "completed", 40, what="completed after broker restart")
        assert all(d.current == (BUNDLE, 2) for d in devs)
        assert admin.status()["mqtt_connected"]


@pytest.mark.parametrize(
    ("rule", "behaviour", "expect"),
    [
        ({"max_error_rate": 0.2}, {"error_rate": {2: 0.5}}, "error rate 50.00% on the new model"),
        (
            {"ttft_p95_budget_ms": 500},
            {"ttft_p95_ms": {2: 1500.0}},
            "TTFT p95 1500 ms over the 500 ms budget",
        ),
    ],
)
def test_abort_on_error_rate_or_ttft_budget(make_fleet, bundles, rule, behaviour, expect) -> None:
    fleet = make_fleet()  # the embedded broker this time
    devs = fleet.enroll(2, telemetry_s=0.2)
    for d in devs:
        d.behaviour.error_rate = behaviour.get("error_rate", {})
        d.behaviour.ttft_p95_ms = behaviour.get("ttft_p95_ms", {})
    with fleet.admin() as admin:
        baseline_v1(fleet, admin, bundles)
        admin.apply(
            manifest(
                "v2",
                2,
                {"type": "canary", "canary": {"devices": 1}, "wait_seconds": 30},
                abort={**rule, "on_abort": "rollback"},
            )
        )
        wait_for(lambda: status_of(admin, "v2") == "rolled_back", 30, what="abort and rollback")
        assert expect in admin.deployment("v2")["abort_reason"]
        assert all(d.current == (BUNDLE, 1) for d in devs)
        assert devs[1].results[-1][0] != admin.deployment("v2")["id"]  # never started


def test_a_newer_deployment_takes_devices_over(make_fleet, bundles) -> None:
    fleet = make_fleet()
    devs = fleet.enroll(3, telemetry_s=5)
    with fleet.admin() as admin:
        baseline_v1(fleet, admin, bundles)
        # A slow canary of v2 (long soak) is overtaken by v3 to everyone.
        admin.apply(manifest("slow-v2", 2, {"type": "canary", "canary": {"devices": 1}, "wait_seconds": 600}))
        wait_for(lambda: devs[0].current == (BUNDLE, 2), what="v2 canary")
        admin.apply(manifest("v3", 3, {"type": "all-at-once"}))
        wait_for(lambda: status_of(admin, "v3") == "completed", 30, what="v3 completed")
        old = admin.deployment("slow-v2")
        assert [t["state"] for t in old["targets"]] == ["succeeded", "skipped", "skipped"]
        assert old["targets"][1]["error"] == "taken over by deployment v3"
        # Aborting the old one changes nothing on the devices.
        admin.control("slow-v2", "abort")
        assert all(d.current == (BUNDLE, 3) for d in devs)


def test_a_device_enrolled_mid_rollout_joins_the_last_wave(make_fleet, bundles) -> None:
    fleet = make_fleet()
    devs = fleet.enroll(2, tags={"site": "lab"}, telemetry_s=5)
    with fleet.admin() as admin:
        upload(admin, bundles, 1)
        admin.apply(
            manifest(
                "lab",
                1,
                {"type": "waves", "waves": {"sizes": [1, 1]}, "wait_seconds": 2},
                selector={"tags": {"site": "lab"}},
            )
        )
        wait_for(lambda: devs[0].current == (BUNDLE, 1), what="first wave")
        late = fleet.enroll(1, tags={"site": "lab"}, telemetry_s=5, prefix="late")
        fleet.enroll(1, tags={"site": "elsewhere"}, telemetry_s=5, prefix="other")
        wait_for(lambda: status_of(admin, "lab") == "completed", 30, what="completed")
        dep = admin.deployment("lab")
        assert [(t["device_id"], t["wave"], t["state"]) for t in dep["targets"]] == [
            ("sim-00", 0, "succeeded"),
            ("sim-01", 1, "succeeded"),
            ("late-02", 1, "succeeded"),
        ]
        assert late[0].current == (BUNDLE, 1)
        other = fleet.devices[-1]
        assert other.current is None, (other.id, other.topics_seen, admin.device(other.id)["desired"])
