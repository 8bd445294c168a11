"""A deployment's status and each target device's state: two enums, two events enums, ONE table each.

Mender's style, as the agent's update machine (``device/agent/states.py``) has it; Argo Rollouts'
explicit phases are the model for the deployment's status::

    deployment   planning --PLANNED--> in_progress        (the engine's first tick selected and recorded its targets)
                 planning --NOTHING_SELECTED--> completed (the selector matched no device)
                 in_progress --COMPLETE--> completed
                 in_progress --PAUSE--> paused --RESUME--> in_progress
                 in_progress | paused --ABORT--> aborted
                 in_progress | paused | completed | aborted --ROLL_BACK--> rolling_back
                 rolling_back --ROLLED_BACK--> rolled_back

    target       pending --START--> in_flight --SUCCEEDED--> succeeded
                 in_flight --FAILED | TIMED_OUT--> failed --RETRY--> pending
                 pending --CANCEL--> skipped            (superseded, aborted, rolled back before it started)
                 pending | in_flight --TAKEN_OVER--> skipped   (a newer deployment reached the device)
                 pending --NO_VARIANT--> unfit --RETRY--> pending  (no variant of the release fits the board)
                 in_flight | succeeded | failed --ROLL_BACK--> rolling_back
                 in_flight | succeeded | failed --CANNOT_ROLL_BACK--> rollback_failed
                 rolling_back --ROLLED_BACK--> rolled_back
                 rolling_back --ROLLBACK_FAILED--> rollback_failed

Every status and state change in the fleet goes through ``move_deployment`` / ``move_target``, which
refuse anything the tables do not list. The enum values are the strings stored in the database.
"""

from __future__ import annotations

import enum
from typing import Protocol

from ..errors import ConflictError


class DeploymentStatus(str, enum.Enum):
    PLANNING = "planning"  # recorded by the apply; its targets are not selected yet (the next tick does it)
    IN_PROGRESS = "in_progress"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class DeploymentEvent(str, enum.Enum):
    PLANNED = "planned"  # its targets are selected and recorded, in waves
    NOTHING_SELECTED = "nothing_selected"  # the selector matched no device: nothing to do
    COMPLETE = "complete"  # the last wave converged and soaked
    PAUSE = "pause"  # by hand, or an abort rule with on_abort: pause
    RESUME = "resume"  # by hand
    ABORT = "abort"  # by hand: stop for good
    ROLL_BACK = "roll_back"  # by hand, or an abort rule with on_abort: rollback
    ROLLED_BACK = "rolled_back"  # no device of it is still rolling back


