"""The README's "Next steps", as a new user follows them, with real processes: `nanofleet demo --keep`,
then the printed enrolment command for one more board, its agent, the example canary deployment rolled out
to it, a question to it, and `nanofleet demo --stop`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fleet.client import FleetClient

from .conftest import REPO, nanofleet

README = (REPO / "README.md").read_text()


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "nanofleet", command
    return words[1:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower()


def test_the_readme_steps_in_order() -> None:
    """Each command the test runs is the one the README tells the user to run."""
    steps = README[README.index("## Next steps") : README.index("## Architecture")]
    for expected in (
        "nanofleet demo --keep",
        "nanofleet device enroll --fleet",
        "nanofleet device run --config .cache/demo/run/boards/board-1/agent.yaml",
        "nanofleet fleet apply manifests/examples/deployment-canary.yaml --config .cache/demo/run/fleet.yaml --watch",
        "nanofleet demo --stop",
        "TinyLlama",
    ):
        assert expected in steps, expected


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_from_demo_keep_to_a_second_board_updated_by_a_rollout(
    tmp_path: Path, default_bundle: tuple[Path, Path]
) -> None:
    bundle, pub = default_bundle
    work = tmp_path / "demo"
    # Seed the demo's cache with the shared test bundle (and its key), as tests/fleet/test_demo.py does.
    shutil.copytree(pub.parent, work / "keys")
    shutil.copytree(bundle, work / "bundles" / "v1")
    demo = nanofleet("demo", "--devices", "1", "--keep", "--json", "--work-dir", str(work), timeout=1200)
    assert demo.returncode == 0, demo.stderr[-5000:]
    kept = json.loads(demo.stdout)["kept"]
    state = json.loads((work / "run" / "demo.json").read_text())
    board_proc = None
    try:
        # The fleet and its agent are still there after the demo exited.
        assert all(_alive(p) for p in state["pids"]), state
        token = Path(kept["admin_token_file"]).read_text().strip()
        assert httpx.get(kept["dashboard_url"], timeout=10, follow_redirects=True).status_code == 200
        with FleetClient(kept["fleet_url"], token) as admin:
            assert [d["id"] for d in admin.devices()] == ["demo-0"]

        # 2. One more board, with the printed command (its one-time token included).
        enrolled = nanofleet(*_argv(kept["enroll_command"]), "--json")
        assert enrolled.returncode == 0, enrolled.stderr
        board = json.loads(enrolled.stdout)
        assert board["next"].startswith("nanofleet device run --config ")
        assert board["next"].endswith("boards/board-1/agent.yaml") and kept["run_command"].endswith(
            "boards/board-1/agent.yaml"
        )
        # Running it again does not break the enrolment (the token is spent, the folder enrolled).
        again = nanofleet(*_argv(kept["enroll_command"]))
        assert again.returncode == 1 and len(again.lines) == 1 and "already" in again.lines[0], again.lines
        log = open(tmp_path / "board.log", "wb")  # noqa: SIM115
        board_proc = subprocess.Popen(
            [sys.executable, "-m", "nanofleet.cli", *_argv(kept["run_command"])],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log.close()

        # 3. The example canary deployment, as printed: it selects the new board only, and updates it.
        apply = nanofleet(*_argv(kept["apply_command"]), timeout=600)
        assert apply.returncode == 0, (apply.stdout[-3000:], apply.stderr[-3000:])
        assert "smollm2-canary created" in apply.stdout and "completed" in apply.stdout, apply.stdout[-3000:]
        with FleetClient(kept["fleet_url"], token) as admin:
            devices = {d["id"]: d for d in admin.devices()}
            dep = admin.deployment("smollm2-canary")
        assert dep["status"] == "completed" and [t["device_id"] for t in dep["targets"]] == [board["device_id"]]
        assert devices[board["device_id"]]["model"] == "smollm2-135m-instruct-int8@1"
        assert devices["demo-0"]["model"] == "smollm2-135m-instruct-int8@2"  # untouched: not tagged site=lab

        # 4. Ask it, as the README shows.
        api_token = (Path(board["config"]).parent / "api.token").read_text().strip()
        r = httpx.post(
            f"{board['api']}/v1/chat/completions",
            headers={"Authorization": f"Bearer {api_token}"},
            json={
                "model": "smollm2-135m-instruct-int8",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 24,
                "temperature": 0,
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert "paris" in r.json()["choices"][0]["message"]["content"].lower()
    finally:
        # 6. Stop everything: the demo's processes and the board started from its run folder.
        stop = nanofleet("demo", "--stop", "--work-dir", str(work), timeout=120)
        if board_proc is not None:
            try:
                board_proc.wait(30)
            except subprocess.TimeoutExpired:
                board_proc.send_signal(signal.SIGKILL)
                board_proc.wait()
    assert stop.returncode == 0, stop.stderr
    assert board_proc.returncode is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in state["pids"]):
        time.sleep(0.2)
    assert not any(_alive(p) for p in state["pids"])
    assert not (work / "run").exists()
    # Stopping again says so and succeeds.
    assert nanofleet("demo", "--stop", "--work-dir", str(work)).returncode == 0
