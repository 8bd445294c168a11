"""Staged rollouts: the deployment and target state tables (``states``), planning (``planning``), the
engine's tick (``engine``), health and abort rules (``health``, ``rules``), and the one way to set a
device's desired state and sign rollbacks (``desired``, also used by offline packages)."""

from .desired import DesiredStates, RolloutContext
from .engine import ControlAction, RolloutEngine
from .planning import (
    MAX_VERSION,
    apply_manifest,
    ensure_planned,
    get_deployment,
    plan_deployment,
    plan_waves,
    select_devices,
    spec_digest,
)
from .rules import ABORT_RULES, Abort
from .states import (
    ACTIVE,
    SETTLED,
    TICKED,
    DeploymentEvent,
    DeploymentStatus,
    TargetEvent,
    TargetState,
    TransitionRefused,
    can_deployment,
    can_target,
)

__all__ = [
    "ABORT_RULES",
    "ACTIVE",
    "MAX_VERSION",
    "SETTLED",
    "TICKED",
    "Abort",
    "ControlAction",
    "DeploymentEvent",
    "DeploymentStatus",
    "DesiredStates",
    "RolloutContext",
    "RolloutEngine",
    "TargetEvent",
    "TargetState",
    "TransitionRefused",
    "apply_manifest",
    "can_deployment",
    "can_target",
    "ensure_planned",
    "get_deployment",
    "plan_deployment",
    "plan_waves",
    "select_devices",
    "spec_digest",
]
