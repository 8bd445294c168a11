"""Hypothesis fuzz of the agent's desired-state handler (``Agent._on_desired``, what paho's thread calls
for every message on the desired topic): arbitrary bytes and near-valid JSON.

Invariants, per message: nothing raises out of the handler; a refused document is never queued for the
update worker, leaves state.json byte for byte as it was, and is reported as an ``error`` event whose
``details.reason`` names why (the event itself must serialize: it goes through the real outbox); an
accepted document is for this device and serializes back, and the update worker handles it without
raising (a fetch that fails at once stands in for the network).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.agent.agent import MAX_DESIRED_BYTES, Agent
from device.agent.config import load_config
from device.agent.errors import DownloadError
from manifests import SigningKey, write_keypair
from manifests.mqtt import BundleRef, DesiredState, Event, events_topic

from .fake_link import FakeLink
from .fake_runtime import FakeRuntime

DEVICE = "fuzz-dev"
REASONS = {"schema", "too_large", "not_for_this_device"}


class FailingFetcher:
    """Every fetch fails at once, as a network that is down would (after the retries)."""

    def get_bytes(self, url: str, max_bytes: int) -> bytes:
        raise DownloadError(f"no network for {url}", reason="network")

    def fetch_to(self, url: str, dest: Path, size: int, progress: Any = None) -> None:
        raise DownloadError(f"no network for {url}", reason="network")

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One agent, not running (no threads): the test calls its handler and its worker's step itself."""
    root = tmp_path_factory.mktemp("fuzz-agent")
    _priv, pub = write_keypair(root / "keys", SigningKey.generate())
    config = root / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": DEVICE,
                "mqtt": {"url": "mqtt://127.0.0.1:1"},
                "artifacts": {"base_url": "http://127.0.0.1:1/"},
                "trusted_keys": [str(pub)],
                "data_dir": str(root / "data"),
                "limits": {"disk_margin_bytes": 0},
            }
        )
    )
    a = Agent(load_config(config), runtime=FakeRuntime(), link=FakeLink, fetcher=FailingFetcher())
    a.updater.startup()
    yield a
    a.outbox.close()


def valid_doc(**over: Any) -> dict[str, Any]:
    doc = DesiredState(
        device_id=DEVICE,
        deployment_id="dep-1",
        bundle=BundleRef(name="tiny", version=2, base_url="tiny-2/", manifest_sha256="0" * 64),
        issued_at=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc),
    )
    return {**json.loads(doc.to_bytes()), **over}


# JSON values with what hurts: lone surrogates, huge and negative numbers, deep and wide nesting.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["\ud800", "x\udfffy", "", DEVICE, "nanofleet.desired/1", "../../etc", "a" * 300]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = ["schema", "device_id", "deployment_id", "bundle", "rollback", "issued_at"]
BUNDLE_KEYS = ["name", "version", "manifest_sha256", "base_url"]


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    doc = valid_doc(deployment_id=draw(st.sampled_from(["dep-a", "dep-b", "dep-c"])) + str(draw(st.integers(0, 9))))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "set", "extra", "bundle_set", "bundle_drop"]))
        if op == "drop":
            doc.pop(draw(st.sampled_from(KEYS)), None)
        elif op == "set":
            doc[draw(st.sampled_from(KEYS))] = draw(json_values)
        elif op == "extra":
            doc[draw(st.text(max_size=10))] = draw(json_values)
        elif isinstance(doc.get("bundle"), dict):
            if op == "bundle_set":
                doc["bundle"][draw(st.sampled_from(BUNDLE_KEYS))] = draw(json_values)
            else:
                doc["bundle"].pop(draw(st.sampled_from(BUNDLE_KEYS)), None)
    data = json.dumps(doc).encode()  # ensure_ascii: lone surrogates travel as \\ud800 escapes
    cut = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if cut == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif cut == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    return data


payloads = st.one_of(
    st.binary(max_size=300),
    near_valid(),
    st.just(b"[" * 100_000 + b"]" * 100_000),  # deep nesting
    st.just(json.dumps(valid_doc(device_id="someone-else")).encode()),
    st.just(json.dumps(valid_doc(deployment_id="\ud800")).encode()),
    st.just(json.dumps(valid_doc(padding="x" * MAX_DESIRED_BYTES)).encode()),
)


def drain_events(agent: Agent) -> list[Event]:
    out = []
    while (entry := agent.outbox.peek()) is not None:
        if entry.topic == events_topic(DEVICE):
            out.append(Event.from_bytes(entry.payload))  # each event serialized and parses back
        agent.outbox.ack(entry.id)
    return out


def state_bytes(agent: Agent) -> bytes | None:
    path = agent.layout.state_file
    return path.read_bytes() if path.exists() else None


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(payload=payloads)
def test_desired_handler_never_raises_and_refuses_with_a_reason(agent: Agent, payload: bytes) -> None:
    drain_events(agent)
    before = state_bytes(agent)
    agent._on_desired(payload)  # must not raise, whatever the bytes
    queued = []
    while not agent._desired.empty():
        queued.append(agent._desired.get_nowait())
    events = drain_events(agent)
    if not queued:  # refused at the edge
        assert state_bytes(agent) == before, "a refused desired state changed state.json"
        assert len(events) == 1 and events[0].kind == "error", events
        assert events[0].details["reason"] in REASONS and "desired state refused" in events[0].message
        return
    (desired,) = queued
    assert not events and desired.device_id == DEVICE
    desired.to_bytes()
    # The worker's step: it handles what the edge let through without raising (a failed fetch is a
    # Failed update, recorded like any other).
    outcome = agent.updater.handle_desired(desired)
    assert outcome in ("duplicate", "noop", "failed", "in_service"), outcome
    json.loads(agent.layout.state_file.read_text())  # state.json stays readable


def test_each_refusal_reason_is_reachable(agent: Agent) -> None:
    """The fuzz's reasons, each shown once by a named example."""
    cases = {
        b"\xff\xfe not json": "schema",
        json.dumps(valid_doc(deployment_id="\ud800")).encode(): "schema",
        json.dumps(valid_doc(deployment_id="d" * 300)).encode(): "schema",
        json.dumps(valid_doc(device_id="someone-else")).encode(): "not_for_this_device",
        json.dumps(valid_doc(padding="x" * MAX_DESIRED_BYTES)).encode(): "too_large",
    }
    for payload, reason in cases.items():
        drain_events(agent)
        before = state_bytes(agent)
        agent._on_desired(payload)
        assert agent._desired.empty() and state_bytes(agent) == before
        (event,) = drain_events(agent)
        assert event.details["reason"] == reason, (payload[:60], event.message)
