"""MQTT ingest through the embedded amqtt broker: per-device credentials and ACL, last will, idempotent
handlers; and telemetry retention with downsampling."""

from __future__ import annotations

import datetime as dt
import socket
import time

import paho.mqtt.client as mqtt
from sqlalchemy import func, select

from fleet.config import TelemetryConfig
from fleet.db import TelemetryRollup, TelemetrySample
from fleet.retention import compact
from manifests import mqtt as c

from .conftest import wait_for


def connect(url: str, user: str, password: str, client_id: str, on_message=None) -> tuple[mqtt.Client, list]:
    host, port = url.removeprefix("mqtt://").split(":")
    rc: list = []
    cl = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    cl.username_pw_set(user, password)
    cl.on_connect = lambda _c, _u, _f, reason, _p: rc.append(reason)
    if on_message is not None:
        cl.on_message = on_message
    cl.connect(host, int(port))
    cl.loop_start()
    wait_for(lambda: rc, 10, what="CONNACK")
    return cl, rc


def tele(device_id: str, seq: int, tps: float = 50.0, ts: dt.datetime | None = None) -> bytes:
    return c.Telemetry(
        device_id=device_id,
        seq=seq,
        ts=ts or dt.datetime.now(dt.timezone.utc),
        decode_tok_s=tps,
        requests=3,
        model=c.ModelRef(name="m", version=1),
    ).to_bytes()


def test_embedded_broker_auth_acl_last_will_and_idempotent_ingest(make_fleet) -> None:
    fleet = make_fleet()  # embedded amqtt, device credentials required
    a, b = fleet.enroll(2, telemetry_s=60)
    wait_for(lambda: a.connected.is_set() and b.connected.is_set(), what="devices connected")
    with fleet.admin() as admin:
        wait_for(lambda: all(d["online"] for d in admin.devices()), what="online from status topic")

        # Wrong password: refused by the broker.
        _, rc = connect(fleet.svc.mqtt_url, a.id, "nfd_wrong", "intruder")
        assert rc[0].is_failure

        # Device a, with its own credentials, tries to speak for device b: the broker drops it.
        cl, rc = connect(fleet.svc.mqtt_url, a.id, a.token, "a-second-conn")
        assert not rc[0].is_failure
        cl.publish(c.telemetry_topic(b.id), tele(b.id, 1, tps=1.0), qos=1).wait_for_publish(5)
        # ...while its own telemetry, sent twice (QoS 1 redelivery), is stored once.
        for _ in range(2):
            cl.publish(c.telemetry_topic(a.id), tele(a.id, 7, tps=42.0), qos=1).wait_for_publish(5)
        wait_for(
            lambda: (admin.device(a.id).get("telemetry") or {}).get("decode_tok_s") == 42.0,
            what="a's telemetry",
        )
        time.sleep(0.5)
        with fleet.svc.sessions() as s:
            assert (
                s.scalar(
                    select(func.count())
                    .select_from(TelemetrySample)
                    .where(TelemetrySample.device_id == a.id, TelemetrySample.seq == 7)
                )
                == 1
            )
            assert (
                s.scalar(
                    select(func.count()).select_from(TelemetrySample).where(TelemetrySample.device_id == b.id)
                )
                == 0
            )
        cl.disconnect()
        cl.loop_stop()

        # Device b dies without a DISCONNECT: the broker publishes its last will, the fleet marks it offline.
        b.client.loop_stop()
        b.client.socket().shutdown(socket.SHUT_RDWR)
        wait_for(lambda: not admin.device(b.id)["online"], 30, what="last will -> offline")
        assert admin.device(a.id)["online"]


def test_telemetry_retention_downsamples(make_fleet) -> None:
    fleet = make_fleet()
    (dev,) = fleet.enroll(1, telemetry_s=60)
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    bucket = old.replace(minute=0, second=0, microsecond=0)
    with fleet.svc.sessions() as s:
        for i in range(6):
            s.add(
                TelemetrySample(
                    device_id=dev.id,
                    seq=100 + i,
                    ts=bucket + dt.timedelta(seconds=20 * i),
                    model_name="m",
                    model_version=1,
                    decode_tok_s=10.0 * (i + 1),
                    ttft_p95_ms=100 + i,
                    requests=2,
                    errors=1 if i == 0 else 0,
                    payload={},
                )
            )
        s.add(
            TelemetrySample(
                device_id=dev.id,
                seq=200,
                ts=dt.datetime.now(dt.timezone.utc),
                model_name="m",
                model_version=1,
                decode_tok_s=5.0,
                requests=1,
                errors=0,
                payload={},
            )
        )
        s.commit()
        cfg = TelemetryConfig(raw_retention_s=3600, rollup_bucket_s=300, rollup_retention_s=30 * 86400)
        assert compact(s, cfg, dt.datetime.now(dt.timezone.utc)) == 6
        s.commit()
        (roll,) = s.scalars(select(TelemetryRollup)).all()  # 6 samples within one 5-minute bucket
        assert (roll.samples, roll.requests, roll.errors) == (6, 12, 1)
        assert roll.decode_tok_s_avg == 35.0 and roll.ttft_p95_ms_max == 105
        assert [r.seq for r in s.scalars(select(TelemetrySample))] == [200]  # the recent one stays raw
        assert compact(s, cfg, dt.datetime.now(dt.timezone.utc)) == 0  # idempotent
        s.commit()
    with fleet.admin() as admin:
        points = admin.telemetry(dev.id)
        assert [p["resolution"] for p in points] == ["raw", "300s"]
        assert points[1]["samples"] == 6 and points[1]["decode_tok_s"] == 35.0
    with fleet.svc.sessions() as s:
        compact(
            s,
            TelemetryConfig(raw_retention_s=3600, rollup_retention_s=86400),
            dt.datetime.now(dt.timezone.utc),
        )
        s.commit()
        assert s.scalar(select(func.count()).select_from(TelemetryRollup)) == 0  # past rollup retention


def test_a_device_gets_only_its_own_retained_desired_state(make_fleet, bundles) -> None:
    """amqtt 0.12.1 hands a connecting client the retained messages of everyone's subscriptions; the
    fleet's broker must not (a device would otherwise see, and might act on, other devices' commands)."""
    fleet = make_fleet()
    a, b = fleet.enroll(2, telemetry_s=60)
    with fleet.admin() as admin:
        admin.upload_bundle(bundles[1])
        admin.apply({"metadata": {"name": "d"}, "spec": {"bundle": {"name": "tiny-model", "version": 1}}})
        wait_for(lambda: a.current and b.current, what="both devices updated")
        # Done before "late" enrols: a device enrolled while it is in progress would join it.
        wait_for(lambda: admin.deployment("d")["status"] == "completed", what="deployment completed")
        token = admin.enrollment_token(uses=1)["token"]
    from fleet.client import FleetClient

    with FleetClient(fleet.url) as anon:
        creds = anon.enroll(token, device_id="late")
    got: list[str] = []
    cl, rc = connect(
        fleet.svc.mqtt_url, "late", creds["device_token"], "late-conn", lambda _c, _u, m: got.append(m.topic)
    )
    cl.subscribe(c.desired_topic("late"), qos=1)
    # Trying to subscribe to another device's topic is refused by the ACL.
    cl.subscribe(c.desired_topic(a.id), qos=1)
    time.sleep(1.5)
    cl.disconnect()
    cl.loop_stop()
    assert got == []
    assert all(t == c.desired_topic(a.id) for t in a.topics_seen)
