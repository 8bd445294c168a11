"""The mosquitto role's TLS option, for real: a TLS-only listener that wants a client certificate signed by
the CA and still a per-device password; anonymous clients stay out."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port, mosquitto_bin, wait_port

from ._harness import ANSIBLE_DIR, VENV_BIN, ansible_env, broker_host_vars

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0] if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    crt, pem = path.with_suffix(".crt"), path.with_suffix(".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, pem


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[tuple[Path, int]]:
    tmp = Path(tempfile.mkdtemp(prefix="nanofleet-ansible-tls-"))
    proc = None
    try:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert("nanofleet test CA", ca_key, None)
        ca_crt, _ = _write(tmp / "ca", ca, ca_key)
        srv_key = ec.generate_private_key(ec.SECP256R1())
        _write(tmp / "broker", _cert("localhost", srv_key, (ca.subject, ca_key)), srv_key)
        dev_key = ec.generate_private_key(ec.SECP256R1())
        _write(tmp / "dev-1", _cert("dev-1", dev_key, (ca.subject, ca_key)), dev_key)

        port = free_port()
        host = {
            **broker_host_vars(tmp / "root", 1883),
            "mosquitto_plain_listener": False,
            "mosquitto_tls": True,
            "mosquitto_tls_listen_address": "127.0.0.1",
            "mosquitto_tls_port": port,
            "mosquitto_tls_ca_cert": str(ca_crt),
            "mosquitto_tls_server_cert": str(tmp / "broker.crt"),
            "mosquitto_tls_server_key": str(tmp / "broker.key"),
            "mosquitto_tls_require_client_cert": True,
            "mosquitto_users": [{"username": "dev-1", "password": "dev-1-password-0123456789"}],
        }
        inventory = tmp / "hosts.yml"
        inventory.write_text(
            yaml.safe_dump(
                {
                    "all": {
                        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
                        "children": {"broker": {"hosts": {"broker-tls": host}}},
                    }
                }
            )
        )
        play = tmp / "broker.yml"
        play.write_text(
            "- name: Broker only\n  hosts: broker\n  gather_facts: false\n  roles:\n    - role: mosquitto\n"
        )
        env = {**ansible_env(tmp / "home"), "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles")}
        run = subprocess.run(
            [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(play)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
        conf = (tmp / "root/etc/mosquitto/conf.d/nanofleet.conf").read_text()
        assert "require_certificate true" in conf and "listener 1883" not in conf
        log = open(tmp / "mosquitto.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [mosquitto_bin(), "-c", str(tmp / "root/etc/mosquitto/mosquitto.conf")], stdout=log, stderr=log
        )
        log.close()
        wait_port(port)
        yield tmp, port
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _connect(port: int, tmp: Path, *, cert: bool, username: str | None, password: str | None) -> int | str:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"tls-{time.monotonic_ns()}", protocol=mqtt.MQTTv5
    )
    client.tls_set(
        ca_certs=str(tmp / "ca.crt"),
        certfile=str(tmp / "dev-1.crt") if cert else None,
        keyfile=str(tmp / "dev-1.key") if cert else None,
    )
    if username:
        client.username_pw_set(username, password)
    result: dict[str, int] = {}
    done = threading.Event()

    def on_connect(_c, _u, _f, reason_code, _p):  # type: ignore[no-untyped-def]
        result["rc"] = reason_code.value
        done.set()

    client.on_connect = on_connect
    try:
        client.connect("127.0.0.1", port)
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"
    client.loop_start()
    try:
        if not done.wait(10):
            return "no CONNACK"
        return result["rc"]
    finally:
        client.loop_stop()
        client.disconnect()


def test_tls_listener_wants_a_client_certificate_and_a_password(tls_broker: tuple[Path, int]) -> None:
    tmp, port = tls_broker
    assert _connect(port, tmp, cert=True, username="dev-1", password="dev-1-password-0123456789") == 0
    assert _connect(port, tmp, cert=True, username="dev-1", password="wrong-password-000000") in (0x86, 0x87)
    assert _connect(port, tmp, cert=True, username=None, password=None) in (0x86, 0x87)
    # No client certificate: the TLS handshake (or the first read) fails; never a session.
    assert _connect(port, tmp, cert=False, username="dev-1", password="dev-1-password-0123456789") != 0
