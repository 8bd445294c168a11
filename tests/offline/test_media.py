"""A stick that is too small is refused before anything is written or started; entries exported to a
stick are never sent again over MQTT once the board is back online (real mosquitto)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from manifests import SigningKey
from manifests.offline.errors import MediaTooSmallError
from tests.conftest import Mosquitto

from .conftest import Board, FleetProc, wait_for
from .helpers import bootstrapped


def test_too_small_stick_is_refused_before_anything_changes(
    tmp_path: Path, fleet: FleetProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    import manifests.offline.media as media
    from fleet.offline.media import write_package

    fleet.enroll("field-small")
    fleet.deploy("small-v2", 2, ["field-small"])
    before = fleet.deployment("small-v2")
    stick = tmp_path / "stick"
    # The stick's filesystem reports 100 kB free (the bundle is about 260 kB).
    monkeypatch.setattr(media, "free_bytes", lambda path: 100_000)
    with fleet.admin() as client, pytest.raises(MediaTooSmallError, match="bytes free"):
        write_package(client, "small-v2", stick)
    assert not stick.exists() or list(stick.iterdir()) == []
    after = fleet.deployment("small-v2")
    assert [t["state"] for t in after["targets"]] == [t["state"] for t in before["targets"]]
    assert not any(a["action"] == "offline_export" for a in _audit(fleet, "small-v2"))
    monkeypatch.undo()
    with fleet.admin() as client:
        written = write_package(client, "small-v2", stick)
    assert Path(written.path).is_dir() and written.devices == ["field-small"]


def _audit(fleet: FleetProc, deployment: str) -> list[dict[str, object]]:
    with fleet.admin() as c:
        return c.audit(deployment)


def test_exported_entries_are_not_sent_again_online(
    tmp_path: Path, fleet: FleetProc, bundles: dict[int, Path], release_key: tuple[SigningKey, Path]
) -> None:
    board = bootstrapped(fleet, tmp_path / "b", "field-o", bundles[1], release_key[1])
    res = board.device_json("export-telemetry", "--out", str(tmp_path / "stick"))
    body = json.loads(json.loads(Path(res["path"]).read_text())["body"])
    exported = {json.loads(e["payload"])["seq"] for e in body["entries"]}
    assert exported and board.outbox_len() == 0

    # Back online: the board now reaches a broker.
    broker_dir = tmp_path / "mosquitto"
    broker_dir.mkdir()
    broker = Mosquitto(broker_dir)
    broker.start()
    received: list[int] = []
    lock = threading.Lock()
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="offline-test-sub")

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith(("/telemetry", "/events")):
            with lock:
                received.append(int(json.loads(msg.payload)["seq"]))

    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("nanofleet/v1/devices/field-o/#", qos=1)
    sub.loop_start()
    doc = yaml.safe_load(board.config.read_text())
    doc["mqtt"]["url"] = broker.url
    board.config.write_text(yaml.safe_dump(doc))
    try:
        time.sleep(0.5)
        board.run()
        wait_for(lambda: len(received) >= 3, 30, "the board to publish online")
    finally:
        board.stop()
        sub.loop_stop()
        sub.disconnect()
        broker.stop()
    with lock:
        got = set(received)
    assert not got & exported, f"sent again online: {sorted(got & exported)}"
    assert min(got) > max(exported)
    assert isinstance(board, Board)
