"""Abort rules: evidence that stops a rollout (``spec.abort`` of the deployment manifest).

Each deployment-wide rule is a function of the deployment and its rules that returns an ``Abort``
(or None); the engine checks ``ABORT_RULES`` in order on every tick, after it has collected the
devices' results, and acts on the first that fires (``on_abort``: pause or rollback). To add a rule:
write it here, append it to ``ABORT_RULES``, and give ``manifests.deployment.AbortRules`` its field.
The per-device convergence timeout is checked while results are collected (``timed_out``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from manifests.deployment import AbortRules

from ..db import Deployment, DeploymentTarget, aware
from .health import health_problem
from .states import TargetState


@dataclass(frozen=True)
class Abort:
    """Why a rollout stops, and the audit entry (if any) that names the evidence before the abort."""

    reason: str
    audit_action: str | None = None
    device_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


AbortRule = Callable[[Session, Deployment, AbortRules], Abort | None]


def timed_out(t: DeploymentTarget, rules: AbortRules, now: dt.datetime) -> str | None:
    """The error of an in-flight device that did not converge within ``convergence_timeout_s``."""
    if not (rules.convergence_timeout_s and t.assigned_at):
        return None
    if (now - aware(t.assigned_at)).total_seconds() > rules.convergence_timeout_s:  # type: ignore[operator]
        return f"did not converge within {rules.convergence_timeout_s:g}s"
    return None


def failure_rate(_session: Session, dep: Deployment, rules: AbortRules) -> Abort | None:
    """``failure_rate_pct`` of the finished devices failed, once ``min_devices`` have finished."""
    done = [t for t in dep.targets if t.state in (TargetState.SUCCEEDED, TargetState.FAILED)]
    failed = [t for t in done if t.state == TargetState.FAILED]
    if rules.failure_rate_pct is None or len(done) < rules.min_devices or not failed:
        return None
    rate = 100.0 * len(failed) / len(done)
    if rate < rules.failure_rate_pct:
        return None
    return Abort(f"failure rate {rate:.0f}% ({len(failed)}/{len(done)}) >= {rules.failure_rate_pct:g}%")


def health_regression(session: Session, dep: Deployment, rules: AbortRules) -> Abort | None:
    """A device on the new model does worse than on its previous one (decode speed, error rate, TTFT)."""
    for t in dep.targets:
        if t.state != TargetState.SUCCEEDED:
            continue
        problem = health_problem(session, dep, t, rules)
        if problem:
            return Abort(
                f"device {t.device_id}: {problem}",
                audit_action="health_regression",
                device_id=t.device_id,
                details={"problem": problem},
            )
    return None


ABORT_RULES: tuple[AbortRule, ...] = (failure_rate, health_regression)
