"""The MQTT edge: every message from the broker is checked here before anything reads it.

``validate_inbound(topic, payload, received_at)`` is pure: it answers ``Accepted`` (the device id from the
*topic*, the leaf and the parsed payload with its timestamp clamped to the receive time) or
``Dropped(reason, detail)``. ``admit`` is what ingest calls first for each message: it validates, logs
and counts a drop (``fleet/metrics.py``) and counts what comes in.

What is refused, and why:
- a topic outside ``nanofleet/v1/devices/<id>/<leaf>``, an id outside the enrolment grammar
  (``schemas.DEVICE_ID_PATTERN``), a leaf devices do not publish;
- a payload over its kind's size cap, not UTF-8, not JSON, not the contract (``manifests/mqtt.py``);
- a payload whose ``device_id`` differs from the topic's: the topic is the identity the broker
  authenticated (its ACL confines each device to its own topics), the payload is only a claim;
- strings with a NUL or an unpaired surrogate (PostgreSQL refuses the first, JSON encoders the second:
  either would break a batch or every later read), strings longer than the column they end up in;
- integers outside their column (``seq`` is a BIGINT, counters and versions INTEGER) or JSON-unsafe,
  floats that are NaN or infinite (PostgreSQL's JSON has no token for them).

Timestamps: a device's clock is not trusted to be ahead of the fleet's. A ``ts`` later than the receive
time is clamped to it (one report dated 9999-12-31 would otherwise outrank every later genuine one); a
naive ``ts`` is read as UTC.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from manifests import ManifestError
from manifests import mqtt as contract

from . import metrics
from .schemas import DEVICE_ID_PATTERN

log = logging.getLogger(__name__)

Inbound = contract.ReportedState | contract.Telemetry | contract.Event | contract.Status

# Each kind's payload cap, in bytes. Real payloads are well under a tenth of these (a reported state with
# both slots is about 1 KB); the broker's packet cap (fleet/broker.py, the mosquitto role) is above all.
MAX_PAYLOAD_BYTES: dict[str, int] = {
    "reported": 64 * 1024,
    "telemetry": 16 * 1024,
    "events": 64 * 1024,
    "status": 4 * 1024,
}
MODELS: dict[str, type[Inbound]] = {
    "reported": contract.ReportedState,
    "telemetry": contract.Telemetry,
    "events": contract.Event,
    "status": contract.Status,
}

I32 = 2**31 - 1  # INTEGER columns (PostgreSQL int4)
I64 = 2**63 - 1  # BIGINT columns; also the bound for any integer kept in a JSON column
MAX_STRING = 4096  # any string not listed below (error messages, event details)
# Fields that end in a column: (kind or "*", dotted path with "*" for a dict key) -> bound.
STRING_CAPS: dict[str, int] = {
    "device_id": 64,
    "agent_version": 64,
    "hardware_class": 64,
    "cpu_arch": 32,
    "deployment_id": 160,
    "committed.name": 128,
    "committed.manifest_sha256": 64,
    "slots.*.name": 128,
    "slots.*.manifest_sha256": 64,
    "model.name": 128,
    "bundle": 256,
}
INT_RANGES: dict[str, tuple[int, int]] = {
    "seq": (0, I64),
    "requests": (0, I32),
    "errors": (0, I32),
    "queue_depth": (0, I32),
    "dropped": (0, I64),
    "ram_bytes": (0, 2**50),
    "rss_bytes": (0, 2**50),
    "disk_free_bytes": (0, 2**60),
    "committed.version": (0, I32),
    "slots.*.version": (0, I32),
    "model.version": (0, I32),
}
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


class DropReason(str, enum.Enum):
    """Why a message was dropped: the ``reason`` label of ``nanofleet_mqtt_dropped_total``."""

    TOPIC = "topic"  # not a device topic, or an id outside the grammar
    LEAF = "leaf"  # a leaf devices do not publish (desired is the fleet's)
    TOO_LARGE = "too_large"  # over the kind's payload cap
    ENCODING = "encoding"  # not UTF-8 / not JSON
    SCHEMA = "schema"  # not the contract
    IDENTITY = "identity"  # payload device_id differs from the topic's
    UNICODE = "unicode"  # NUL or an unpaired surrogate
    FIELD_TOO_LONG = "field_too_long"
    RANGE = "range"  # an integer outside its column
    NON_FINITE = "non_finite"  # NaN or infinity
    UNKNOWN_DEVICE = "unknown_device"  # set by ingest: no such device (deleted, or never enrolled)


@dataclass(frozen=True)
class Accepted:
    device_id: str  # from the topic, never from the payload
    leaf: str
    message: Inbound  # ts clamped to the receive time


@dataclass(frozen=True)
class Dropped:
    reason: DropReason
    detail: str
    device_id: str | None = None  # from the topic, when it parsed


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def validate_inbound(topic: str, payload: bytes, received_at: dt.datetime) -> Accepted | Dropped:
    """Check one message from the broker; pure (no I/O, no clock: ``received_at`` is the receive time)."""
    try:
        device_id, leaf = contract.parse_device_topic(topic)
    except ValueError:
        return Dropped(DropReason.TOPIC, f"not a device topic: {topic[:200]!r}")
    if not _DEVICE_ID.match(device_id):
        return Dropped(DropReason.TOPIC, f"device id {device_id[:80]!r} is outside the id grammar")
    model = MODELS.get(leaf)
    if model is None:
        return Dropped(DropReason.LEAF, f"devices do not publish {leaf[:40]!r}", device_id)
    cap = MAX_PAYLOAD_BYTES[leaf]
    if len(payload) > cap:
        return Dropped(DropReason.TOO_LARGE, f"{leaf} payload of {len(payload)} bytes (cap {cap})", device_id)
    try:
        # pydantic-core's parser refuses invalid UTF-8, unpaired surrogate escapes and deep nesting.
        msg = model.from_bytes(payload)
    except ManifestError as exc:
        reason = DropReason.ENCODING if "Invalid JSON" in exc.message else DropReason.SCHEMA
        return Dropped(reason, exc.message.replace("\n", " ")[:300], device_id)
    if msg.device_id != device_id:
        return Dropped(
            DropReason.IDENTITY,
            f"payload claims device {msg.device_id[:80]!r} on {device_id}'s topic",
            device_id,
        )
    problem = _check_values(msg.model_dump(mode="python", by_alias=True))
    if problem is not None:
        return Dropped(problem[0], problem[1], device_id)
    received = _utc(received_at)
    if msg.ts is not None:
        ts = _utc(msg.ts)
        msg = msg.model_copy(update={"ts": min(ts, received)})
    return Accepted(device_id, leaf, msg)


def _check_values(doc: dict[str, Any]) -> tuple[DropReason, str] | None:
    """The first value outside its bounds, walked without recursion (event ``details`` are free-form)."""
    # (key, value): the key is the value's dotted path with "*" for a list item or a slot name.
    stack: list[tuple[str, Any]] = list(doc.items())
    while stack:
        key, value = stack.pop()
        if isinstance(value, str):
            problem = _string_problem(key, value)
            if problem is not None:
                return problem
        elif value is None or isinstance(value, bool):
            continue
        elif isinstance(value, int):
            lo, hi = INT_RANGES.get(key, _ANY_INT)
            if not lo <= value <= hi:
                return DropReason.RANGE, f"{key}: {str(value)[:40]} is outside [{lo}, {hi}]"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return DropReason.NON_FINITE, f"{key}: {value}"
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str) or _bad_string(k) or len(k) > MAX_STRING:
                    return DropReason.UNICODE, f"{key}: a key that is not a valid string"
                # dict keys are data (slot names, detail keys): bounded by the parent's pattern
                stack.append((f"{key}.{'*' if key == 'slots' else k}", v))
        elif isinstance(value, list | tuple):
            item = f"{key}.*"
            stack.extend((item, v) for v in value)
    return None


_ANY_INT = (-I64 - 1, I64)


def _string_problem(key: str, value: str) -> tuple[DropReason, str] | None:
    bad = _bad_string(value)
    if bad:
        return DropReason.UNICODE, f"{key}: {bad}"
    cap = STRING_CAPS.get(key, MAX_STRING)
    if len(value) > cap:
        return DropReason.FIELD_TOO_LONG, f"{key}: {len(value)} characters (cap {cap})"
    return None


def _bad_string(value: str) -> str | None:
    if "\x00" in value:
        return "holds a NUL character"
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "holds an unpaired surrogate"
    return None


def admit(topic: str, payload: bytes, received_at: float | None = None) -> Accepted | None:
    """Ingest's first step for each message: ``Accepted``, or None when dropped (logged with its reason
    and counted). ``received_at`` is the bridge's ``time.time()`` at receipt (default: now)."""
    now = time.time()
    at = now if received_at is None else received_at
    verdict = validate_inbound(topic, payload, dt.datetime.fromtimestamp(at, dt.timezone.utc))
    metrics.observe_ingest_lag(max(0.0, now - at))
    if isinstance(verdict, Dropped):
        metrics.message_in("invalid" if verdict.reason in (DropReason.TOPIC, DropReason.LEAF) else _leaf(topic))
        record_drop(topic, verdict)
        return None
    metrics.message_in(verdict.leaf)
    return verdict


def record_drop(topic: str, dropped: Dropped) -> None:
    """Log and count one dropped message (also used by ingest for reasons only it can see)."""
    metrics.message_dropped(dropped.reason.value)
    log.warning("dropped MQTT message on %s (%s): %s", topic[:200], dropped.reason.value, dropped.detail)


def _leaf(topic: str) -> str:
    leaf = topic.rsplit("/", 1)[-1]
    return leaf if leaf in MODELS else "invalid"