class TargetState(str, enum.Enum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    UNFIT = "unfit"  # a release deployment: no variant fits the board (the reason in error); nothing sent


class TargetEvent(str, enum.Enum):
    START = "start"  # its desired state was set (by the rollout, or by an offline package)
    SUCCEEDED = "succeeded"  # the device reported its command committed
    FAILED = "failed"  # the device reported its command failed, rolled back or refused
    TIMED_OUT = "timed_out"  # no result within convergence_timeout_s
    RETRY = "retry"  # the deployment resumed: try the device again
    CANCEL = "cancel"  # the deployment stopped before the device started
    TAKEN_OVER = "taken_over"  # a newer deployment started the device
    ROLL_BACK = "roll_back"  # a signed rollback to its previous model was sent
    CANNOT_ROLL_BACK = "cannot_roll_back"  # no previous model to send it back to (an adapter's none is v0: unload)
    ROLLED_BACK = "rolled_back"  # it runs its previous model again
    ROLLBACK_FAILED = "rollback_failed"  # the rollback failed or did not converge in time
    NO_VARIANT = "no_variant"  # no variant of the release fits the board's capabilities


D, DE, T, TE = DeploymentStatus, DeploymentEvent, TargetState, TargetEvent

DEPLOYMENT_TRANSITIONS: dict[tuple[DeploymentStatus, DeploymentEvent], DeploymentStatus] = {
    (D.PLANNING, DE.PLANNED): D.IN_PROGRESS,
    (D.PLANNING, DE.NOTHING_SELECTED): D.COMPLETED,
    (D.IN_PROGRESS, DE.COMPLETE): D.COMPLETED,
    (D.IN_PROGRESS, DE.PAUSE): D.PAUSED,
    (D.PAUSED, DE.RESUME): D.IN_PROGRESS,
    (D.IN_PROGRESS, DE.ABORT): D.ABORTED,
    (D.PAUSED, DE.ABORT): D.ABORTED,
    **{(s, DE.ROLL_BACK): D.ROLLING_BACK for s in (D.IN_PROGRESS, D.PAUSED, D.COMPLETED, D.ABORTED)},
    (D.ROLLING_BACK, DE.ROLLED_BACK): D.ROLLED_BACK,
}

_TOUCHED = (T.IN_FLIGHT, T.SUCCEEDED, T.FAILED)  # the device was given this deployment's bundle
TARGET_TRANSITIONS: dict[tuple[TargetState, TargetEvent], TargetState] = {
    (T.PENDING, TE.START): T.IN_FLIGHT,
    (T.IN_FLIGHT, TE.SUCCEEDED): T.SUCCEEDED,
    (T.IN_FLIGHT, TE.FAILED): T.FAILED,
    (T.IN_FLIGHT, TE.TIMED_OUT): T.FAILED,
    (T.FAILED, TE.RETRY): T.PENDING,
    (T.PENDING, TE.NO_VARIANT): T.UNFIT,
    (T.UNFIT, TE.RETRY): T.PENDING,  # resumed: resolved again from what the board reports now
    (T.PENDING, TE.CANCEL): T.SKIPPED,
    (T.PENDING, TE.TAKEN_OVER): T.SKIPPED,
    (T.IN_FLIGHT, TE.TAKEN_OVER): T.SKIPPED,
    **{(s, TE.ROLL_BACK): T.ROLLING_BACK for s in _TOUCHED},
    **{(s, TE.CANNOT_ROLL_BACK): T.ROLLBACK_FAILED for s in _TOUCHED},
    (T.ROLLING_BACK, TE.ROLLED_BACK): T.ROLLED_BACK,
    (T.ROLLING_BACK, TE.ROLLBACK_FAILED): T.ROLLBACK_FAILED,
}

# Statuses the engine ticks (and that may not be deleted): something is still moving.
TICKED = frozenset({D.PLANNING, D.IN_PROGRESS, D.ROLLING_BACK})
# Statuses in which a deployment holds its devices and its bundle: a newer deployment takes the
# devices over, and the bundle may not be deleted.
ACTIVE = frozenset({D.PLANNING, D.IN_PROGRESS, D.PAUSED, D.ROLLING_BACK})
# Target states in which no result is awaited from the device: a wave whose targets are all here has
# converged.
SETTLED = frozenset({T.SUCCEEDED, T.FAILED, T.SKIPPED, T.ROLLED_BACK, T.ROLLBACK_FAILED, T.UNFIT})

# What an operator is told when a control action is refused (the API answers 409 with it).
_REFUSALS = {
    DE.PAUSE: "deployment {name} is {status}, not in_progress",
    DE.RESUME: "deployment {name} is {status}, not paused",
    DE.ABORT: "deployment {name} is {status}; only in_progress or paused can abort",
    DE.ROLL_BACK: "deployment {name} is already {status}",
}


class TransitionRefused(ConflictError):
    """An event the transition table does not allow in the current status or state (HTTP 409)."""


def next_status(status: str, event: DeploymentEvent, name: str = "?") -> DeploymentStatus:
    """The status ``event`` leads to from ``status``; raises ``TransitionRefused`` when not allowed."""
    try:
        return DEPLOYMENT_TRANSITIONS[(DeploymentStatus(status), event)]
    except (KeyError, ValueError):
        template = _REFUSALS.get(event, "deployment {name}: {event} is not allowed while it is {status}")
        raise TransitionRefused(template.format(name=name, status=status, event=event.value)) from None


def next_state(state: str, event: TargetEvent, device_id: str = "?") -> TargetState:
    try:
        return TARGET_TRANSITIONS[(TargetState(state), event)]
    except (KeyError, ValueError):
        raise TransitionRefused(f"target {device_id}: {event.value} is not allowed while it is {state}") from None


def can_deployment(status: str, event: DeploymentEvent) -> bool:
    # Look up by member, not by the stored string: a str-enum member does not hash like its value.
    try:
        return (DeploymentStatus(status), event) in DEPLOYMENT_TRANSITIONS
    except ValueError:
        return False


def can_target(state: str, event: TargetEvent) -> bool:
    try:
        return (TargetState(state), event) in TARGET_TRANSITIONS
    except ValueError:
        return False


def states_allowing(event: TargetEvent) -> tuple[str, ...]:
    """The stored target states from which ``event`` is allowed (for queries)."""
    return tuple(sorted(s.value for (s, e) in TARGET_TRANSITIONS if e is event))


class _HasStatus(Protocol):
    name: str
    status: str


class _HasState(Protocol):
    device_id: str
    state: str


def move_deployment(dep: _HasStatus, event: DeploymentEvent) -> DeploymentStatus:
    new = next_status(dep.status, event, dep.name)
    dep.status = new.value
    return new


def move_target(target: _HasState, event: TargetEvent) -> TargetState:
    new = next_state(target.state, event, target.device_id)
    target.state = new.value
    return new
