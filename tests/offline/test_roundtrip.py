"""The field procedure end to end, every step a real process, a folder standing in for the stick:
fleet exports an update → an agent with no broker picks it up and installs it → it exports its telemetry
→ the fleet imports it → the rollout shows the device updated, with its telemetry; nothing twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from manifests import SigningKey
from manifests.offline.format import PACKAGE_DOC, TELEMETRY_SUFFIX

from .conftest import Board, FleetProc, wait_for

pytestmark = pytest.mark.slow  # several real processes


def test_round_trip_through_a_stick(
    tmp_path: Path, fleet: FleetProc, bundles: dict[int, Path], release_key: tuple[SigningKey, Path]
) -> None:
    media = tmp_path / "media"  # the agent watches it; "plugging the stick in" = a folder appearing there
    media.mkdir()
    token = fleet.enroll("field-1", data_dir=tmp_path / "board" / "data")
    # The board trusts the release key (bundles) and the fleet key (package documents, rollbacks).
    board = Board(
        tmp_path / "board",
        "field-1",
        token,
        [release_key[1], fleet.fleet_pub],
        watch=[media],
        bootstrap=bundles[1],
    )
    board.run()
    try:
        wait_for(
            lambda: board.state().get("state") == "committed" and board.state().get("active_slot"),
            30,
            "the bootstrap bundle to commit",
        )

        # 1. The fleet exports the update for this deployment onto the stick (the office side).
        fleet.deploy("field-v2", 2, ["field-1"])
        stick = tmp_path / "stick"
        res = fleet.fleet_json("export-update", "--deployment", "field-v2", "--out", str(stick))
        pkg = Path(res["path"])
        assert res["devices"] == ["field-1"] and (pkg / PACKAGE_DOC).is_file()
        assert [p.name for p in stick.iterdir()] == [pkg.name]  # no temp folder left behind
        command = json.loads((pkg / PACKAGE_DOC).read_text())["payload"]["targets"]["field-1"]["command_id"]
        with fleet.admin() as c:  # the fleet lists the board as served by a stick, not yet back
            row = next(r for r in c.offline_devices() if r["device_id"] == "field-1")
        assert row["last_package"] == res["package_id"] and row["last_import"] is None

        # 2. The stick is plugged into the board: the running agent (no broker) picks it up and installs.
        (stick).rename(media / "stick")
        wait_for(
            lambda: (
                board.state().get("deployment_id") == command and board.state().get("state") == "committed"
            ),
            60,
            "the offline install to commit",
        )
        st = board.state()
        assert st["slots"][st["active_slot"]]["version"] == 2
        assert st["highest_committed"] == {"tiny": 2}
        # ...and wrote its telemetry back onto the same stick after the install.
        exported = wait_for(
            lambda: sorted((media / "stick").glob(f"*{TELEMETRY_SUFFIX}")),
            30,
            "the automatic telemetry export",
        )
        # 3. A second, manual export (the operator's command) carries what was queued since.
        wait_for(lambda: board.outbox_len() > 0, 10, "new telemetry in the queue")
        res = board.device_json("export-telemetry", "--out", str(media / "stick"))
        assert res["telemetry"] >= 1 and res["reported_state"] == "committed"
        assert len(list((media / "stick").glob(f"*{TELEMETRY_SUFFIX}"))) == len(exported) + 1
    finally:
        board.stop()
    # Exported entries left the queue: once online again, nothing of them is sent twice.
    remaining = board.outbox_len()

    # 4. The fleet imports the stick.
    res = fleet.fleet_json("import-telemetry", str(media / "stick"))
    assert res["ok"] and len(res["files"]) == len(exported) + 1
    assert sum(f["telemetry"] for f in res["files"]) >= 2
    assert sum(f["events"] for f in res["files"]) >= 5  # transitions + the result of the install
    assert all(not f["duplicate"] for f in res["files"])

    # 5. The rollout shows the device as updated, with its telemetry.
    def succeeded() -> bool:
        d = fleet.deployment("field-v2")
        return d["status"] == "completed" and d["targets"][0]["state"] == "succeeded"

    wait_for(succeeded, 20, "the rollout to count the device")
    with fleet.admin() as c:
        dev = c.device("field-1")
        assert dev["model"] == "tiny@2"
        samples = c.telemetry("field-1")
        assert samples, "the imported telemetry is in the fleet"
    offline = fleet.fleet_json("offline-devices")
    row = next(r for r in offline if r["device_id"] == "field-1")
    assert row["last_import"] and row["imports"] == len(exported) + 1 and row["model"] == "tiny@2"

    # Importing the same stick again ingests nothing twice.
    again = fleet.fleet_json("import-telemetry", str(media / "stick"))
    assert again["ok"] and all(f["duplicate"] and f["telemetry"] == 0 for f in again["files"])
    with fleet.admin() as c:
        assert len(c.telemetry("field-1", limit=1000)) == len(samples)
    assert remaining < 50
