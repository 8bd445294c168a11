"""What the fleet does with each MQTT message from a device. Every handler is idempotent: QoS 1 may
deliver twice and a reconnect replays retained messages, so duplicates and stale messages change nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from manifests import mqtt as contract

from .db import Device, DeviceEvent, TelemetrySample, aware, utcnow
from .validation import Dropped, DropReason, admit, record_drop

log = logging.getLogger(__name__)


def _newer(incoming: dt.datetime | None, stored: dt.datetime | None) -> bool:
    if stored is None or incoming is None:
        return True
    return aware(incoming) >= aware(stored)  # type: ignore[operator]


class Message(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


def ingest_messages(session: Session, messages: Sequence[Message]) -> None:
    """Apply a batch of messages in arrival order, in the caller's transaction (the worker's ``Ingest``)."""
    for m in messages:
        handle_message(session, m.topic, m.payload, received_at=getattr(m, "received_at", None))


def handle_message(session: Session, topic: str, payload: bytes, *, received_at: float | None = None) -> str | None:
    """Apply one message; returns the device id it concerned (None when ignored)."""
    # The edge check first (fleet/validation.py): identity from the topic, bounded sizes, strings,
    # integers, ts clamped to the receive time; a drop is logged and counted with its reason.
    accepted = admit(topic, payload, received_at)
    if accepted is None:
        return None
    device_id, msg = accepted.device_id, accepted.message
    device = session.get(Device, device_id)
    if device is None:
        record_drop(topic, Dropped(DropReason.UNKNOWN_DEVICE, "no such device (deleted or never enrolled)"))
        return None
    if isinstance(msg, contract.ReportedState):
        _reported(device, msg)
    elif isinstance(msg, contract.Telemetry):
        _telemetry(session, device, msg)
    elif isinstance(msg, contract.Event):
        _event(session, device, msg)
    else:
        _status(device, msg)
    return device_id


def _seen(device: Device, ts: dt.datetime | None) -> None:
    now = utcnow()
    device.last_seen = now if device.last_seen is None else max(aware(device.last_seen), now)  # type: ignore[type-var]


def _reported(device: Device, msg: contract.ReportedState) -> None:
    if msg.device_id != device.id:
        return
    _seen(device, msg.ts)
    if not _newer(msg.ts, device.reported_ts):
        return
    device.reported = msg.model_dump(mode="json", by_alias=True)
    device.reported_ts = msg.ts
    device.agent_version = msg.agent_version
    device.hardware_class = msg.hardware_class or device.hardware_class
    device.cpu_arch = msg.cpu_arch or device.cpu_arch
    device.ram_bytes = msg.ram_bytes or device.ram_bytes
    if msg.committed is not None and msg.committed.name is not None:
        device.current_name = msg.committed.name
        device.current_version = msg.committed.version


def _telemetry(session: Session, device: Device, msg: contract.Telemetry) -> None:
    if msg.device_id != device.id:
        return
    _seen(device, msg.ts)
    dup = session.scalar(
        select(TelemetrySample.id).where(
            TelemetrySample.device_id == device.id, TelemetrySample.seq == msg.seq
        )
    )
    if dup is not None:
        return
    session.add(
        TelemetrySample(
            device_id=device.id,
            seq=msg.seq,
            ts=msg.ts,
            model_name=msg.model.name,
            model_version=msg.model.version,
            decode_tok_s=msg.decode_tok_s,
            ttft_p95_ms=msg.ttft_p95_ms,
            requests=msg.requests,
            errors=msg.errors,
            payload=msg.model_dump(mode="json", by_alias=True),
        )
    )
    if _newer(msg.ts, device.telemetry_ts):
        device.telemetry = msg.model_dump(mode="json", by_alias=True)
        device.telemetry_ts = msg.ts


def _event(session: Session, device: Device, msg: contract.Event) -> None:
    if msg.device_id != device.id:
        return
    _seen(device, msg.ts)
    dup = session.scalar(
        select(DeviceEvent.id).where(DeviceEvent.device_id == device.id, DeviceEvent.seq == msg.seq)
    )
    if dup is not None:
        return
    session.add(
        DeviceEvent(
            device_id=device.id,
            seq=msg.seq,
            ts=msg.ts,
            kind=msg.kind,
            deployment_id=msg.deployment_id,
            payload=msg.model_dump(mode="json", by_alias=True),
        )
    )


def _status(device: Device, msg: contract.Status) -> None:
    if msg.device_id != device.id:
        return
    # Arrival order, not msg.ts: the last will's payload is fixed at connect time, so an "offline" will
    # carries an older ts than the "online" published right after connecting. Status is retained, so
    # the broker always replays the latest one.
    ts = utcnow()
    device.online = msg.online
    device.status_ts = ts
    if msg.online:
        _seen(device, ts)
    if msg.agent_version:
        device.agent_version = msg.agent_version
