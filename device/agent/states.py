"""The update state machine, after Mender's client: one enum of states, one of events, ONE transition table.

    Idle/Committed/Failed --START--> Downloading --DOWNLOADED--> Verifying --VERIFIED--> Installing
      --INSTALLED--> Activating --HEALTHY--> Committed
    any in-flight state --ERROR--> RollingBack --ROLLED_BACK--> Failed
    Idle/Committed/Failed --IN_SERVICE--> Committed  (the desired bundle is the committed one, serving)

The RESUME_MAP says where the agent restarts after a crash or a power cut in each state. Anything not
listed rolls back: a state we do not know how to resume must not leave a half-made update in service.
"""

from __future__ import annotations

import enum

from manifests.mqtt import UpdateState as State  # the contract names the states the fleet reads

from .errors import InvalidTransitionError


class Event(str, enum.Enum):
    START = "start"  # a new desired bundle was accepted
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    INSTALLED = "installed"
    HEALTHY = "healthy"
    ERROR = "error"
    ROLLED_BACK = "rolled_back"
    RESUME = "resume"  # start-up after a crash, for states the resume map sends elsewhere
    IN_SERVICE = "in_service"  # a new desired bundle is exactly the committed one: nothing to install


# States in which no update is in flight: a new deployment may start from here.
RESTING = frozenset({State.IDLE, State.COMMITTED, State.FAILED})
IN_FLIGHT = frozenset({State.DOWNLOADING, State.VERIFYING, State.INSTALLING, State.ACTIVATING})

TRANSITIONS: dict[tuple[State, Event], State] = {
    **{(s, Event.START): State.DOWNLOADING for s in RESTING},
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.VERIFYING, Event.VERIFIED): State.INSTALLING,
    (State.INSTALLING, Event.INSTALLED): State.ACTIVATING,
    (State.ACTIVATING, Event.HEALTHY): State.COMMITTED,
    # Converged without an install (e.g. desired goes back to the running version after a refused one):
    # the device rests in Committed, never in Failed, while it runs what the fleet wants.
    **{(s, Event.IN_SERVICE): State.COMMITTED for s in RESTING},
    **{(s, Event.ERROR): State.ROLLING_BACK for s in IN_FLIGHT},
    (State.ROLLING_BACK, Event.ERROR): State.ROLLING_BACK,  # rollback is retried until it succeeds
    (State.ROLLING_BACK, Event.ROLLED_BACK): State.FAILED,
    (State.INSTALLING, Event.RESUME): State.VERIFYING,
}


class Resume(str, enum.Enum):
    """What the agent does on start-up for the persisted state."""

    NOTHING = "nothing"  # resting state: serve the active slot
    CONTINUE = "continue"  # re-enter the state (it is idempotent / resumable)
    REVERIFY = "reverify"  # go back to Verifying (files may be half flushed after a power cut)
    ROLLBACK = "rollback"  # the default


RESUME_MAP: dict[State, tuple[Resume, str]] = {
    State.IDLE: (Resume.NOTHING, "serve the active slot"),
    State.COMMITTED: (Resume.NOTHING, "the commit record is on disk: serve the new slot, re-report"),
    State.FAILED: (Resume.NOTHING, "serve the active (old) slot, re-report the failure"),
    State.DOWNLOADING: (
        Resume.CONTINUE,
        "continue the download with HTTP Range; complete files are kept, partial ones continue at their size",
    ),
    State.VERIFYING: (Resume.CONTINUE, "verify the inactive slot again from scratch (idempotent)"),
    State.INSTALLING: (Resume.REVERIFY, "re-verify the inactive slot, then install again (idempotent)"),
    State.ACTIVATING: (
        Resume.ROLLBACK,
        "roll back: the new model was never committed and may be what crashed us (OOM); old slot serves",
    ),
    State.ROLLING_BACK: (Resume.CONTINUE, "finish the rollback (idempotent), then report Failed"),
}


def resume_action(state: State) -> Resume:
    return RESUME_MAP.get(state, (Resume.ROLLBACK, "default"))[0]


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransitionError(
            f"event {event.value!r} is not allowed in state {state.value!r}"
        ) from None
