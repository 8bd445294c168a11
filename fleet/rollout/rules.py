"""Abort rules: evidence that stops a rollout (``spec.abort`` of the deployment manifest).

Each deployment-wide rule is a function of the deployment and its rules that returns an ``Abort``
(or None); the engine checks ``ABORT_RULES`` in order on every tick, after it has collected the
devices' results, and acts on the first that fires (``on_abort``: pause or rollback). To add a rule:
write it here, append it to ``ABORT_RULES``, and give ``manifests.deployment.AbortRules`` its field.
The per-device convergence timeout is checked while results are collected (``timed_out``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manifests.deployment import AbortRules

from .. import adapters
from ..db import Deployment, DeploymentTarget, aware
from .health import has_health_rules, health_problem
from .queries import state_counts
from .states import TargetState

HEALTH_CHECKS_PER_TICK = 500


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


def failure_rate(session: Session, dep: Deployment, rules: AbortRules) -> Abort | None:
    """``failure_rate_pct`` of the finished devices failed, once ``min_devices`` have finished."""
    if rules.failure_rate_pct is None:
        return None
    counts = state_counts(session, dep.id)
    failed = counts[TargetState.FAILED.value]
    done = failed + counts[TargetState.SUCCEEDED.value]
    if done < rules.min_devices or not failed:
        return None
    rate = 100.0 * failed / done
    if rate < rules.failure_rate_pct:
        return None
    return Abort(f"failure rate {rate:.0f}% ({failed}/{done}) >= {rules.failure_rate_pct:g}%")


def health_regression(session: Session, dep: Deployment, rules: AbortRules) -> Abort | None:
    """A device on the new model does worse than on its previous one (decode speed, error rate, TTFT).

    A tick looks at ``HEALTH_CHECKS_PER_TICK`` succeeded devices at most, a window that moves on every
    second, so a 10,000-device deployment costs a bounded number of queries per tick and every device is
    still looked at every few tens of seconds (all of them on every tick in a smaller one)."""
    if not has_health_rules(rules):
        return None
    adapter_base = adapters.adapter_base_of(session, dep.bundle_name, dep.bundle_version)
    q = select(DeploymentTarget).where(
        DeploymentTarget.deployment_id == dep.id, DeploymentTarget.state == TargetState.SUCCEEDED.value
    )
    n = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    window = q.order_by(DeploymentTarget.position).limit(HEALTH_CHECKS_PER_TICK)
    if n > HEALTH_CHECKS_PER_TICK:
        window = window.offset(int(time.time()) * HEALTH_CHECKS_PER_TICK % n)
    for t in session.scalars(window):
        problem = health_problem(session, dep, t, rules, adapter_base=adapter_base)
        if problem:
            return Abort(
                f"device {t.device_id}: {problem}",
                audit_action="health_regression",
                device_id=t.device_id,
                details={"problem": problem},
            )
    return None


ABORT_RULES: tuple[AbortRule, ...] = (failure_rate, health_regression)
