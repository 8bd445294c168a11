"""The offline telemetry file is signed by the board's own ed25519 key and verified by the fleet with the
public half registered at enrolment: nothing in the fleet's database is enough to forge it.

Against the real fleet service process (SQLite) and the board's real export code: a genuine file imports;
a format-1 file authenticated with the token hash read out of the fleet's database (what an attacker who
can read the database could make) is refused; a file signed by another key, one with one byte flipped,
and one from a board enrolled without a key are refused; nothing of a refused file is ingested."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from device.agent.config import load_config
from device.agent.identity import DeviceKeyError, ensure_device_key, load_device_key
from device.offline.telemetry import build_export
from fleet.client import FleetClient
from fleet.errors import FleetError
from manifests import SigningKey
from manifests.offline.format import TELEMETRY_FORMAT_V1, TelemetryExport, sign_telemetry

from .conftest import Board, FleetProc
from .helpers import bootstrapped


def export_bytes(board: Board, out: Path) -> bytes:
    res = board.device_json("export-telemetry", "--out", str(out))
    return Path(res["path"]).read_bytes()


def refused(fleet: FleetProc, data: bytes, reason: str, words: str, device_id: str) -> None:
    before = _entries(fleet, device_id)
    with fleet.admin() as c, pytest.raises(FleetError) as info:
        c.import_telemetry(data)
    assert info.value.reason == reason and words in info.value.message, (info.value.reason, info.value.message)
    assert _entries(fleet, device_id) == before, "a refused file ingested something"


def _entries(fleet: FleetProc, device_id: str) -> int:
    with fleet.admin() as c:
        return len(c.telemetry(device_id, limit=10000)) + len(
            c.request("GET", f"/api/v1/devices/{device_id}/events", params={"limit": 10000})
        )


def _secret_hash(fleet: FleetProc, device_id: str) -> str:
    """What an attacker with a copy of the fleet's database has: the stored hash of the device token."""
    db = sqlite3.connect(str(fleet.data / "fleet.db"))
    try:
        (value,) = db.execute("SELECT secret_hash FROM devices WHERE id = ?", (device_id,)).fetchone()
    finally:
        db.close()
    return str(value)


def test_genuine_file_imports_and_forgeries_are_refused(tmp_path: Path, fleet: FleetProc, bundles, release_key) -> None:  # noqa: ANN001
    board = bootstrapped(fleet, tmp_path / "b", "field-auth", bundles[1], release_key[1])
    genuine = export_bytes(board, tmp_path / "stick")
    outer = json.loads(genuine)
    assert outer["format"] == "nanofleet-offline-telemetry/2" and outer["alg"] == "ed25519"
    assert "mac" not in outer
    body = json.loads(outer["body"])

    # 1. Format 1, made from the database: HMAC keyed by the stored token hash, as the old format was.
    secret_hash = _secret_hash(fleet, "field-auth")
    forged_body = TelemetryExport.model_validate({**body, "format_version": 2, "outbox_dropped": 0}).model_dump_json()
    forged_body = forged_body.replace('"format_version":2', '"format_version":1')
    v1 = {
        "format": TELEMETRY_FORMAT_V1,
        "device_id": "field-auth",
        "alg": "hmac-sha256",
        "body": forged_body,
        "mac": hmac.new(secret_hash.encode(), forged_body.encode(), hashlib.sha256).hexdigest(),
    }
    refused(fleet, json.dumps(v1).encode(), "old_format", "anyone able to read the database", "field-auth")

    # 2. Format 2 signed by a key of the attacker's own, claiming the board.
    attacker = SigningKey.generate()
    own = sign_telemetry("field-auth", outer["body"].encode(), attacker).model_dump_json().encode()
    refused(fleet, own, "bad_signature", "not by the key registered for device field-auth", "field-auth")
    # ...and with the board's key id written over it: the signature itself does not verify.
    relabelled = json.loads(own)
    relabelled["key_id"] = outer["key_id"]
    refused(fleet, json.dumps(relabelled).encode(), "bad_signature", "does not match", "field-auth")

    # 3. The genuine file with one byte of its body flipped (the JSON stays valid).
    i = outer["body"].index('"outbox_dropped":') + len('"outbox_dropped":')
    flipped = {**outer, "body": outer["body"][:i] + chr(ord(outer["body"][i]) ^ 0x01) + outer["body"][i + 1 :]}
    assert flipped["body"] != outer["body"] and len(flipped["body"]) == len(outer["body"])
    refused(fleet, json.dumps(flipped).encode(), "bad_signature", "does not verify", "field-auth")
    # ...or of its signature
    sig = bytearray(base64.b64decode(outer["signature"]))
    sig[5] ^= 0x01
    bad_sig = {**outer, "signature": base64.b64encode(bytes(sig)).decode()}
    refused(fleet, json.dumps(bad_sig).encode(), "bad_signature", "does not verify", "field-auth")

    # 4. The genuine file imports, whole.
    with fleet.admin() as c:
        res = c.import_telemetry(genuine)
    assert not res["duplicate"] and res["telemetry"] + res["events"] == len(body["entries"]) > 0


def test_a_board_enrolled_without_a_key(tmp_path: Path, fleet: FleetProc, bundles, release_key) -> None:  # noqa: ANN001
    """Enrolled before boards had keys: the board cannot export, and a key made afterwards is unknown to
    the fleet, so that file is refused too (re-enrolment registers one)."""
    old = bootstrapped(fleet, tmp_path / "b", "field-old", bundles[1], release_key[1], with_key=False)
    assert not (old.data / "device.key").exists()
    queued = old.outbox_len()
    res = old.device_json("export-telemetry", "--out", str(tmp_path / "stick"), expect_rc=1)
    assert res["reason"] == "no_device_key" and "re-enrol" in res["error"], res
    assert old.outbox_len() == queued and not (tmp_path / "stick").exists()  # nothing left the queue

    ensure_device_key(old.data)  # a key the fleet never saw
    f, _body, _ids = build_export(load_config(old.config))
    assert f.device_id == "field-old"
    refused(fleet, f.model_dump_json().encode(), "no_device_key", "no registered public key", "field-old")


def test_enrolment_refuses_a_key_that_is_not_ed25519(fleet: FleetProc) -> None:
    with fleet.admin() as c:
        token = c.enrollment_token(uses=1)["token"]
    with FleetClient(fleet.url) as anon:
        for bad in ("not a key", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "\u00e9" * 10):
            with pytest.raises(FleetError) as info:
                anon.enroll(token, device_id="field-badkey", device_public_key=bad)
            assert getattr(info.value, "status_code", None) == 422, info.value
        # the token was not spent on the refusals
        anon.enroll(token, device_id="field-badkey", device_public_key=SigningKey.generate().public_pem().decode())


def test_device_key_is_private_and_stable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(DeviceKeyError) as info:
        load_device_key(data)
    assert info.value.reason == "no_device_key"
    pem = ensure_device_key(data)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    key_file = data / "device.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert ensure_device_key(data) == pem  # enrolment can be retried: same key
    assert load_device_key(data).public_pem().decode() == pem
    assert not [p for p in data.iterdir() if p.name != "device.key"]  # no temp file left
    os.chmod(key_file, 0o644)  # loosened by hand: tightened again when used
    load_device_key(data)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
