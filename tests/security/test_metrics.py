"""Prometheus /metrics on a running fleet service (issue 15): messages in by kind, drops by reason, refused
logins, ingest lag, worker queue depth, rollout ticks, API latency by route template."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from manifests import mqtt as c
from tests.fleet.conftest import wait_for

from .brokers import BrokerUnderTest, start_embedded
from .conftest import Peer, agent


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, signing) -> Iterator[BrokerUnderTest]:
    b = start_embedded(tmp_path_factory.mktemp("metrics"), signing[1])
    yield b
    b.close()


def samples(fleet: BrokerUnderTest) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{fleet.fleet.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(fleet: BrokerUnderTest, name: str, **labels: str) -> float:
    return samples(fleet).get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_the_service_does(fleet: BrokerUnderTest, peers: list[Peer]) -> None:
    base = samples(fleet)
    assert ("nanofleet_worker_queue_depth", ()) in base
    ticks = base.get(("nanofleet_rollout_ticks_total", ()), 0.0)
    (login,) = fleet.provision(1, prefix="met")
    p = agent(fleet, login, peers)
    now = dt.datetime.now(dt.timezone.utc)
    p.publish(c.telemetry_topic(login.device_id), c.Telemetry(device_id=login.device_id, seq=1, ts=now).to_bytes())
    p.publish(c.telemetry_topic(login.device_id), b"not json")
    p.publish(c.reported_topic(login.device_id), b'{"schema": "nanofleet.reported/1"}')
    bad = Peer(fleet, login.username, "nfd_wrong", f"m-{uuid.uuid4().hex[:4]}")
    peers.append(bad)
    assert not bad.accepted

    def grew(name: str, by: float = 1, **labels: str) -> bool:
        return value(fleet, name, **labels) >= base.get((name, tuple(sorted(labels.items()))), 0.0) + by

    wait_for(lambda: grew("nanofleet_mqtt_messages_total", 2, kind="telemetry"), what="telemetry counted")
    wait_for(lambda: grew("nanofleet_mqtt_dropped_total", reason="encoding"), what="the bad JSON counted")
    wait_for(lambda: grew("nanofleet_mqtt_dropped_total", reason="schema"), what="the bad reported counted")
    assert grew("nanofleet_mqtt_refused_logins_total", reason="bad_credentials")
    assert grew("nanofleet_ingest_lag_seconds_count", 3)
    wait_for(lambda: value(fleet, "nanofleet_rollout_ticks_total") > ticks, what="rollout ticks")

    with fleet.admin() as admin:
        admin.device(login.device_id)
        for _ in range(3):
            admin.http.get(f"/api/v1/devices/nonexistent-{uuid.uuid4().hex[:6]}")
            admin.http.get(f"/no/such/path/{uuid.uuid4().hex}")
    text = httpx.get(f"{fleet.fleet.url}/metrics", timeout=10).text
    assert re.search(
        r'nanofleet_api_request_duration_seconds_count\{method="GET",route="/api/v1/devices/\{device_id\}",status="200"\}',
        text,
    )
    assert 'route="/api/v1/devices/{device_id}",status="404"' in text
    assert 'route="unmatched",status="404"' in text
    assert "nonexistent-" not in text and "/no/such/path" not in text  # no made-up path becomes a series
    assert login.device_id not in text  # nor any device id
