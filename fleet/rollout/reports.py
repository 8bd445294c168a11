"""Reading what a device reported (``manifests.mqtt.ReportedState``, stored as JSON on its row): the
result of a command, and whether it already rolled itself back. The contract's ``UpdateState`` names
the states; nothing here spells them as strings."""

from __future__ import annotations

import enum

from manifests.mqtt import UpdateState

from ..db import Device

# ``ReportedState.last_result`` values that end a command without the new model.
FAILED_RESULTS = frozenset({"failed", "rolled_back", "refused"})
COMMITTED_RESULT = "committed"
# Update states in which the agent is not working on anything.
AT_REST = frozenset({UpdateState.IDLE, UpdateState.COMMITTED})


class Outcome(str, enum.Enum):
    OK = "ok"
    FAILED = "failed"


def update_state(device: Device | None) -> UpdateState | None:
    """The device's reported update state, or None (never reported, or a state this fleet does not know)."""
    raw = (device.reported or {}).get("state") if device is not None else None
    try:
        return UpdateState(raw) if raw is not None else None
    except ValueError:
        return None


def command_outcome(device: Device | None, command_id: str | None) -> tuple[Outcome, str | None] | None:
    """(outcome, error) once the device reported a result for ``command_id``; None while it has not."""
    if device is None or device.reported is None or command_id is None:
        return None
    rep = device.reported
    if rep.get("deployment_id") != command_id:
        return None
    result = rep.get("last_result")
    if result == COMMITTED_RESULT or (result is None and update_state(device) is UpdateState.COMMITTED):
        return Outcome.OK, None
    if result in FAILED_RESULTS:
        return Outcome.FAILED, f"{result}: {rep.get('error') or 'no detail'}"
    return None


def back_on(device: Device | None, name: str | None, version: int | None, deployment_id: str) -> bool:
    """The device runs ``name@version`` again, at rest, and no longer reports ``deployment_id``: it
    rolled itself back (e.g. a failed golden check) before the fleet's rollback reached it."""
    return (
        device is not None
        and device.current_name == name
        and device.current_version == version
        and bool(device.reported)
        and update_state(device) in AT_REST
        and (device.reported or {}).get("deployment_id") != deployment_id
    )
