"""The README's "Next steps", as a new user follows them, with real processes: `nanofleet demo --keep`,
then the printed enrolment command for one more board, its agent, the example canary deployment rolled out
to it, a question to it, and `nanofleet demo --stop`."""

from __future__ import annotations

import json
import os
import re
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


def _as_in_readme(printed: str, work: Path) -> str:
    """A command or path demo --keep printed for ``work``, as the README shows it for the default work dir:
    relative paths under .cache/demo, its example one-time token and ports, no --work-dir."""
    text = printed.replace(f" --work-dir {work}", "").replace(str(work), ".cache/demo")
    text = re.sub(r"--token nfe_\S+", "--token nfe_...", text)
    text = re.sub(r"--fleet http://127\.0\.0\.1:\d+", "--fleet http://127.0.0.1:40123", text)
    return re.sub(r"--api-port \d+", "--api-port 40125", text)


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
        # What it printed is what the README says, once the default work dir (.cache/demo) stands for ours
        # and the example token and ports for the real ones.
        for printed in (kept["enroll_command"], kept["run_command"], kept["apply_command"], kept["stop_command"]):
            assert _as_in_readme(printed, work) in README, (printed, _as_in_readme(printed, work))
        assert _as_in_readme(kept["admin_token_file"], work) == ".cache/demo/run/fleet/admin.token"
        assert f"cat {_as_in_readme(kept['admin_token_file'], work)}" in README
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
        # The README's way to see what the registry holds, with the demo's fleet config.
        models = nanofleet("fleet", "models", "--config", kept["fleet_config"])
        assert models.returncode == 0 and "smollm2-135m-instruct-int8" in models.stdout, models.lines
        apply = nanofleet(*_argv(kept["apply_command"]), timeout=600)
        assert apply.returncode == 0, (apply.stdout[-3000:], apply.stderr[-3000:])
        assert "smollm2-canary created" in apply.stdout and "completed" in apply.stdout, apply.stdout[-3000:]
        with FleetClient(kept["fleet_url"], token) as admin:
            devices = {d["id"]: d for d in admin.devices()}
            dep = admin.deployment("smollm2-canary")
        assert dep["status"] == "completed" and [t["device_id"] for t in dep["targets"]] == [board["device_id"]]
        assert devices[board["device_id"]]["model"] == "smollm2-135m-instruct-int8@1"
        assert devices["demo-0"]["model"] == "smollm2-135m-instruct-int8@2"  # untouched: not tagged site=lab

        # 4. Ask it with the README's own curl command (its example port and work dir made ours).
        api_token = (Path(board["config"]).parent / "api.token").read_text().strip()
        curl = re.search(r"curl -s http://127\.0\.0\.1:40125/v1/chat/completions[^`]*", README)
        assert curl, "the README's curl example"
        port = board["api"].rsplit(":", 1)[1]
        command = curl.group(0).replace(":40125/", f":{port}/").replace(".cache/demo", str(work))
        asked = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=180, cwd=REPO)
        assert asked.returncode == 0, asked.stderr
        answer = json.loads(asked.stdout)
        assert "paris" in answer["choices"][0]["message"]["content"].lower(), answer
        # "(`/v1/models` says which version serves)".
        (listed,) = httpx.get(
            f"{board['api']}/v1/models", headers={"Authorization": f"Bearer {api_token}"}, timeout=30
        ).json()["data"]
        assert (listed["id"], listed["version"]) == ("smollm2-135m-instruct-int8", 1), listed
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
