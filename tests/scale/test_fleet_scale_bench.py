"""The scale benchmark itself, small: `benchmarks/fleet_scale.py setup` and `run` as a user runs them (real
Mosquitto with dynamic security, PostgreSQL, two fleet servers, the swarm), at 30 devices and a few
seconds a phase, so what docs/benchmarks.md reports is computed by code that a test has run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, str(REPO / "benchmarks" / "fleet_scale.py")]


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_setup_and_run_report_every_phase(tmp_path: Path, pg: tuple[str, str]) -> None:
    database_url, schema = pg
    work = tmp_path / "bench"
    setup = json.loads(
        _bench(
            "setup",
            "--work",
            str(work),
            "--devices",
            "30",
            "--database-url",
            database_url,
            "--schema",
            schema,
            timeout=180,
        ).stdout
    )
    assert setup["devices"] == 30 and setup["enrol_s"] > 0
    out = tmp_path / "run.json"
    _bench(
        "run", "--work", str(work), "--rate", "150", "--duration", "6", "--phases", "telemetry,read,all,kill,rollback",
        "--kill-rate", "30", "--connect-rate", "100", "--out", str(out),
        timeout=420,
    )  # fmt: skip
    res = json.loads(out.read_text())

    assert res["connect"]["fleet_sees_online"] == 30
    t = res["telemetry"]
    assert t["sent"] == t["acked"] > 600  # 150/s for 6 s, give or take the ramp
    assert t["missing_acked"] == 0
    assert t["commit_lag"]["samples"] >= t["acked"]  # both servers' histograms, every stored message
    cores = t["cpu_cores"]
    assert {"swarm", "server a", "server b", "mosquitto", "postgresql", "machine"} <= cores.keys()
    assert cores["server a"] + cores["server b"] > 0  # ingest used CPU, and it was counted
    assert res["read_side"]["devices_pages"] == 1 and res["read_side"]["overview_p50_ms"] > 0

    assert res["rollout_all"]["counts"] == {"succeeded": 30, "total": 30}
    kill = res["rollout_kill"]
    assert kill["status"] == "completed" and kill["counts"]["succeeded"] == 30
    assert kill["killed"] == res["leader"] and kill["new_leader"] not in (None, kill["killed"])
    assert kill["takeover_s"] < 10
    # The killed server's life before the window is not counted in the window (it was reaped mid-phase).
    # No share can exceed what the whole machine used in the window (the killed server's life before the
    # window, reaped mid-phase, is not counted in it, nor subtracted from "other").
    shares = {k: v for k, v in kill["cpu_cores"].items() if k != "machine"}
    assert max(shares.values()) <= kill["cpu_cores"]["machine"] + 0.02, kill["cpu_cores"]
    back = res["rollback"]
    assert back["name"] == kill["name"] and back["status"] == "rolled_back", back
    assert back["devices_committed"] == 30 and back["fleet_done_after_last_commit_s"] < 10
    assert res["missing_acked_whole_run"] == 0
    assert res["telemetry_table"]["rows"] == res["acked_whole_run"]


@pytest.mark.parametrize(
    ("phases", "says"),
    [("telemtry", "unknown phase(s) telemtry"), ("read,rollback", "add all, waves or kill")],
)
def test_run_refuses_phases_it_cannot_run_before_starting_anything(tmp_path: Path, phases: str, says: str) -> None:
    proc = subprocess.run(
        [*BENCH, "run", "--work", str(tmp_path / "no-setup"), "--phases", phases],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "no-setup").exists()
