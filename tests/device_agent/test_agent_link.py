"""The Agent itself, in process, over a fake broker link (fake_link.py) and the fake runtime: desired state
in, update worker, reported state and the outbox out, the status file, extensions, a clean stop."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from device.agent.agent import Agent
from device.agent.config import load_config
from manifests import SigningKey, write_keypair
from manifests.mqtt import DesiredState, Event, ReportedState, events_topic, telemetry_topic

from .fake_link import FakeLink
from .fake_runtime import FakeRuntime
from .helpers import ArtifactServer, make_bundle, ref_for
from .procs import wait_for

DEVICE = "link-dev"


class Recorder:
    """An extension that notes when the agent starts and stops it."""

    def __init__(self, agent: Agent, log: list[str]) -> None:
        self.agent, self.log = agent, log

    def start(self) -> None:
        self.log.append("start")

    def stop(self) -> None:
        self.log.append("stop")


@pytest.fixture
def running(
    tmp_path: Path, release_key: SigningKey, artifacts: ArtifactServer
) -> Iterator[tuple[Agent, FakeLink, list[str], list[int]]]:
    _priv, pub = write_keypair(tmp_path / "keys", release_key)
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": DEVICE,
                "mqtt": {"url": "mqtt://127.0.0.1:1"},  # never dialled: the link is a fake
                "artifacts": {"base_url": artifacts.url},
                "trusted_keys": [str(pub)],
                "data_dir": str(tmp_path / "data"),
                "telemetry": {"interval_s": 0.2},
                "limits": {"disk_margin_bytes": 0},
            }
        )
    )
    log: list[str] = []
    agent = Agent(
        load_config(config),
        runtime=FakeRuntime(),
        link=FakeLink,
        extensions=[lambda a: Recorder(a, log)],
    )
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(agent.run()), daemon=True)
    thread.start()
    assert isinstance(agent.link, FakeLink)
    yield agent, agent.link, log, codes
    agent.stop()
    thread.join(30)


def _reported(link: FakeLink) -> list[ReportedState]:
    return [ReportedState.from_bytes(p) for p in list(link.reported)]


def _events(link: FakeLink) -> list[Event]:
    return [Event.from_bytes(p) for t, p in list(link.sent) if t == events_topic(DEVICE)]


def test_a_desired_bundle_is_installed_and_reported(
    running: tuple[Agent, FakeLink, list[str], list[int]], release_key: SigningKey, artifacts: ArtifactServer
) -> None:
    agent, link, log, _codes = running
    wait_for(lambda: link.started and log == ["start"], what="link and extension started")
    first = _reported(link)[0]
    assert first.device_id == DEVICE and first.state == "idle" and first.committed is None

    bundle = make_bundle(artifacts.root / "tiny-1", release_key, version=1)
    desired = DesiredState(
        device_id=DEVICE,
        deployment_id="dep-1",
        bundle=ref_for(bundle, "tiny-1/"),
        issued_at=dt.datetime.now(dt.timezone.utc),
    )
    link.deliver(desired.to_bytes())
    last = wait_for(
        lambda: next((r for r in reversed(_reported(link)) if r.state == "committed"), None),
        what="a committed reported state",
    )
    assert last.deployment_id == "dep-1" and last.committed is not None
    assert (last.committed.name, last.committed.version) == ("tiny", 1)
    assert last.last_result == "committed" and last.agent_version == agent.version
    # Every transition went through the table, in order, and each was reported as it happened.
    states = [r.state.value for r in _reported(link)]
    assert states[-5:] == ["downloading", "verifying", "installing", "activating", "committed"]
    wait_for(lambda: any(e.kind == "result" for e in _events(link)), what="the result event")
    transitions = [(e.from_state, e.to_state) for e in _events(link) if e.kind == "transition"]
    assert transitions[0] == ("idle", "downloading") and transitions[-1] == ("activating", "committed")
    seqs = [e.seq for e in _events(link)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    wait_for(lambda: telemetry_topic(DEVICE) in link.topics(), what="telemetry through the outbox")

    status: dict[str, Any] = wait_for(
        lambda: (s := json.loads(agent.layout.status_file.read_text()))["serving"] and s,
        what="the status file names the served model",
    )
    assert status["broker_connected"] is True and status["serving"]["version"] == 1


def test_a_bad_payload_is_an_error_event_and_changes_nothing(
    running: tuple[Agent, FakeLink, list[str], list[int]],
) -> None:
    agent, link, _log, _codes = running
    wait_for(lambda: link.started, what="link started")
    link.deliver(b'{"device_id": "link-dev", "deployment_id": 5}')
    err = wait_for(
        lambda: next((e for e in _events(link) if e.kind == "error"), None), what="an error event"
    )
    assert err.details["reason"] == "schema" and "desired state refused" in err.message
    assert agent.updater.snapshot().state.value == "idle"


def test_stop_ends_run_cleanly(running: tuple[Agent, FakeLink, list[str], list[int]]) -> None:
    agent, link, log, codes = running
    wait_for(lambda: log == ["start"], what="extension started")
    agent.stop()
    wait_for(lambda: codes, what="run() returned")
    assert codes == [0] and link.stopped and log == ["start", "stop"]
