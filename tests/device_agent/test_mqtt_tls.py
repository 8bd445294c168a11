"""The MQTT link against a real Mosquitto with mutual TLS (CA, server certificate, client certificate)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from device.agent.config import MQTTConfig, TLSConfig
from device.agent.mqtt_link import MqttLink
from device.agent.outbox import Outbox
from manifests import mqtt as contract

from ..conftest import Mosquitto
from .procs import wait_for

pytestmark = pytest.mark.mosquitto


def _cert(name: str, issuer_key, issuer_name, *, ca: bool = False, san: str | None = None):  # noqa: ANN001, ANN202
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        names = [x509.DNSName(san), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = b.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(dir_: Path, name: str, key, cert) -> tuple[Path, Path]:  # noqa: ANN001
    kp, cp = dir_ / f"{name}.key", dir_ / f"{name}.pem"
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


@pytest.fixture
def tls_broker(tmp_path: Path):  # noqa: ANN201
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key, ca_cert = _cert("test-ca", None, None, ca=True)
    _write(pki, "ca", ca_key, ca_cert)
    skey, scert = _cert("localhost", ca_key, ca_cert.subject, san="localhost")
    skp, scp = _write(pki, "server", skey, scert)
    ckey, ccert = _cert("tls-dev", ca_key, ca_cert.subject)
    _write(pki, "client", ckey, ccert)
    work = tmp_path / "mosq"
    work.mkdir()
    broker = Mosquitto(
        work,
        extra_conf=(
            f"cafile {pki / 'ca.pem'}\ncertfile {scp}\nkeyfile {skp}\nrequire_certificate true\n"
            # run as root, mosquitto drops to user mosquitto, who cannot read pytest's private tmp dirs
            + ("user root\n" if os.geteuid() == 0 else "")
        ),
    )
    broker.start()
    yield broker, pki
    broker.stop()


def test_mutual_tls_link(tmp_path: Path, tls_broker) -> None:  # noqa: ANN001
    broker, pki = tls_broker
    cfg = MQTTConfig(
        url=f"mqtts://127.0.0.1:{broker.port}",
        keepalive_s=5,
        reconnect_max_s=1,
        tls=TLSConfig(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key"),
    )
    box = Outbox(tmp_path / "outbox.sqlite", 100)
    got: list[tuple[str, bytes]] = []
    sub = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="tls-observer", protocol=mqtt.MQTTv5
    )
    sub.tls_set(
        ca_certs=str(pki / "ca.pem"),
        certfile=str(pki / "client.pem"),
        keyfile=str(pki / "client.key"),
        cert_reqs=ssl.CERT_REQUIRED,
    )
    sub.on_connect = lambda c, *a: c.subscribe(f"{contract.PREFIX}/devices/tls-dev/#", qos=1)
    sub.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    link = MqttLink(cfg, "tls-dev", "test", box, on_desired=lambda b: None)
    try:
        link.start()
        wait_for(link.connected.is_set, 15, "TLS connection")
        box.put(contract.telemetry_topic("tls-dev"), lambda seq: json.dumps({"seq": seq}).encode())
        wait_for(lambda: any(t.endswith("/telemetry") for t, _ in got), 10, "telemetry over TLS")
        wait_for(lambda: len(box) == 0, 5, "outbox acked")
        assert any(t.endswith("/status") and json.loads(p)["online"] for t, p in got)
    finally:
        link.stop()
        sub.loop_stop()
        sub.disconnect()

    # without a client certificate the broker refuses us: never connected, nothing leaves the outbox
    box.put(contract.telemetry_topic("tls-dev"), lambda seq: b"{}")
    nocert = MQTTConfig(
        url=f"mqtts://127.0.0.1:{broker.port}",
        keepalive_s=5,
        reconnect_max_s=1,
        tls=TLSConfig(ca=pki / "ca.pem"),
    )
    link = MqttLink(nocert, "tls-dev", "test", box, on_desired=lambda b: None)
    try:
        link.start()
        assert not link.connected.wait(2.0)
        assert len(box) == 1
    finally:
        link.stop()
